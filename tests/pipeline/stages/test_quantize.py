from __future__ import annotations

from collections import Counter
from pathlib import Path

import onnx

from calibration.batches import load_batches
from engines import neural_compressor
from pipeline.config import QuantizationConfig


def test_dynamic_int8_is_small_and_integer(default_build) -> None:
    quantize = default_build.outputs["quantize"]
    assert quantize.metrics["size_ratio"] <= 0.30
    ops = Counter(node.op_type for node in onnx.load(str(quantize.path("model.onnx"))).graph.node)
    assert ops["MatMulInteger"] + ops["QAttention"] >= 18
    assert ops["DynamicQuantizeLinear"] > 0


def test_static_int8_places_qdq_from_calibration(default_build, tmp_path: Path) -> None:
    fp32 = default_build.outputs["optimize"].path("model.onnx")
    calibration = load_batches(default_build.outputs["calibrate"].path("calibration.safetensors"))[:4]
    seen = []
    settings = QuantizationConfig(mode="static", exclude=["Attention"])
    summary = neural_compressor.quantize(
        fp32, tmp_path / "static.onnx", settings, calibration, on_batch=lambda done, total: seen.append(done)
    )
    model = onnx.load(str(tmp_path / "static.onnx"))
    ops = Counter(node.op_type for node in model.graph.node)
    assert ops["QuantizeLinear"] > 0 and ops["DequantizeLinear"] > 0
    assert ops["Attention"] == 6, "excluded op type stays FP32"
    assert len(summary["excluded_nodes"]) == 6
    assert seen, "calibration batches were read"
    assert not list(tmp_path.glob("*.onnx_data")), "one self-contained file"
