"""quantize: INT8 with Intel Neural Compressor (static QDQ from calibration, or dynamic)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from calibration.batches import load_batches
from engines import neural_compressor
from pipeline.config import BuildConfig
from pipeline.models import ModelInfo
from pipeline.stages.base import Stage, StageContext


class QuantizeStage(Stage):
    name = "quantize"
    outputs = ("model.onnx",)

    def depends_on(self, config: BuildConfig) -> tuple[str, ...]:
        # Dynamic quantization reads no calibration data, so new samples must not re-run it.
        return ("optimize", "calibrate") if config.quantization.mode == "static" else ("optimize",)

    def config_slice(self, config: BuildConfig, model: ModelInfo) -> dict[str, Any]:
        return {"quantization": config.quantization.model_dump(mode="json")}

    def run(self, context: StageContext, out: Path) -> dict[str, Any]:
        settings = context.config.quantization
        fp32 = context.input("optimize").path("model.onnx")
        calibration = None
        if settings.mode == "static":
            calibration = load_batches(context.input("calibrate").path("calibration.safetensors"))
        context.progress.info(f"{settings.mode} INT8, per-channel weights: {settings.per_channel}")
        summary = neural_compressor.quantize(
            fp32, out / "model.onnx", settings, calibration,
            on_batch=lambda done, total: context.progress.batches("calibration", done, total),
        )
        fp32_bytes = fp32.stat().st_size
        int8_bytes = (out / "model.onnx").stat().st_size
        return {
            **summary,
            "fp32_bytes": fp32_bytes,
            "int8_bytes": int8_bytes,
            "size_ratio": round(int8_bytes / fp32_bytes, 4),
        }
