"""Layer localization on tiny graphs built in code: name matching through Q/DQ, and ranking."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from pipeline.parity.localize import localize, match_tensors

RNG = np.random.default_rng(0)
W1 = RNG.normal(size=(16, 32)).astype(np.float32)
W2 = RNG.normal(size=(32, 8)).astype(np.float32)


def _fp32_graph(w1: np.ndarray = W1, w2: np.ndarray = W2) -> onnx.ModelProto:
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="layer1/MatMul"),
        helper.make_node("Relu", ["h"], ["a"], name="layer1/Relu"),
        helper.make_node("MatMul", ["a", "w2"], ["y"], name="layer2/MatMul"),
    ]
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _qdq_graph() -> onnx.ModelProto:
    """Activations quantized before each MatMul (QDQ), the second MatMul's input renamed on the way."""
    scale, zero = numpy_helper.from_array(np.array(0.05, np.float32), "s"), numpy_helper.from_array(np.array(0, np.int8), "z")
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["x_q"], name="x_QuantizeLinear"),
        helper.make_node("DequantizeLinear", ["x_q", "s", "z"], ["x_dq"], name="x_DequantizeLinear"),
        helper.make_node("MatMul", ["x_dq", "w1"], ["h"], name="layer1/MatMul_quant"),
        helper.make_node("Relu", ["h"], ["a"], name="layer1/Relu"),
        helper.make_node("QuantizeLinear", ["a", "s", "z"], ["a_QuantizeLinear_Output"], name="a_Q"),
        helper.make_node("DequantizeLinear", ["a_QuantizeLinear_Output", "s", "z"], ["a_DequantizeLinear_Output"], name="a_DQ"),
        helper.make_node("MatMul", ["a_DequantizeLinear_Output", "w2"], ["y"], name="layer2/MatMul_quant"),
    ]
    graph = helper.make_graph(
        nodes, "tiny-qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])],
        [numpy_helper.from_array(W1, "w1"), numpy_helper.from_array(W2, "w2"), scale, zero],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _batches() -> list[dict[str, np.ndarray]]:
    return [{"x": RNG.normal(size=(4, 16)).astype(np.float32)} for _ in range(2)]


def test_tensors_match_by_name_and_through_qdq() -> None:
    reference = _fp32_graph()
    candidate = _qdq_graph()
    candidate.graph.node[3].output[0] = "a_renamed"  # Relu output renamed: only Q/DQ still carries 'a'
    candidate.graph.node[4].input[0] = "a_renamed"
    matches = match_tensors(reference, candidate)
    assert matches["h"] == "h" and matches["y"] == "y"
    assert "a" not in matches  # 'a_renamed' is read by Q, not produced by a DQ of 'a'
    matches = match_tensors(reference, _qdq_graph())
    assert matches == {"h": "h", "a": "a", "y": "y"}


def test_scaled_weight_is_ranked_first(tmp_path: Path) -> None:
    onnx.save(_fp32_graph(), str(tmp_path / "ref.onnx"))
    onnx.save(_fp32_graph(w2=W2 * 3.0), str(tmp_path / "broken.onnx"))
    report = localize(tmp_path / "ref.onnx", tmp_path / "broken.onnx", _batches())
    assert report["matched_tensors"] == 3
    assert [layer["node"] for layer in report["ranked"]][0] == "layer2/MatMul"
    assert report["first_divergent"]["node"] == "layer2/MatMul"
    by_node = {layer["node"]: layer for layer in report["layers"]}
    assert by_node["layer1/MatMul"]["relative_l2"] == 0.0, "upstream of the broken weight nothing changed"
    assert abs(by_node["layer2/MatMul"]["relative_l2"] - 2.0) < 1e-5  # 3x the weight: error is 2x the output


def test_quantized_graph_error_starts_at_the_first_quantized_input(tmp_path: Path) -> None:
    onnx.save(_fp32_graph(), str(tmp_path / "ref.onnx"))
    onnx.save(_qdq_graph(), str(tmp_path / "qdq.onnx"))
    report = localize(tmp_path / "ref.onnx", tmp_path / "qdq.onnx", _batches())
    by_node = {layer["node"]: layer for layer in report["layers"]}
    assert 0 < by_node["layer1/MatMul"]["relative_l2"] < 0.2, "real INT8 rounding error, small"
    assert by_node["layer1/MatMul"]["introduced"] > 0
