"""Symmetric pre-quantized 4-bit decoders on --target trt: the checkpoint's own INT4 codes (q - 8) and scales as
opset-21 blocked DequantizeLinear (weight-only), checked bit for bit against the checkpoint and for perplexity
(simulated in ONNX Runtime) against the de-quantized PyTorch model; asymmetric checkpoints are refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.core.errors import ExitCode
from tests.helpers import assert_one_line_error, run_cli
from tests.pipeline.test_prequantized import (
    CHEAP,
    MAX_PERPLEXITY_INCREASE,
    _read,
    write_compressed_tensors,
    write_gptq,
    write_torchao_qat,
)

pytest.importorskip("gguf")  # the tiny decoder's tokenizer is SmolLM2's, read from its GGUF file


def build_trt(folder: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    build_file = out.parent / f"{out.name}.yaml"  # JSON is YAML
    build_file.write_text(json.dumps(CHEAP))
    result = run_cli("build", "--config", str(build_file), "--model", str(folder), "--target", "trt",
                     "-o", str(out))
    assert result.returncode == 0, result.stderr[-2000:]


def int4_mismatches(model, linears: dict) -> list[str]:
    """Test-side reading of every blocked DequantizeLinear: its INT4 values must be a checkpoint Linear's codes
    minus 8 (rows in the order its act-order Gather gives), its scales the Linear's scales bit for bit, no zero
    point, and every Linear must be read by exactly one. Returns what differs."""
    from onnx import TensorProto, numpy_helper

    init = {t.name: t for t in model.graph.initializer}
    consumers = {name: node for node in model.graph.node for name in node.input}
    by_codes = {}
    for linear in linears.values():
        order = np.argsort(linear.groups, kind="stable")
        by_codes[(linear.codes[:, order].astype(np.int8) - 8).T.tobytes()] = (linear, order)
    problems, seen = [], []
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear":
            continue
        attrs = {a.name: a.i for a in node.attribute}
        values = init[node.input[0]]
        if values.data_type != TensorProto.INT4 or len(node.input) > 2 or attrs.get("axis") != 0:
            problems.append(f"{node.name}: not an INT4 weight blocked along axis 0 without zero point")
            continue
        q = numpy_helper.to_array(values).astype(np.int8)
        found = by_codes.get(np.ascontiguousarray(q).tobytes())
        if found is None:
            problems.append(f"{node.name}: INT4 values are no checkpoint Linear's codes - 8")
            continue
        linear, order = found
        seen.append(linear.name)
        scales = numpy_helper.to_array(init[node.input[1]])
        if attrs.get("block_size") != linear.group_size or scales.dtype != np.float32 \
                or scales.tobytes() != np.ascontiguousarray(linear.scales.T).tobytes():
            problems.append(f"{node.name}: scales are not {linear.name}'s bit for bit")
        matmul = consumers[node.output[0]]
        gather = next((n for n in model.graph.node if n.output[0] == matmul.input[0]), None)
        if linear.act_order and (gather is None or gather.op_type != "Gather"
                                 or not np.array_equal(numpy_helper.to_array(init[gather.input[1]]), order)):
            problems.append(f"{node.name}: {linear.name}'s act-order permutation is not applied to its input")
    if sorted(seen) != sorted(linears):
        problems.append(f"{len(seen)} DequantizeLinear for {len(linears)} checkpoint Linears")
    return problems


@pytest.fixture(scope="module", params=["gptq-act-order", "compressed-tensors", "torchao-qat"])
def trt_build(request, tiny_llama_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A symmetric GPTQ v1 act-order checkpoint (zero points stored as 7) or a symmetric compressed-tensors one
    (signed codes, no zero point) or a torchao QAT model (IntxWeightOnlyConfig int4: symmetric, codes -8..7),
    each built with --target trt."""
    where = tmp_path_factory.mktemp(request.param) / f"tiny-llama-{request.param}-sym"
    if request.param == "compressed-tensors":
        folder = write_compressed_tensors(where, tiny_llama_folder, symmetric=True)
    elif request.param == "torchao-qat":
        folder = write_torchao_qat(where, tiny_llama_folder)[0]
    else:
        folder, _ = write_gptq(where, tiny_llama_folder, act_order=True, symmetric=True)
    out = tmp_path_factory.mktemp(f"{request.param}-trt") / "build"
    build_trt(folder, out)
    return folder, out


