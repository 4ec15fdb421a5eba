from __future__ import annotations

from collections import Counter

import onnx


def test_transformer_fusions_match(default_build) -> None:
    optimize = default_build.outputs["optimize"]
    assert optimize.metrics["fusions"] == {
        "EmbedLayerNormalization": 1, "Attention": 6, "BiasGelu": 6, "SkipLayerNormalization": 12,
    }
    model = onnx.load(str(optimize.path("model.onnx")))
    ops = Counter(node.op_type for node in model.graph.node)
    assert ops["Attention"] == 6
    names = [node.name for node in model.graph.node]
    assert all(names) and len(names) == len(set(names)), "every node needs a unique name"
    assert max(optimize.metrics["export_parity_max_abs"].values()) < 1e-3
