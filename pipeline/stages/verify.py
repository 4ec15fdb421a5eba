"""verify: FP32 graph against the quantized graph on held-out inputs; writes the parity reports."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from calibration.batches import load_batches
from engines.onnxruntime_cpu import OrtRunner
from pipeline.config import BuildConfig
from pipeline.models import ModelInfo
from pipeline.parity import compare_output, evaluate, thresholds_for
from pipeline.reports import PARITY_SCHEMA_VERSION, write_json, write_markdown
from pipeline.stages.base import Stage, StageContext


class VerifyStage(Stage):
    name = "verify"
    outputs = ("parity.json", "parity.md")

    def depends_on(self, config: BuildConfig) -> tuple[str, ...]:
        return ("export", "optimize", "calibrate", "quantize")

    def config_slice(self, config: BuildConfig, model: ModelInfo) -> dict[str, Any]:
        return {"verify": config.verify.model_dump(mode="json"), "task": model.task.name}

    def run(self, context: StageContext, out: Path) -> dict[str, Any]:
        task = context.model.task
        reference_path = context.input("optimize").path("model.onnx")
        candidate_path = context.input("quantize").path("model.onnx")
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
        checks = evaluate(metrics, thresholds_for(task, context.config.verify))
        failures = [check.description for check in checks if not check.passed]
        calibrate = context.input("calibrate").metrics
        report = {
            "schema_version": PARITY_SCHEMA_VERSION,
            "status": "fail" if failures else "pass",
            "task": task.name,
            "primary_output": task.primary_output,
            "reference": {"description": "FP32 ONNX (optimized)", "sha256": context.input("optimize").files["model.onnx"]},
            "candidate": {
                "description": f"INT8 ONNX ({context.config.quantization.mode})",
                "sha256": context.input("quantize").files["model.onnx"],
            },
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