def test_symmetric_checkpoint_keeps_its_codes_and_scales_on_trt(trt_build) -> None:
    import onnx

    folder, out = trt_build
    scheme, linears = _read(folder)
    assert scheme.symmetric and scheme.act_order == (scheme.method == "gptq")
    model = onnx.load(str(out / "model.onnx"))
    assert {op.domain: op.version for op in model.opset_import}.get("", 0) >= 21
    assert not int4_mismatches(model, linears)
    assert not [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "MatMulNBits")]  # weight-only
    manifest = json.loads((out / "manifest.json").read_text())
    precision = next(entry for entry in manifest["stages"] if entry["stage"] == "precision")["metrics"]
    assert precision["checkpoint_matmuls"] == len(linears) and precision["unmatched_linears"] == 0
    assert (precision["act_order_matmuls"] > 0) == scheme.act_order
    assert precision["checkpoint_blocks"] == sum(linear.scales.size for linear in linears.values())
    bundle = json.loads((out / "trt" / "build_config.json").read_text())
    assert bundle["precision"].startswith("INT4 weight-only")
    parity = json.loads((out / "parity.json").read_text())
    assert parity["candidate"]["description"].startswith("TensorRT INT4 weight-only")
    assert parity["status"] == "pass" and not parity["failures"], parity["failures"]
    increase = parity["outputs"]["logits"]["perplexity_increase"]
    assert abs(increase) <= MAX_PERPLEXITY_INCREASE, increase


def test_a_changed_scale_or_code_is_caught(trt_build) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    folder, out = trt_build
    _, linears = _read(folder)
    dq = next(n for n in onnx.load(str(out / "model.onnx")).graph.node if n.op_type == "DequantizeLinear")
    for tensor_name in dq.input[:2]:
        model = onnx.load(str(out / "model.onnx"))
        tensor = next(t for t in model.graph.initializer if t.name == tensor_name)
        array = numpy_helper.to_array(tensor).copy()
        if tensor.data_type == TensorProto.INT4:
            array = array.astype(np.int8)
            array.flat[0] = array.flat[0] + 1 if array.flat[0] < 7 else 6
            changed = helper.make_tensor(tensor.name, TensorProto.INT4, list(array.shape), array.reshape(-1).tolist())
        else:
            array.flat[0] = np.nextafter(array.flat[0], np.float32(np.inf))  # one ulp
            changed = numpy_helper.from_array(array, tensor.name)
        tensor.CopyFrom(changed)
        assert int4_mismatches(model, linears), tensor_name


def test_the_trt_graph_runs_the_dequantized_weights_exactly(trt_build) -> None:
    """ONNX Runtime's DequantizeLinear (Q/DQ kept as float ops, as the verify stage runs it) gives the export's
    FP32 weights bit for bit."""
    import onnx
    import onnxruntime as ort
    from onnx import helper

    from pipeline.stages.int4_checkpoint import dequantized_weights

    _, out = trt_build
    model = onnx.load(str(out / "model.onnx"))
    expected = dequantized_weights(model)
    dqs = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    init = [t for t in model.graph.initializer if any(t.name in n.input for n in dqs)]
    graph = helper.make_graph(dqs, "dq", [], [helper.make_tensor_value_info(n.output[0], 1, None) for n in dqs], init)
    small = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    small.ir_version = 10
    options = ort.SessionOptions()
    options.add_session_config_entry("session.disable_quant_qdq", "1")
    got = ort.InferenceSession(small.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(None, {})
    for node, value in zip(dqs, got):
        np.testing.assert_array_equal(value, expected[node.name], err_msg=node.name)


def test_asymmetric_checkpoint_is_refused_on_trt(tiny_llama_folder: Path, tmp_path: Path) -> None:
    folder, _ = write_gptq(tmp_path / "gptq-asym", tiny_llama_folder, act_order=False)
    result = run_cli("build", "--model", str(folder), "--target", "trt", "-o", str(tmp_path / "never"))
    assert_one_line_error(result, ExitCode.BAD_INPUT, "zero point", "--target cpu")
    assert not (tmp_path / "never" / "export").exists()


def test_the_plan_table_declares_the_int4_path_and_refuses_a_precision(tiny_llama_folder: Path, tmp_path: Path) -> None:
    from pipeline.build.plan import PLAN, plan_build
    from pipeline.config import load_config
    from pipeline.core.errors import ConfigError

    folder, _ = write_gptq(tmp_path / "gptq-sym", tiny_llama_folder, act_order=False, symmetric=True)
    plan = plan_build(load_config(None, {"model": {"path": str(folder)}, "target": "trt"}))
    assert [type(stage) for stage in plan.stages] == [type(factory()) for factory in PLAN[("trt", "decoder-int4")]]
    with pytest.raises(ConfigError, match="keeps its own codes and scales"):
        plan_build(load_config(None, {"model": {"path": str(folder)}, "target": "trt", "trt": {"precision": "fp8"}}))
    cpu = plan_build(load_config(None, {"model": {"path": str(folder)}}))  # the CPU path is unchanged
    assert cpu.config.quantization.mode == "checkpoint" and "quantize" in cpu.stage_names
