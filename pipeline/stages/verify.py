"""verify: FP32 graph against the quantized graph on held-out inputs; writes the parity reports."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from calibration.batches import load_batches
from engines.onnxruntime_cpu import OrtRunner
from pipeline.config import BuildConfig
from pipeline.models import ModelInfo
from pipeline.parity import compare_output, evaluate, thresholds_for, trt_thresholds_for
from pipeline.reports import PARITY_SCHEMA_VERSION, write_json, write_markdown
from pipeline.stages.base import Stage, StageContext


class VerifyStage(Stage):
    name = "verify"
    outputs = ("parity.json", "parity.md")

    def depends_on(self, config: BuildConfig) -> tuple[str, ...]:
        if config.target == "trt":  # TensorRT's graph derives from the plain export, its FP32 reference
            return ("export", "calibrate", "precision")
        return ("export", "optimize", "calibrate", "quantize")

    def config_slice(self, config: BuildConfig, model: ModelInfo) -> dict[str, Any]:
        slice_ = {"verify": config.verify.model_dump(mode="json"), "task": model.task.name}
        if config.target == "trt":
            slice_["trt_precision"] = config.trt.precision
        return slice_

    @staticmethod
    def _graphs(config: BuildConfig) -> tuple[str, str, str, str]:
        """(reference stage, its description, candidate stage, its description)."""
        if config.target == "trt":
            precision = config.trt.precision
            kind = {"int8": "INT8 Q/DQ", "fp8": "FP8 E4M3 Q/DQ", "fp16": "FP16", "best": "INT8 Q/DQ + FP16"}[precision]
            return ("export", "FP32 ONNX (exported)", "precision",
                    f"TensorRT {kind} ONNX, simulated in ONNX Runtime (CPU)")
        return ("optimize", "FP32 ONNX (optimized)", "quantize", f"INT8 ONNX ({config.quantization.mode})")

    def run(self, context: StageContext, out: Path) -> dict[str, Any]:
        task = context.model.task
        reference_stage, reference_text, candidate_stage, candidate_text = self._graphs(context.config)
        reference_path = context.input(reference_stage).path("model.onnx")
        candidate_path = context.input(candidate_stage).path("model.onnx")
        batches = load_batches(context.input("calibrate").path("heldout.safetensors"))
        outputs = list(task.output_names)
        reference: dict[str, list] = {name: [] for name in outputs}
        candidate: dict[str, list] = {name: [] for name in outputs}
        with OrtRunner(reference_path, output_names=outputs) as ref, OrtRunner(candidate_path, output_names=outputs) as cand:
            for index, batch in enumerate(batches, start=1):
                for name, value in ref.infer(batch).items():
                    reference[name].append(value)
                for name, value in cand.infer(batch).items():
                    candidate[name].append(value)
                context.progress.batches("held-out", index, len(batches))
        masks = [batch["attention_mask"] for batch in batches]
        classification = task.name == "text-classification"
        metrics = {
            name: compare_output(name, reference[name], candidate[name], masks, classification and name == "logits")
            for name in outputs
        }
        if context.config.target == "trt":
            thresholds = trt_thresholds_for(task, context.config.verify, context.config.trt.precision)
        else:
            thresholds = thresholds_for(task, context.config.verify)
        checks = evaluate(metrics, thresholds)
        failures = [check.description for check in checks if not check.passed]
        calibrate = context.input("calibrate").metrics
        report = {
            "schema_version": PARITY_SCHEMA_VERSION,
            "status": "fail" if failures else "pass",
            "task": task.name,
            "primary_output": task.primary_output,
            "reference": {"description": reference_text, "sha256": context.input(reference_stage).files["model.onnx"]},
            "candidate": {"description": candidate_text, "sha256": context.input(candidate_stage).files["model.onnx"]},
            "heldout": {"source": calibrate["source"], "samples": calibrate["heldout_samples"], "batches": len(batches)},
            "outputs": {name: m.to_dict() for name, m in metrics.items()},
            "checks": [vars(check) for check in checks],
            "failures": failures,
            "export_parity": context.input("export").metrics["torch_parity_max_abs"],
        }
        write_json(report, out / "parity.json")
        write_markdown(report, out / "parity.md")
        primary = metrics[task.primary_output]
        context.progress.info(
            f"{task.primary_output}: cosine mean {primary.cosine_mean:.4f}, max abs {primary.max_abs:.3g}"
            + (f"; FAILED: {'; '.join(failures)}" if failures else "; passed")
        )
        return {"passed": not failures, "failures": failures, "primary": primary.to_dict()}
