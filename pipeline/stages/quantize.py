"""quantize: INT8 with Intel Neural Compressor (static QDQ from the calibration cache, or dynamic)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from calibration.ranges import RangeCache
from engines import neural_compressor
from pipeline.config import BuildConfig
from pipeline.errors import StageError
from pipeline.models import ModelInfo
from pipeline.stages.base import Stage, StageContext
from pipeline.stages.calibrate import CACHE_FILE


class QuantizeStage(Stage):
    name = "quantize"
    version = 2
    outputs = ("model.onnx",)

    def depends_on(self, config: BuildConfig) -> tuple[str, ...]:
        # Dynamic quantization reads no calibration data, so new samples must not re-run it.
        return ("optimize", "calibrate") if config.quantization.mode == "static" else ("optimize",)

    def config_slice(self, config: BuildConfig, model: ModelInfo) -> dict[str, Any]:
        return {"quantization": config.quantization.model_dump(mode="json")}

    def run(self, context: StageContext, out: Path) -> dict[str, Any]:
        settings = context.config.quantization
        fp32 = context.input("optimize")
        ranges = None
        summary_extra: dict[str, Any] = {}
        if settings.mode == "static":
            cache = RangeCache.load(context.input("calibrate").path(CACHE_FILE))
            if cache.fingerprint.get("model") != fp32.files["model.onnx"]:
                raise StageError(self.name, "the calibration cache was computed on another FP32 graph; re-run calibrate")
            ranges = cache.ranges
            summary_extra = {"calibration_method": cache.method, "calibration_percentile": cache.percentile}
            context.progress.info(f"static INT8 from {len(ranges)} cached {cache.method} ranges")
        context.progress.info(f"{settings.mode} INT8, per-channel weights: {settings.per_channel}")
        summary = neural_compressor.quantize(
            fp32.path("model.onnx"), out / "model.onnx", settings.mode, settings.per_channel, settings.exclude, ranges
        )
        fp32_bytes = fp32.path("model.onnx").stat().st_size
        int8_bytes = (out / "model.onnx").stat().st_size
        return {
            **summary,
            **summary_extra,
            "fp32_bytes": fp32_bytes,
            "int8_bytes": int8_bytes,
            "size_ratio": round(int8_bytes / fp32_bytes, 4),
        }
