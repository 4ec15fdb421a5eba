"""Float-offset 4-bit blocks (engines/cpu/block_offset.py) on tiny graphs run by the real ONNX Runtime: weights on
GGUF's Q4_1 grid come back with their own codes, the residual offsets folded into the same MatMulNBits, and the graph
computes x @ W."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from engines.cpu.block_offset import RESIDUAL_LEVELS, block_sum_nodes, quantize_offset_blocks, replace_matmuls

BLOCK = 32


def q4_1_weight(k: int, n: int, seed: int = 0) -> np.ndarray:
    """A [K, N] weight as llama.cpp de-quantizes Q4_1: per block of 32 along K, d * q + m with FP16 d and m."""
    return q4_1_weight_and_steps(k, n, seed)[0]


def q4_1_weight_and_steps(k: int, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The weight and its Q4_1 steps d [N, K/32]."""
    rng = np.random.default_rng(seed)
    blocks = k // BLOCK
    d = rng.uniform(0.005, 0.05, (n, blocks)).astype(np.float16).astype(np.float32)
    m = (-rng.uniform(0.05, 0.95, (n, blocks)) * 15 * d).astype(np.float16).astype(np.float32)  # ranges hold 0
    q = rng.integers(0, 16, (n, blocks, BLOCK))
    q[:, :, 3], q[:, :, 7] = 0, 15  # Q4_1's d and m are the block's own range
    return (d[:, :, None] * q + m[:, :, None]).reshape(n, k).T.astype(np.float32), d


# Two 4-bit levels code each residual (|r| <= step/2): the first level's step is at most the column's largest step
# d_max / 15 and its error at most one step (a half plus the zero point's rounding at the edge of the range); the
# second codes that error, so what remains is at most 2 d_max / 225.
FOLD_BOUND = 2 / 225


def matmul_graph(weights: dict[str, np.ndarray], k: int) -> onnx.ModelProto:
    """y_name = x @ W_name for every weight, all reading the same input x."""
    nodes = [helper.make_node("MatMul", ["x", name], [f"y_{name}"], name=f"mm_{name}") for name in weights]
    outputs = [helper.make_tensor_value_info(f"y_{name}", TensorProto.FLOAT, None) for name in weights]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, None, k])],
                              outputs, [numpy_helper.from_array(w, name) for name, w in weights.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def run(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})


def test_q4_1_weights_come_back_and_the_nibbles_are_packed_low_first() -> None:
    weight, d = q4_1_weight_and_steps(96, 24)
    blocks = quantize_offset_blocks(weight, BLOCK)
    # K = 96: 3 blocks of the weight, then 2 levels of residual rows, 3 rows each padded to a block of 32
    assert blocks.folded_k == 96 + RESIDUAL_LEVELS * BLOCK == 160
    assert blocks.packed.shape == (24, 5, 16) and blocks.packed.dtype == np.uint8
    assert blocks.scales.shape == (24 * 5,) and blocks.zero_points.shape == (24 * 3,)  # 5 nibbles -> 3 bytes
    assert blocks.residuals.shape == (3, 24)
    # The weight's own blocks are on the Q4_1 grid: their scale is d exactly, no second rounding.
    np.testing.assert_array_equal(blocks.scales.reshape(24, 5)[:, :3], d)
    # What remains is the residual's coding, within its bound of the column's largest step.
    column_step = d.max(axis=1)
    error = np.abs(blocks.dequantize() - weight)
    assert np.all(error <= FOLD_BOUND * column_step * (1 + 1e-4) + 1e-7)
    assert error.max() < 0.01 * d.min()  # measured: far inside the bound on these ranges
    # Column 0, block 0: element 3 (q=0) is the low nibble of byte 1, element 7 (q=15) the high nibble of byte 3.
    assert blocks.packed[0, 0, 1] & 0x0F == 0 and blocks.packed[0, 0, 3] >> 4 == 15
    # The integer zero point centres the codes: the residual is at most half a step.
    assert np.all(np.abs(blocks.residuals.T) <= 0.5 * d + 1e-6)


def test_off_grid_weights_are_rounded_within_half_a_step() -> None:
    weight = np.random.default_rng(1).standard_normal((64, 8)).astype(np.float32)
    blocks = quantize_offset_blocks(weight, BLOCK)
    step = np.repeat(blocks.scales.reshape(8, -1)[:, :2], BLOCK, axis=1).T
    error = np.abs(blocks.dequantize() - weight)
    assert 0 < error.max() and np.all(error <= 0.5 * step + FOLD_BOUND * step.max(axis=0))


