"""precision (target trt): the plain exported graph with its TensorRT precision written into it.

The ONNX Runtime-fused graph of the optimize stage holds contrib ops (Attention,
SkipLayerNormalization) that TensorRT's ONNX parser does not know, so the TensorRT path
starts from the exported graph, which holds standard ONNX ops only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from calibration.batches import load_batches
from engines.trt.precision import CENTERED_COSINE, build_precision_graph
from pipeline.config import BuildConfig
from pipeline.models.registry import ModelInfo
from pipeline.parity.policy import trt_min_cosine
from pipeline.stages.base import Stage, StageContext
from pipeline.stages.facts import ExportFacts, PrecisionFacts
from pipeline.stages.llm_trt import PERPLEXITY_RATIO, PRECISION_CHUNKS, prefill_feeds
from pipeline.stages.llm_trt import fallback_target as llm_fallback_target

FALLBACK_MARGIN = 0.003  # calibration-set cosine is in-sample: aim this much above the held-out gate


def fallback_target(config: BuildConfig, model: ModelInfo) -> float:
    if model.is_decoder:
        return llm_fallback_target(config)
    if config.trt.fallback_target is not None:
        return config.trt.fallback_target
    return min(trt_min_cosine(config, model.task) + FALLBACK_MARGIN, 1.0)


class PrecisionStage(Stage):
    name = "precision"
    facts = PrecisionFacts
    version = 4  # 4: classifiers held to the cosine of centered logits; 3: decoder LLMs; the summary names how nodes were ranked
    outputs = ("model.onnx", "precision.json")

    def depends_on(self, config: BuildConfig) -> tuple[str, ...]:
        return ("export", "calibrate")

    def config_slice(self, config: BuildConfig, model: ModelInfo) -> dict[str, Any]:
        trt = config.trt
        return {
            "precision": trt.precision,
            "calibration_method": trt.calibration_method,
            "percentile": trt.percentile,
            "max_fallback_nodes": trt.max_fallback_nodes,
            "fallback_target": fallback_target(config, model),
            "primary_output": model.task.primary_output,
            "qdq_ops": list(model.architecture.trt_qdq_ops),
            "qdq_weights_only": model.architecture.trt_qdq_weights_only,
        }

    def run(self, context: StageContext, out: Path) -> dict[str, Any]:
        settings = context.config.trt
        calibration = context.input("calibrate").path("calibration.safetensors")
        if context.model.is_decoder:  # prefill feeds of real text; held to the perplexity gate
            batches = prefill_feeds(calibration, context.facts("export", ExportFacts).kv_cache.layout, PRECISION_CHUNKS)
            extra: dict[str, Any] = {"score": PERPLEXITY_RATIO}
        else:
            batches, extra = load_batches(calibration), {"score": CENTERED_COSINE} if context.model.task.classifier else {}
        summary = build_precision_graph(
            context.input("export").path("model.onnx"),
            out / "model.onnx",
            settings.precision,
            batches,
            context.model.task.primary_output,
            fallback_target(context.config, context.model),
            method=settings.calibration_method,
            percentile=settings.percentile,
            max_fallback_nodes=settings.max_fallback_nodes,
            log=context.progress.info,
            qdq_ops=context.model.architecture.trt_qdq_ops,
            qdq_weights_only=context.model.architecture.trt_qdq_weights_only,
            **extra,
        )
        (out / "precision.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        summary.pop("activation_amax", None)  # in precision.json; too long for the manifest
        summary["onnx_bytes"] = (out / "model.onnx").stat().st_size
        return summary
