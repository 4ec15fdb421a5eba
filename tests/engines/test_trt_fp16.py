"""FP16 graphs for TensorRT: FP16 weights and compute, LayerNorm/Softmax/Pow/ReduceMean kept in FP32."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from engines.trt.fp16 import FP32_OPS, convert_to_fp16, topological_sort
from tests.helpers import tensor_types


def test_topological_sort_orders_appended_nodes() -> None:
    nodes = [helper.make_node("Relu", ["a"], ["b"], name="second"), helper.make_node("Neg", ["x"], ["a"], name="first")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("b", TensorProto.FLOAT, [2])])
    topological_sort(graph)
    assert [n.name for n in graph.node] == ["first", "second"]
    onnx.checker.check_model(helper.make_model(graph))


def test_small_graph_keeps_normalization_statistics_and_softmax_in_fp32(tmp_path) -> None:
    """LayerNormalization, and a LayerNorm exported decomposed (ReduceMean, Pow), plus Softmax, stay FP32."""
    weight = numpy_helper.from_array(np.full((4, 4), 0.5, np.float32), "w")
    scale = numpy_helper.from_array(np.ones(4, np.float32), "s")
    two = numpy_helper.from_array(np.array(2.0, np.float32), "two")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="matmul"),
             helper.make_node("ReduceMean", ["h"], ["mean"], axes=[-1], name="mean"),
             helper.make_node("Sub", ["h", "mean"], ["centered"], name="sub"),
             helper.make_node("Pow", ["centered", "two"], ["squared"], name="pow"),
             helper.make_node("ReduceMean", ["squared"], ["variance"], axes=[-1], name="variance"),
             helper.make_node("Add", ["h", "variance"], ["hv"], name="add"),
             helper.make_node("LayerNormalization", ["hv", "s"], ["n"], axis=-1, name="ln"),
             helper.make_node("Softmax", ["n"], ["y"], axis=-1, name="softmax")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])], [weight, scale, two])
    original = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    converted = convert_to_fp16(original)
    onnx.checker.check_model(converted, full_check=True)
    types = tensor_types(converted)
    assert types["w"] == TensorProto.FLOAT16 and types["x"] == TensorProto.FLOAT and types["h"] == TensorProto.FLOAT16
    sensitive = [node for node in converted.graph.node if node.op_type in FP32_OPS]
    assert sorted(node.op_type for node in sensitive) == ["LayerNormalization", "Pow", "ReduceMean", "ReduceMean",
                                                           "Softmax"]
    for node in sensitive:
        assert {types[name] for name in [*node.input, *node.output] if name} == {TensorProto.FLOAT}, node.name
    from engines.ort_session import OrtRunner

    onnx.save(original, str(tmp_path / "fp32.onnx"))
    onnx.save(converted, str(tmp_path / "fp16.onnx"))
    x = np.random.default_rng(0).normal(size=(2, 4)).astype(np.float32)
    with OrtRunner(tmp_path / "fp32.onnx") as fp32, OrtRunner(tmp_path / "fp16.onnx") as fp16:
        np.testing.assert_allclose(fp16.infer({"x": x})["y"], fp32.infer({"x": x})["y"], atol=2e-3)


def test_rmsnorm_statistics_of_outliers_stay_finite(tmp_path) -> None:
    """x^2 of an LLM's outlier activation (|x| ~ 1000) exceeds FP16's 65504: Pow -> ReduceMean must stay FP32
    in between (the converter's FP32 -> FP16 -> FP32 round trip made it inf; SmolLM2's perplexity 69 -> 41,800)."""
    from engines.ort_session import OrtRunner

    two = numpy_helper.from_array(np.array(2.0, np.float32), "two")
    eps = numpy_helper.from_array(np.array(1e-5, np.float32), "eps")
    nodes = [helper.make_node("Pow", ["x", "two"], ["squared"], name="pow"),
             helper.make_node("ReduceMean", ["squared"], ["variance"], axes=[-1], name="variance"),
             helper.make_node("Add", ["variance", "eps"], ["shifted"], name="add"),
             helper.make_node("Sqrt", ["shifted"], ["rms"], name="sqrt"),
             helper.make_node("Div", ["x", "rms"], ["y"], name="normalize")]
    graph = helper.make_graph(nodes, "rmsnorm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])], [two, eps])
    original = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    converted = convert_to_fp16(original)
    onnx.checker.check_model(converted, full_check=True)
    assert not [n for n in converted.graph.node if n.op_type == "Cast" and n.output[0] == "squared"]
    onnx.save(original, str(tmp_path / "fp32.onnx"))
    onnx.save(converted, str(tmp_path / "fp16.onnx"))
    x = np.array([[1200.0, -3.0, 0.5, 2.0], [0.1, -0.2, 0.3, 0.4]], np.float32)
    with OrtRunner(tmp_path / "fp32.onnx") as fp32, OrtRunner(tmp_path / "fp16.onnx") as fp16:
        expected, actual = fp32.infer({"x": x})["y"], fp16.infer({"x": x})["y"]
    assert np.isfinite(actual).all() and np.abs(actual).max() > 1.0
    np.testing.assert_allclose(actual, expected, rtol=5e-3, atol=2e-3)


@pytest.fixture(scope="module")
def fp16_model(trt_build) -> onnx.ModelProto:
    return onnx.load(str(trt_build("fp16").outputs["precision"].path("model.onnx")))


def test_real_fp16_graph_keeps_sensitive_ops_in_fp32(fp16_model: onnx.ModelProto) -> None:
    onnx.checker.check_model(fp16_model, full_check=True)
    types = tensor_types(fp16_model)
    sensitive = [node for node in fp16_model.graph.node if node.op_type in FP32_OPS]
    assert {node.op_type for node in sensitive} >= {"LayerNormalization", "Softmax"}
    assert len([n for n in sensitive if n.op_type == "LayerNormalization"]) == 13
    for node in sensitive:
        float_types = {types[name] for name in [*node.input, *node.output] if name and types.get(name) != TensorProto.INT64}
        assert float_types == {TensorProto.FLOAT}, f"{node.name} ({node.op_type}) must stay FP32: {float_types}"
    matmuls = [node for node in fp16_model.graph.node if node.op_type == "MatMul"]
    assert len(matmuls) == 48
    assert all(types[node.output[0]] == TensorProto.FLOAT16 for node in matmuls), "MatMuls compute in FP16"
    weights = [t for t in fp16_model.graph.initializer if len(t.dims) == 2 and t.dims[0] * t.dims[1] >= 384 * 384]
    assert weights and all(t.data_type == TensorProto.FLOAT16 for t in weights)
    io_types = {v.type.tensor_type.elem_type for v in fp16_model.graph.output}
    assert io_types == {TensorProto.FLOAT}, "graph outputs keep FP32: a drop-in replacement"


def test_simulated_fp16_matmul_runs_fp32_kernels_on_every_x86_host(tmp_path) -> None:
    """Why the simulated FP16 bounds hold on AVX2 and AVX-512 hosts alike: ONNX Runtime's CPU provider has no
    x86 FP16 MatMul kernel, so it casts the FP16 inputs to FP32, multiplies in FP32 and casts back (no
    ISA-dependent FP16 or integer arithmetic); the result is the FP32 product of the FP16-rounded inputs."""
    from engines.ort_session import create_session

    k = 4096
    graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "g",
                              [helper.make_tensor_value_info("a", TensorProto.FLOAT16, [1, k]),
                               helper.make_tensor_value_info("b", TensorProto.FLOAT16, [k, 1])],
                              [helper.make_tensor_value_info("c", TensorProto.FLOAT16, [1, 1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    a = (np.random.default_rng(0).random((1, k)) + 1).astype(np.float16)
    b = np.ones((k, 1), np.float16)
    session = create_session(model.SerializeToString(), simulate_tensorrt=True,
                             optimized_model_path=tmp_path / "optimized.onnx")
    (c,) = session.run(None, {"a": a, "b": b})
    optimized = onnx.load(str(tmp_path / "optimized.onnx"))
    assert [node.op_type for node in optimized.graph.node].count("Cast") == 3
    exact = float(a.astype(np.float64).sum())
    assert abs(float(c[0, 0]) - exact) <= np.spacing(np.float16(exact)), "FP32 accumulation (FP16 would drift)"
