from __future__ import annotations

from collections import Counter

import onnx


def test_transformer_fusions_match(default_build) -> None:
    optimize = default_build.outputs["optimize"]
    assert optimize.metrics["fusions"] == {
        "EmbedLayerNormalization": 1, "Attention": 6, "BiasGelu": 6, "LayerNormalization": 12,
    }
    model = onnx.load(str(optimize.path("model.onnx")))
    ops = Counter(node.op_type for node in model.graph.node)
    assert ops["Attention"] == 6
    names = [node.name for node in model.graph.node]
    assert all(names) and len(names) == len(set(names)), "every node needs a unique name"
    # Its outputs against transformers' own model: tests/pipeline/stages/test_export.py (both FP32 graphs).


def test_sessions_keep_the_residual_adds_unfused(default_build, tmp_path) -> None:
    """ONNX Runtime's slow SkipLayerNormalization kernel stays out of the graph and out of our sessions."""
    import json

    from engines.ort_session import create_session

    runtime = json.loads((default_build.build_dir / "manifest.json").read_text())["runtime"]
    assert runtime["disabled_optimizers"] == ["SkipLayerNormFusion"]

    for artifact in (default_build.build_dir / "model.fp32.onnx", default_build.build_dir / "model.onnx"):
        saved = tmp_path / f"{artifact.stem}.session.onnx"
        create_session(artifact, threads=1, optimization="extended", optimized_model_path=saved)
        ops = Counter(node.op_type for node in onnx.load(str(saved)).graph.node)
        assert ops["SkipLayerNormalization"] == 0 and ops["LayerNormalization"] == 12, (artifact.name, ops)
