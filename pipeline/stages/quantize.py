"""quantize: INT8 with Intel Neural Compressor (static from the calibration cache, or dynamic), with
an optional accuracy-driven fallback of sensitive nodes to FP32."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from calibration.batches import Batch, load_batches
from calibration.ranges import RangeCache
from engines import fallback as cpu_fallback
from engines.cpu import neural_compressor
from engines.ort_session import OrtRunner
from pipeline.config import BuildConfig
from pipeline.core.errors import StageError
from pipeline.models.registry import ModelInfo, TaskSpec
from pipeline.parity.metrics import compare_output
from pipeline.stages.base import Stage, StageContext
from pipeline.stages.calibrate import CACHE_FILE
from pipeline.stages.facts import QuantizeFacts


def tuning_metric(task: TaskSpec, fp32: Path, batches: Sequence[Batch]) -> Callable[[Path], float]:
    """Agreement with FP32 on the tuning batches: mean cosine (embeddings) or top-1 agreement (classifiers)."""
    output = task.primary_output
    with OrtRunner(fp32, output_names=[output]) as reference:
        expected = [reference.infer(batch)[output] for batch in batches]
    masks = [batch["attention_mask"] for batch in batches]  # per-token outputs: real tokens only
    classification = task.classifier

    def evaluate(candidate_path: Path) -> float:
        with OrtRunner(candidate_path, output_names=[output]) as candidate:
            actual = [candidate.infer(batch)[output] for batch in batches]
        metrics = compare_output(output, expected, actual, masks, classification)
        return float(metrics.top1_agreement if classification else metrics.cosine_mean)

    return evaluate


class QuantizeStage(Stage):
    name = "quantize"
    facts = QuantizeFacts
    version = 6  # 6: dynamic INT8 moves outlier channels first; 5: AVX2 graphs hold uint8 weights; 4: weight range
    outputs = ("model.onnx",)

    def depends_on(self, config: BuildConfig) -> tuple[str, ...]:
        # Dynamic quantization without fallback, SmoothQuant or outlier moving reads no samples: new samples must not re-run it.
        settings = config.quantization
        needs_samples = (settings.mode == "static" or settings.fallback == "auto" or settings.smoothquant
                         or (settings.mode == "dynamic" and settings.outlier_threshold > 0))
        return ("optimize", "calibrate") if needs_samples else ("optimize",)

    def config_slice(self, config: BuildConfig, model: ModelInfo) -> dict[str, Any]:
        from pipeline.core.host import resolved_isa

        # The deployment ISA decides the weight type (uint8 on AVX2): --cpu-isa auto means this host's, so the
        # resolved ISA is keyed too (an AVX2 host never reuses a VNNI host's graph).
        return {"quantization": config.quantization.model_dump(mode="json"), "task": model.task.name,
                "weight_isa": resolved_isa(config.quantization.cpu_isa)}

    def run(self, context: StageContext, out: Path) -> dict[str, Any]:
        settings = context.config.quantization
        fp32 = context.input("optimize")
        fp32_path = fp32.path("model.onnx")
        ranges: Optional[dict[str, tuple[float, float]]] = None
        calibration: Optional[list[Batch]] = None
        summary_extra: dict[str, Any] = {}
        if "calibrate" in self.depends_on(context.config):
            calibration = load_batches(context.input("calibrate").path("calibration.safetensors"))
        if settings.mode == "static" and not settings.smoothquant:
            cache = RangeCache.load(context.input("calibrate").path(CACHE_FILE))
            if cache.fingerprint.get("model") != fp32.files["model.onnx"]:
                raise StageError(self.name, "the calibration cache was computed on another FP32 graph; re-run calibrate")
            ranges = cache.ranges
            summary_extra = {"calibration_method": cache.method, "calibration_percentile": cache.percentile}
            context.progress.info(f"static INT8 from {len(ranges)} cached {cache.method} ranges")
        context.progress.info(f"{settings.mode} INT8, per-channel weights: {settings.per_channel}")
        summaries: dict[Path, dict[str, object]] = {}
        prepared: Optional[neural_compressor.DynamicInput] = None

        def on_batch(done: int, total: int) -> None:
            context.progress.batches("calibration", done, total)

        def quantize(extra_exclusions: list[str], target: Path) -> None:
            summaries[target] = neural_compressor.quantize(
                fp32_path, target, settings, ranges, calibration, extra_exclusions, on_batch, prepared)

        fallback = None
        if settings.fallback == "auto" and calibration:
            # Half the calibration samples: enough to rank nodes, and each trial stays quick.
            evaluate = tuning_metric(context.model.task, fp32_path, calibration[: max(1, len(calibration) // 2)])
            trials = out / "fallback-trials"
            trials.mkdir()
            reference = fp32_path
            if settings.mode == "dynamic":  # rewrite once for every trial, and rank nodes against the rewrite
                prepared = neural_compressor.dynamic_input(fp32_path, trials, settings, calibration, on_batch)
                reference = prepared.path
            chosen, fallback = cpu_fallback.search(
                reference, quantize, evaluate, settings.tolerable_loss,
                settings.max_fallback_nodes, trials, context.progress.info,
            )
            os.replace(chosen, out / "model.onnx")
            summary = summaries[chosen]
            shutil.rmtree(trials)
        else:
            quantize([], out / "model.onnx")
            summary = summaries[out / "model.onnx"]
        fp32_bytes = fp32_path.stat().st_size
        int8_bytes = (out / "model.onnx").stat().st_size
        return {
            **summary,
            **summary_extra,
            "fallback": fallback.to_dict() if fallback else None,
            "fp32_bytes": fp32_bytes,
            "int8_bytes": int8_bytes,
            "size_ratio": round(int8_bytes / fp32_bytes, 4),
        }
