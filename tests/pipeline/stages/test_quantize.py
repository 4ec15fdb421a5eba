from __future__ import annotations

from collections import Counter
from pathlib import Path

import onnx
import pytest

from calibration.ranges import RangeCache
from engines.cpu import neural_compressor
from pipeline.config import QuantizationConfig
from pipeline.core.errors import EngineError
from pipeline.stages.calibrate import CACHE_FILE


def test_dynamic_int8_is_small_and_integer(default_build) -> None:
    quantize = default_build.outputs["quantize"]
    assert quantize.metrics["size_ratio"] <= 0.30
    ops = Counter(node.op_type for node in onnx.load(str(quantize.path("model.onnx"))).graph.node)
    assert ops["MatMulInteger"] + ops["QAttention"] >= 18
    assert ops["DynamicQuantizeLinear"] > 0


def test_static_int8_places_qdq_from_cached_ranges(default_build, tmp_path: Path) -> None:
    fp32 = default_build.outputs["optimize"].path("model.onnx")
    ranges = RangeCache.load(default_build.outputs["calibrate"].path(CACHE_FILE)).ranges
    settings = QuantizationConfig(mode="static", exclude=["Attention"])
    summary = neural_compressor.quantize(fp32, tmp_path / "static.onnx", settings, ranges=ranges)
    model = onnx.load(str(tmp_path / "static.onnx"))
    ops = Counter(node.op_type for node in model.graph.node)
    assert ops["QuantizeLinear"] > 0 and ops["DequantizeLinear"] > 0
    assert ops["Attention"] == 6, "excluded op type stays FP32"
    assert len(summary["excluded_nodes"]) == 6
    assert not list(tmp_path.glob("*.onnx_data")), "one self-contained file"
    # The scale of the first MatMul's activation is the cached range's, as the quantizer computes it.
    first_matmul = next(node for node in onnx.load(str(fp32)).graph.node if node.op_type == "MatMul")
    low, high = ranges[first_matmul.input[0]]
    scales = {init.name: onnx.numpy_helper.to_array(init) for init in model.graph.initializer}
    scale = scales[f"{first_matmul.input[0]}_scale"]
    assert abs(float(scale) - (max(high, 0) - min(low, 0)) / 255) < 1e-6


def test_a_cache_from_another_graph_is_refused(default_build, tmp_path: Path) -> None:
    fp32 = default_build.outputs["optimize"].path("model.onnx")
    ranges = {"some/other/tensor": (-1.0, 1.0)}
    with pytest.raises(EngineError, match=r"calibration cache has no range for \d+ tensors"):
        neural_compressor.quantize(fp32, tmp_path / "static.onnx", QuantizationConfig(mode="static"), ranges=ranges)
