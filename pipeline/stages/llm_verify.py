"""verify (decoder LLMs): perplexity, greedy agreement, logits statistics and decode speed; the parity reports.

The candidate is the weight-only graph (cpu) or the graph carrying its TensorRT precision, run in ONNX Runtime (trt).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.config import BuildConfig
from pipeline.models.registry import ModelInfo
from pipeline.parity.gates import evaluate_values, relation
from pipeline.reports.write import REPORT_FILES, write_reports
from pipeline.stages.base import Stage, StageContext

DEFAULT_MAX_PERPLEXITY_INCREASE = 0.08


def llm_thresholds(config: BuildConfig) -> dict[tuple[str, str], float]:
    verify = config.verify
    thresholds = {("logits", "perplexity_increase"): verify.max_perplexity_increase
                  if verify.max_perplexity_increase is not None else DEFAULT_MAX_PERPLEXITY_INCREASE}
    if verify.min_token_agreement is not None:
        thresholds[("logits", "greedy_token_agreement")] = verify.min_token_agreement
    if verify.min_cosine is not None:
        thresholds[("logits", "cosine_mean")] = verify.min_cosine
    return thresholds


class LlmVerifyStage(Stage):
    name = "verify"
    outputs = REPORT_FILES

    def depends_on(self, config: BuildConfig) -> tuple[str, ...]:
        # TensorRT: the graph that carries its precision, simulated in ONNX Runtime on the CPU
        return ("export", "calibrate", "precision" if config.target == "trt" else "quantize")

    def config_slice(self, config: BuildConfig, model: ModelInfo) -> dict[str, Any]:
        from pipeline.stages.verify import verify_config_slice

        return verify_config_slice(config, model)

    def run(self, context: StageContext, out: Path) -> dict[str, Any]:
        from transformers import AutoTokenizer

        from pipeline.parity.llm import llm_parity
        from pipeline.stages.llm_calibrate import load_chunks

        export, calibrate = context.input("export"), context.input("calibrate")
        candidate = context.input(self.depends_on(context.config)[-1])
        tokenizer = AutoTokenizer.from_pretrained(str(export.path("tokenizer")))
        texts = json.loads(calibrate.path("prompts.json").read_text())[: context.config.verify.greedy_prompts]
        prompts = [tokenizer(text).input_ids for text in texts]
        heldout = load_chunks(calibrate.path("heldout.safetensors"))
        result = llm_parity(export.path("model.onnx"), candidate.path("model.onnx"), heldout, prompts,
                            threads=0, on_progress=context.progress.info,
                            simulate_tensorrt=context.config.target == "trt")
        metrics = {**result["metrics"], "histogram": result["histogram"]}
        thresholds = llm_thresholds(context.config)
        checks = evaluate_values({"logits": metrics}, thresholds)
        failures = [check.description for check in checks if not check.passed]
        size = _sizes(export.path("model.onnx"), candidate.path("model.onnx"))
        report = {
            "schema_version": 1,
            "status": "fail" if failures else "pass",
            "task": context.model.task.name,
            "primary_output": "logits",
            "reference": {"description": "FP32 ONNX (KV cache)", "sha256": export.files["model.onnx"]},
            "candidate": {"description": _describe_candidate(context.config, candidate.metrics),
                          "sha256": candidate.files["model.onnx"]},
            "heldout": {"source": calibrate.metrics["source"], "samples": calibrate.metrics["heldout_samples"],
                        "batches": len(heldout)},
            "thresholds": [{"output": o, "metric": m, "threshold": v, "relation": relation(m)}
                           for (o, m), v in sorted(thresholds.items())],
            "outputs": {"logits": metrics},
            "checks": [vars(check) for check in checks],
            "failures": failures,
            "export_parity": dict(sorted(export.metrics["torch_parity_max_abs"].items())),
            "size": size,
            "evaluation": None,
            "localization": None,
        }
        write_reports(report, out)
        m = result["metrics"]
        context.progress.info(
            f"perplexity {m['perplexity_reference']:.3f} -> {m['perplexity_candidate']:.3f} "
            f"({100 * m['perplexity_increase']:+.2f}%), greedy agreement {m['greedy_token_agreement']:.3f}, "
            f"decode {m['decode_tokens_per_s_reference']:.1f} -> {m['decode_tokens_per_s_candidate']:.1f} tok/s"
            + (f"; FAILED: {'; '.join(failures)}" if failures else "; passed"))
        return {"passed": not failures, "failures": failures, "primary": m}


def _describe_candidate(config: BuildConfig, metrics: dict[str, Any]) -> str:
    if config.target == "trt":
        from pipeline.stages.verify import TRT_KINDS

        kept = metrics.get("kept_higher_precision") or []
        fallback = f", {len(kept)} MatMul(s) kept in {metrics.get('kept_precision')}" if kept else ""
        return f"TensorRT {TRT_KINDS[config.trt.precision]} ONNX{fallback}, simulated in ONNX Runtime (CPU)"
    return (f"{metrics['algorithm'].upper()} {metrics['bits']}-bit weight-only ONNX "
            f"(block {metrics['block_size']}, zero points {metrics.get('zero_point', 'int')}, "
            f"lm_head {metrics['lm_head']}, embeddings {metrics['embeddings']})")


def _sizes(reference: Path, candidate: Path) -> dict[str, Any]:
    fp32_bytes, quantized_bytes = reference.stat().st_size, candidate.stat().st_size
    return {"fp32_bytes": fp32_bytes, "quantized_bytes": quantized_bytes, "ratio": round(quantized_bytes / fp32_bytes, 4)}