@pytest.mark.parametrize("shape", [(1, 64), (2, 5, 64), (3, 1024)])
def test_block_sums_are_each_blocks_sum_padded_to_whole_blocks_once_per_level(shape: tuple[int, ...]) -> None:
    k, rank = shape[-1], len(shape)
    nodes, constants, widened = block_sum_nodes("x", k, BLOCK, rank, "t")
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None] * rank)],
                              [helper.make_tensor_value_info(widened, TensorProto.FLOAT, [None] * rank)], constants)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    onnx.checker.check_model(model, full_check=True)
    x = np.random.default_rng(8).standard_normal(shape).astype(np.float32)
    sums = x.reshape(*shape[:-1], k // BLOCK, BLOCK).sum(axis=-1)
    padded = np.concatenate([sums, np.zeros(shape[:-1] + (-(-(k // BLOCK) // BLOCK) * BLOCK - k // BLOCK,))], axis=-1)
    np.testing.assert_allclose(run(model, x)[0], np.concatenate([x] + [padded] * RESIDUAL_LEVELS, axis=-1), atol=1e-5)
    # K = 1024: 32 blocks, a whole block of sums, no Pad
    assert [node.op_type for node in nodes] == ["Reshape", "ReduceSum"] + ["Pad"] * (k < 1024) + ["Concat"]


def test_graphs_older_than_opset_18_are_refused() -> None:
    model = matmul_graph({"w": q4_1_weight(64, 8)}, 64)
    model.opset_import[0].version = 17
    with pytest.raises(ValueError, match="opset 18"):
        replace_matmuls(model, {"mm_w"}, BLOCK, 4)


def int8_activation_bound(x: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """The most that quantizing each activation row to 8 bits can move x @ W, whatever the CPU's kernel: a
    symmetric int8 step (per block or per row, max|x| / 127) or an unsigned one ((max - min) / 255) rounds each
    element by at most max|x_row| / 254, so each output moves by at most that times sum_k |W_kn|."""
    return np.abs(x).max(axis=-1, keepdims=True) / 254 * np.abs(weight).sum(axis=0)


@pytest.mark.parametrize("accuracy_level", [0, 4])
def test_graph_computes_x_times_w_in_onnx_runtime(accuracy_level: int) -> None:
    (wq, dq), (wk, dk) = q4_1_weight_and_steps(96, 40, seed=2), q4_1_weight_and_steps(96, 16, seed=3)
    weights, steps = {"wq": wq, "wk": wk}, {"wq": dq, "wk": dk}
    model = matmul_graph(weights, 96)
    assert sorted(replace_matmuls(model, {"mm_wq", "mm_wk"}, BLOCK, accuracy_level)) == ["mm_wk", "mm_wq"]
    ops = [node.op_type for node in model.graph.node]
    # one block sum and one Concat shared by both weights, the offsets inside the MatMulNBits: no Add, no MatMul
    assert ops.count("MatMulNBits") == 2 and ops.count("ReduceSum") == 1 and ops.count("Concat") == 1
    assert "Add" not in ops and "MatMul" not in ops
    assert not {"wq", "wk"} & {tensor.name for tensor in model.graph.initializer}  # FP32 weights gone
    for shape in [(1, 1, 96), (2, 7, 96)]:  # decode (one row) and prefill kernels
        x = np.random.default_rng(4).standard_normal(shape).astype(np.float32)
        # the MatMulNBits input: x and its block sums once per level (computed here, not by the graph)
        sums = x.reshape(*shape[:-1], 3, BLOCK).sum(axis=-1)
        widened = np.concatenate([x] + [sums] * RESIDUAL_LEVELS, axis=-1)
        for actual, name in zip(run(model, x), weights):
            weight, d_max = weights[name], steps[name].max(axis=1)
            expected = x @ weight
            # the residuals' coding moves each weight by at most FOLD_BOUND * d_max of its column
            allowed = 1e-5 * np.abs(expected).max() + np.abs(x).sum(axis=-1, keepdims=True) * FOLD_BOUND * d_max
            if accuracy_level:  # int8 activations over the widened row: residual rows hold at most d_max / 2 + a step
                widened_weight = np.abs(weight).sum(axis=0) + RESIDUAL_LEVELS * 3 * d_max
                allowed = allowed + np.abs(widened).max(axis=-1, keepdims=True) / 254 * widened_weight
            assert np.all(np.abs(actual - expected) <= allowed), np.abs(actual - expected).max()


def test_a_weight_whose_rows_are_not_whole_blocks_is_left_alone() -> None:
    model = matmul_graph({"w": np.ones((48, 4), np.float32)}, 48)
    assert replace_matmuls(model, {"mm_w"}, BLOCK, 4) == []
    assert [node.op_type for node in model.graph.node] == ["MatMul"]


def test_a_weight_shared_by_two_matmuls_is_packed_once() -> None:
    weight = q4_1_weight(64, 8, seed=5)
    nodes = [helper.make_node("MatMul", [name, "w"], [f"y_{name}"], name=f"mm_{name}") for name in ("a", "b")]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, 64]) for name in ("a", "b")],
        [helper.make_tensor_value_info(f"y_{name}", TensorProto.FLOAT, [1, 8]) for name in ("a", "b")],
        [numpy_helper.from_array(weight, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    assert len(replace_matmuls(model, {"mm_a", "mm_b"}, BLOCK, 0)) == 2
    assert sorted(tensor.name for tensor in model.graph.initializer) == [  # the block sums' constants, once
        "block_sum_axis", "block_sum_pads_64", "block_sum_shape_2d_64", "w_Q4", "w_scales", "w_zero_points"]
    onnx.checker.check_model(model)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    a, b = (np.random.default_rng(seed).standard_normal((1, 64)).astype(np.float32) for seed in (6, 7))
    y_a, y_b = session.run(None, {"a": a, "b": b})
    np.testing.assert_allclose(y_a, a @ weight, atol=1e-4)
    np.testing.assert_allclose(y_b, b @ weight, atol=1e-4)


@pytest.mark.parametrize("qtype, on_grid", [("Q4_K", True), ("Q4_0", True), ("Q4_1", True),
                                            ("Q6_K", False), ("Q8_0", False), ("F32", False)])
def test_a_4_bit_gguf_grid_is_kept_and_wider_grids_are_rounded_once(qtype: str, on_grid: bool) -> None:
    """De-quantized GGUF blocks: Q4_K sub-blocks (codes that need not reach 0 and 15), Q4_0 and Q4_1 come
    back exactly; Q6_K, Q8_0 and FP32 have more than 16 levels and get min-max blocks (half a step)."""
    from gguf import GGMLQuantizationType, quants

    from tests.tiny_gguf import quantize_rows

    rng = np.random.default_rng(3)
    # GGUF rows [N, K]; sub-blocks of 32 of different magnitudes, as in real weights (Q4_K's small sub-blocks
    # get coarse 6-bit scales).
    normal = rng.standard_normal((16, 512))
    rows = (normal * np.repeat(rng.uniform(0.02, 0.2, (16, 16)), BLOCK, axis=1)).astype(np.float32)
    kind = GGMLQuantizationType[qtype]
    source = rows if qtype == "F32" else quants.dequantize(quantize_rows(rows, kind), kind)
    blocks = quantize_offset_blocks(np.ascontiguousarray(source.T), BLOCK)
    error = np.abs(blocks.dequantize() - source.T)
    low, high = source.reshape(16, -1, BLOCK).min(axis=2), source.reshape(16, -1, BLOCK).max(axis=2)
    min_max_step = np.repeat((high - low) / 15, BLOCK, axis=1).T
    folded = FOLD_BOUND * blocks.scales.reshape(16, -1)[:, :16].max(axis=1)  # the residuals' coding, per column
    assert blocks.source_grid_blocks == (source.size // BLOCK if on_grid else 0)
    if on_grid:
        assert np.all(error <= 3e-4 * min_max_step + folded)
    else:
        assert np.all(error <= 0.5 * min_max_step * (1 + 1e-3) + folded) and error.max() > 0.1 * min_max_step.max()
    if qtype == "Q4_K":  # min-max alone would round these a second time: the grid detection is what keeps them
        plain = np.rint((source - np.repeat(low, BLOCK, axis=1)) / np.repeat((high - low) / 15, BLOCK, axis=1))
        replayed = plain * np.repeat((high - low) / 15, BLOCK, axis=1) + np.repeat(low, BLOCK, axis=1)
        assert np.abs(replayed - source).max() > 0.1 * min_max_step.max()
