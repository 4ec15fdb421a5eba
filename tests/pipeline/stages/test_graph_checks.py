"""Every stage checks the graphs it writes (ONNX checker, ONNX Runtime load) before they are cached."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx
import pytest
from onnx import TensorProto, helper


def _save(path: Path, nodes, inputs, outputs, domains=()) -> Path:
    graph = helper.make_graph(nodes, "g", inputs, outputs)
    opsets = [helper.make_opsetid("", 17)] + [helper.make_opsetid(d, 1) for d in domains]
    onnx.save(helper.make_model(graph, opset_imports=opsets), str(path))
    return path


def _float(name: str):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, ["n"])


def test_a_dynamic_quantize_of_an_empty_input_is_refused(tmp_path: Path) -> None:
    """What the INT8 DistilBERT graph held: DynamicQuantizeLinear reading '' (it failed later, in verify)."""
    from engines.onnx_io import check_graph
    from pipeline.core.errors import EngineError

    bad = _save(tmp_path / "bad.onnx", [helper.make_node("DynamicQuantizeLinear", [""], ["q", "s", "z"])], [],
                [helper.make_tensor_value_info("q", TensorProto.UINT8, ["n"])])
    with pytest.raises(EngineError, match="not valid ONNX"):
        check_graph(bad)
    good = _save(tmp_path / "good.onnx", [helper.make_node("Relu", ["x"], ["y"])], [_float("x")], [_float("y")])
    check_graph(good)


def test_a_graph_onnx_runtime_cannot_load_is_refused(tmp_path: Path) -> None:
    from engines.onnx_io import check_graph
    from pipeline.core.errors import EngineError

    unknown = _save(tmp_path / "unknown.onnx", [helper.make_node("NoSuchKernel", ["x"], ["y"], domain="com.microsoft")],
                    [_float("x")], [_float("y")], domains=["com.microsoft"])
    with pytest.raises(EngineError, match="ONNX Runtime cannot load"):
        check_graph(unknown)


def test_the_stage_that_wrote_an_invalid_graph_fails_and_nothing_is_cached(tmp_path: Path) -> None:
    from pipeline.core.errors import StageError
    from pipeline.stages.base import Stage

    class WritesBadGraph(Stage):
        name = "quantize"
        outputs = ("model.onnx",)

        def run(self, context: Any, out: Path) -> dict[str, Any]:
            _save(out / "model.onnx", [helper.make_node("DynamicQuantizeLinear", [""], ["q", "s", "z"])], [],
                  [helper.make_tensor_value_info("q", TensorProto.UINT8, ["n"])])
            return {}

    stage = WritesBadGraph()
    stage.run(None, tmp_path)
    with pytest.raises(StageError, match="stage 'quantize'.*model.onnx is not valid ONNX"):
        stage.ensures(tmp_path)


def test_optimizer_contrib_ops_get_their_domain_declared() -> None:
    from engines.onnx_io import declare_domains

    model = helper.make_model(helper.make_graph([helper.make_node("FastGelu", ["x"], ["y"], domain="com.microsoft")],
                                                "g", [_float("x")], [_float("y")]),
                              opset_imports=[helper.make_opsetid("", 17)])
    declare_domains(model)
    assert {opset.domain for opset in model.opset_import} == {"", "com.microsoft"}
    onnx.checker.check_model(model, full_check=True)


def test_embed_layer_norm_without_segment_inputs_stays_fp32() -> None:
    """onnx-neural-compressor quantizes the empty segment input of such a node (DistilBERT): it is excluded."""
    from engines.cpu.neural_compressor import unquantizable_nodes

    inputs = ["ids", "", "word", "position", "", "gamma", "beta", "mask"]
    with_segments = ["ids", "segments", "word", "position", "segment_table", "gamma", "beta", "mask"]
    nodes = [helper.make_node("EmbedLayerNormalization", inputs, ["a", "b"], name="distilbert", domain="com.microsoft"),
             helper.make_node("EmbedLayerNormalization", with_segments, ["c", "d"], name="bert", domain="com.microsoft")]
    model = helper.make_model(helper.make_graph(nodes, "g", [], []))
    assert unquantizable_nodes(model) == ["distilbert"]
