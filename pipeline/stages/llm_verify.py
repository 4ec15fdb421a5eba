"""verify (decoder LLMs): perplexity, greedy agreement, logits statistics and decode speed; the parity reports.

The candidate is the weight-only graph (cpu) or the graph carrying its TensorRT precision, run in ONNX Runtime (trt).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.config import BuildConfig
from pipeline.models.registry import ModelInfo
from pipeline.parity import policy
from pipeline.parity.gates import evaluate_values
from pipeline.parity.report import Artifact, Candidate, Heldout, Size, make_report
from pipeline.reports.write import REPORT_FILES, write_reports
from pipeline.stages.base import Stage, StageContext
from pipeline.stages.facts import CalibrationFacts, ExportFacts, PrecisionFacts, VerifyFacts, WeightOnlyFacts


class LlmVerifyStage(Stage):
    name = "verify"
    facts = VerifyFacts
    version = 3  # 3: SNR takes the reference's power as the signal; 2: parity.json is the ParityReport model (schema 3)
    outputs = REPORT_FILES

    def __init__(self, candidate: str = "quantize") -> None:
        # The stage holding the candidate graph: quantize (CPU, 4-bit) or precision (TensorRT, simulated in
        # ONNX Runtime on the CPU); the reference is always the FP32 export.
        self.candidate = candidate

    def depends_on(self, config: BuildConfig) -> tuple[str, ...]:
        return ("export", "calibrate", self.candidate)

    def config_slice(self, config: BuildConfig, model: ModelInfo) -> dict[str, Any]:
        from pipeline.stages.verify import verify_config_slice

        return verify_config_slice(config, model)

    def run(self, context: StageContext, out: Path) -> dict[str, Any]:
        from transformers import AutoTokenizer

        from pipeline.parity.llm import llm_parity
        from pipeline.stages.llm_calibrate import load_chunks

        export, calibrate = context.input("export"), context.input("calibrate")
        candidate = context.input(self.candidate)
        calibration_facts = context.facts("calibrate", CalibrationFacts)
        tokenizer = AutoTokenizer.from_pretrained(str(export.path("tokenizer")))
        texts = json.loads(calibrate.path("prompts.json").read_text())[: context.config.verify.greedy_prompts]
        prompts = [tokenizer(text).input_ids for text in texts]
        heldout = load_chunks(calibrate.path("heldout.safetensors"))
        result = llm_parity(export.path("model.onnx"), candidate.path("model.onnx"), heldout, prompts,
                            threads=0, on_progress=context.progress.info,
                            simulate_tensorrt=context.config.target == "trt", on_batch=context.progress.batches)
        metrics = {**result["metrics"], "histogram": result["histogram"]}
        thresholds = policy.thresholds(context.config, context.model.task)
        checks = evaluate_values({"logits": metrics}, thresholds)
        report = make_report(
            family="decoder",
            target=context.config.target,
            task=context.model.task.name,
            primary_output="logits",
            reference=Artifact(description="FP32 ONNX (KV cache)", sha256=export.files["model.onnx"]),
            candidate=Candidate(description=self._describe_candidate(context),
                                sha256=candidate.files["model.onnx"]),
            heldout=Heldout(source=calibration_facts.source, samples=calibration_facts.heldout_samples,
                            batches=len(heldout)),
            thresholds=thresholds,
            outputs={"logits": metrics},
            checks=checks,
            export_parity=context.facts("export", ExportFacts).torch_parity_max_abs,
            size=_sizes(export.path("model.onnx"), candidate.path("model.onnx")),
        )
        failures = report.failures
        write_reports(report, out)
        m = result["metrics"]
        context.progress.info(
            f"perplexity {m['perplexity_reference']:.3f} -> {m['perplexity_candidate']:.3f} "
            f"({100 * m['perplexity_increase']:+.2f}%), greedy agreement {m['greedy_token_agreement']:.3f}, "
            f"decode {m['decode_tokens_per_s_reference']:.1f} -> {m['decode_tokens_per_s_candidate']:.1f} tok/s"
            + (f"; FAILED: {'; '.join(failures)}" if failures else "; passed"))
        return {"passed": not failures, "failures": failures, "primary": m}


    def _describe_candidate(self, context: StageContext) -> str:
        if self.candidate == "precision":
            from pipeline.stages.verify import TRT_KINDS

            precision = context.facts("precision", PrecisionFacts)
            if precision.graph_precision:
                return f"TensorRT {precision.graph_precision} ONNX, simulated in ONNX Runtime (CPU)"
            kept = precision.kept_higher_precision
            fallback = f", {len(kept)} MatMul(s) kept in {precision.kept_precision}" if kept else ""
            return f"TensorRT {TRT_KINDS[context.config.trt.precision]} ONNX{fallback}, simulated in ONNX Runtime (CPU)"
        q = context.facts(self.candidate, WeightOnlyFacts)
        return (f"{q.algorithm.upper()} {q.bits}-bit weight-only ONNX (block {q.block_size}, zero points "
                f"{q.zero_point}, lm_head {q.lm_head}, embeddings {q.embeddings}"
                + (f" in blocks of {q.vocab_block_size}" if q.vocab_block_size else "")
                + (", one shared vocabulary table" if q.shared_vocabulary else "") + ")")


def _sizes(reference: Path, candidate: Path) -> Size:
    fp32_bytes, quantized_bytes = reference.stat().st_size, candidate.stat().st_size
    return Size(fp32_bytes=fp32_bytes, quantized_bytes=quantized_bytes, ratio=round(quantized_bytes / fp32_bytes, 4))
