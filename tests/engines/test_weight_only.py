"""Tiny graphs built in code: the repair of graphs whose Constant nodes Neural Compressor dropped."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from engines.cpu.weight_only import restore_dropped_constants
from pipeline.core.errors import EngineError


def _graph() -> onnx.ModelProto:
    axes = helper.make_node("Constant", [], ["axes"], name="axes_constant",
                            value=helper.make_tensor("axes", TensorProto.INT64, [1], [0]))
    unsqueeze = helper.make_node("Unsqueeze", ["x", "axes"], ["y"], name="unsqueeze")
    graph = helper.make_graph([axes, unsqueeze], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def test_dropped_constant_is_restored_and_the_graph_runs() -> None:
    original = _graph()
    broken = _graph()
    del broken.graph.node[0]
    with pytest.raises(Exception):
        ort.InferenceSession(broken.SerializeToString(), providers=["CPUExecutionProvider"])
    assert restore_dropped_constants(broken, original) == 1
    session = ort.InferenceSession(broken.SerializeToString(), providers=["CPUExecutionProvider"])
    (result,) = session.run(None, {"x": np.array([1.0, 2.0, 3.0], dtype=np.float32)})
    np.testing.assert_array_equal(result, [[1.0, 2.0, 3.0]])  # Unsqueeze on the restored axes [0]
    assert [node.op_type for node in broken.graph.node] == ["Constant", "Unsqueeze"]


def test_a_lost_non_constant_producer_is_a_stage_error() -> None:
    original = _graph()
    broken = _graph()
    original.graph.node[0].op_type = "Identity"  # pretend the lost producer computed something
    del broken.graph.node[0]
    with pytest.raises(EngineError, match="lost the producers of axes"):
        restore_dropped_constants(broken, original)
