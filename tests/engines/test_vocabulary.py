"""The 8-bit token embedding (engines/cpu/vocabulary.py) on tiny tied and untied graphs built in code, checked
against the FP32 table in numpy: within half a quantization step of each block, and read from the lm_head's own
codes when the two are tied."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from engines.cpu.weight_only import quantize_weight_only

VOCAB = 96


def _lm(path: Path, width: int, tied: bool, seed: int = 0) -> np.ndarray:
    """input_ids -> Gather(table) -> MatMul(lm_head) -> logits; the embedded rows are an output too."""
    rng = np.random.default_rng(seed)
    # Blocks of very different magnitudes, as in real tables: one scale per row would not do.
    table = (rng.standard_normal((VOCAB, width)) * rng.choice([0.01, 0.1, 1.0], (VOCAB, width))).astype(np.float32)
    head = table.T.copy() if tied else rng.standard_normal((width, VOCAB)).astype(np.float32)
    nodes = [helper.make_node("Gather", ["table", "input_ids"], ["embedded"], name="/model/embed_tokens/Gather"),
             helper.make_node("MatMul", ["embedded", "head"], ["logits"], name="/lm_head/MatMul")]
    graph = helper.make_graph(
        nodes, "lm", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "sequence", VOCAB]),
         helper.make_tensor_value_info("embedded", TensorProto.FLOAT, ["batch", "sequence", width])],
        [numpy_helper.from_array(table, "table"), numpy_helper.from_array(head, "head")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), path)
    return table


def _run(path: Path, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits, embedded = session.run(["logits", "embedded"], {"input_ids": ids})
    return logits, embedded


def _half_steps(table: np.ndarray, block: int) -> np.ndarray:
    """Half the symmetric 8-bit step of each value's block: max |w| / 127 / 2."""
    rows, width = table.shape
    padded = np.zeros((rows, -(-width // block) * block), np.float32)
    padded[:, :width] = np.abs(table)
    steps = padded.reshape(rows, -1, block).max(axis=-1) / 127 / 2
    return np.repeat(steps, block, axis=1)[:, :width]


@pytest.mark.parametrize("tied, width, block, shared", [(True, 128, 64, True), (True, 128, 32, True),
                                                        (False, 128, 64, False), (True, 80, 64, False)])
def test_int8_embedding_is_within_half_a_step_and_shares_the_lm_head_codes_when_tied(
        tmp_path: Path, tied: bool, width: int, block: int, shared: bool) -> None:
    fp32, quantized = tmp_path / "fp32.onnx", tmp_path / "int8.onnx"
    table = _lm(fp32, width, tied)
    summary = quantize_weight_only(fp32, quantized, "rtn", 4, 32, False, "int8", "int8", vocab_block_size=block)
    assert summary["tied_embeddings"] is tied and summary["shared_vocabulary"] is shared
    ids = np.arange(VOCAB, dtype=np.int64)[None, :]
    _, embedded = _run(quantized, ids)
    error = np.abs(embedded[0] - table)
    assert (error <= _half_steps(table, block) * (1 + 1e-5) + 1e-12).all(), error.max()
    assert error.max() > 0  # 8-bit rows, not the FP32 table
    model = onnx.load(str(quantized))
    gather = next(node for node in model.graph.node if node.op_type == "GatherBlockQuantized")
    head = next(node for node in model.graph.node if node.op_type == "MatMulNBits")
    assert (gather.input[0] == head.input[1]) is shared  # one table in the file
    assert not any(tensor.data_type == TensorProto.FLOAT and tensor.dims == [VOCAB, width] for tensor in model.graph.initializer)
    # The lm_head's codes de-quantized in numpy: (q - 128) * scale, rows [VOCAB, width].
    codes = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == head.input[1]))
    scales = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == head.input[2]))
    rows = ((codes.astype(np.float32) - 128) * scales.reshape(VOCAB, -1, 1)).reshape(VOCAB, -1)[:, :width]
    if shared:  # the gathered rows are exactly those
        np.testing.assert_array_equal(embedded[0], rows)
    # The lm_head weight is within half a step of the FP32 weight, and the logits within the int8 rounding of the
    # activations (accuracy_level 4) of x @ that weight.
    weight = rows.T
    fp32_weight = numpy_helper.to_array(onnx.load(str(fp32)).graph.initializer[1])
    assert (np.abs(weight - fp32_weight) <= _half_steps(fp32_weight.T, block).T * (1 + 1e-5) + 1e-12).all()
    logits, _ = _run(quantized, ids)
    x = embedded[0]
    bound = np.abs(x).max(axis=1, keepdims=True) / 254 * np.abs(weight).sum(axis=0, keepdims=True) + 1e-4
    assert (np.abs(logits[0] - x @ weight) <= bound).all()


def test_int4_and_fp32_embeddings_stay_available(tmp_path: Path) -> None:
    fp32 = tmp_path / "fp32.onnx"
    table = _lm(fp32, 128, True)
    ids = np.arange(VOCAB, dtype=np.int64)[None, :]
    for precision, op in (("int4", "GatherBlockQuantized"), ("fp32", "Gather")):
        target = tmp_path / f"{precision}.onnx"
        summary = quantize_weight_only(fp32, target, "rtn", 4, 32, False, "int8", precision)
        assert not summary["shared_vocabulary"]
        assert op in {node.op_type for node in onnx.load(str(target)).graph.node}
        _, embedded = _run(target, ids)
        if precision == "fp32":
            np.testing.assert_array_equal(embedded[0], table)
        else:  # 4-bit: coarser than 8 bits, still close
            assert 0 < np.abs(embedded[0] - table).max() < np.abs(table).max() / 4

