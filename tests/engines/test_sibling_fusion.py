"""Sibling MatMulNBits (engines/cpu/sibling_fusion.py) stacked into one node, against the separate nodes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from engines.cpu.sibling_fusion import fuse_sibling_matmulnbits
from engines.cpu.weight_only import _ort_quantize


def test_sibling_matmulnbits_are_stacked_into_one_node_with_identical_outputs(tmp_path: Path) -> None:
    """Three MatMulNBits on one input (q, k, v of an unfused graph) and one on another: the three become one node
    and a Split, whose outputs are bit-identical to the separate nodes' (decode and prefill shapes)."""
    rng = np.random.default_rng(5)
    widths, k = {"q": 64, "k": 32, "v": 32, "other": 48}, 96
    weights = {name: rng.standard_normal((k, n)).astype(np.float32) for name, n in widths.items()}
    nodes = [helper.make_node("MatMul", ["x" if name != "other" else "y", f"w_{name}"], [f"out_{name}"], name=f"mm_{name}")
             for name in widths]
    graph = helper.make_graph(
        nodes, "siblings", [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", "sequence", k]) for name in "xy"],
        [helper.make_tensor_value_info(f"out_{name}", TensorProto.FLOAT, ["batch", "sequence", n]) for name, n in widths.items()],
        [numpy_helper.from_array(w, f"w_{name}") for name, w in weights.items()])
    fp32 = tmp_path / "fp32.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), fp32)
    separate = tmp_path / "separate.onnx"
    model = _ort_quantize(onnx.load(str(fp32)), 4, 32, False, None, [], ("MatMul",))
    onnx.save(model, separate)
    assert fuse_sibling_matmulnbits(model) == 2
    ops = [node.op_type for node in model.graph.node]
    assert ops.count("MatMulNBits") == 2 and ops.count("Split") == 1
    stacked = tmp_path / "stacked.onnx"
    onnx.save(model, stacked)
    for shape in [(1, 1, k), (2, 7, k)]:
        feed = {name: rng.standard_normal(shape).astype(np.float32) for name in "xy"}
        before = ort.InferenceSession(str(separate), providers=["CPUExecutionProvider"]).run(None, feed)
        after = ort.InferenceSession(str(stacked), providers=["CPUExecutionProvider"]).run(None, feed)
        for a, b in zip(before, after):
            np.testing.assert_array_equal(a, b)
