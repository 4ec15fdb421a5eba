"""verify: FP32 graph against the quantized graph on held-out inputs; writes the parity reports."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.config import BuildConfig
from pipeline.core.hashing import file_sha256
from pipeline.models.registry import ModelInfo
from pipeline.parity.verification import ParityInputs, run_parity
from pipeline.reports.write import REPORT_FILES, write_reports
from pipeline.stages.base import Stage, StageContext
from pipeline.stages.facts import CalibrationFacts, ExportFacts, PrecisionFacts, QuantizeFacts, VerifyFacts

TRT_KINDS = {"int8": "INT8 Q/DQ", "fp8": "FP8 E4M3 Q/DQ", "fp16": "FP16", "best": "INT8 Q/DQ + FP16"}


def parity_inputs(context: StageContext, reference_stage: str = "optimize", candidate_stage: str = "quantize") -> ParityInputs:
    export, calibrate = context.input("export"), context.input("calibrate")
    reference, candidate = context.input(reference_stage), context.input(candidate_stage)
    if candidate_stage == "precision":  # TensorRT's graph derives from the plain export, its FP32 reference
        reference_text = "FP32 ONNX (exported)"
        kind = TRT_KINDS[context.config.trt.precision]
        candidate_text = f"TensorRT {kind} ONNX, simulated in ONNX Runtime (CPU)"
        fp32_nodes = list(context.facts(candidate_stage, PrecisionFacts).kept_higher_precision)
    else:
        reference_text = "FP32 ONNX (optimized)"
        quantized = context.facts(candidate_stage, QuantizeFacts)
        candidate_text = _describe_candidate(context.config, quantized)
        fp32_nodes = list(quantized.excluded_nodes)
    calibration = context.facts("calibrate", CalibrationFacts)
    return ParityInputs(
        reference=reference.path("model.onnx"),
        candidate=candidate.path("model.onnx"),
        heldout=calibrate.path("heldout.safetensors"),
        reference_sha256=reference.files["model.onnx"],
        candidate_sha256=candidate.files["model.onnx"],
        candidate_description=candidate_text,
        candidate_fp32_nodes=fp32_nodes,
        reference_description=reference_text,
        heldout_source=calibration.source,
        heldout_samples=calibration.heldout_samples,
        tokenizer=export.path("tokenizer"),
        export_parity=context.facts("export", ExportFacts).torch_parity_max_abs,
    )


def _describe_candidate(config: BuildConfig, quantized: QuantizeFacts) -> str:
    settings = config.quantization
    parts = [settings.mode]
    if settings.mode == "static":
        parts.append(settings.format.upper())
    if settings.smoothquant:
        parts.append(f"SmoothQuant alpha {settings.smoothquant_alpha}")
    elif settings.mode == "dynamic" and settings.outlier_threshold > 0:
        parts.append(f"outlier channels moved past {settings.outlier_threshold:g}x the median")
    kept = len(quantized.excluded_nodes)
    if kept:
        chosen = " by the fallback search" if quantized.fallback else ""
        parts.append(f"{kept} node(s) kept in FP32{chosen}")
    return f"INT8 ONNX ({', '.join(parts)})"


class VerifyStage(Stage):
    name = "verify"
    facts = VerifyFacts
    version = 5  # 5: SNR takes the reference's power as the signal (it took the candidate's); 4: parity.json is the ParityReport model (schema 3); 3: candidate names its FP32 nodes; 2: reports gained relative-error statistics, SNR, histograms, localization, HTML and JUnit
    outputs = REPORT_FILES

    def __init__(self, reference: str = "optimize", candidate: str = "quantize") -> None:
        # The stages holding the FP32 reference graph and the candidate (the plan says which).
        self.reference, self.candidate = reference, candidate

    def depends_on(self, config: BuildConfig) -> tuple[str, ...]:
        return tuple(dict.fromkeys(("export", self.reference, "calibrate", self.candidate)))

    def config_slice(self, config: BuildConfig, model: ModelInfo) -> dict[str, Any]:
        return verify_config_slice(config, model)

    def external_inputs(self, config: BuildConfig, model: ModelInfo) -> dict[str, str]:
        eval_file = config.verify.eval_file
        if eval_file and Path(eval_file).is_file():
            return {"eval_file": file_sha256(Path(eval_file))}
        return {}

    def run(self, context: StageContext, out: Path) -> dict[str, Any]:
        report = run_parity(parity_inputs(context, self.reference, self.candidate), context.config, context.model, context.progress)
        write_reports(report, out)
        task = context.model.task
        primary = report.outputs[task.primary_output]
        failures = report.failures
        context.progress.info(
            f"{task.primary_output}: cosine mean {primary.cosine_mean:.4f}, max abs {primary.max_abs:.3g}"
            + (f"; FAILED: {'; '.join(failures)}" if failures else "; passed")
        )
        return {"passed": not failures, "failures": failures, "primary": primary.values()}


def verify_config_slice(config: BuildConfig, model: ModelInfo) -> dict[str, Any]:
    """What a verify stage reads of the configuration (encoders and decoder LLMs alike)."""
    slice_ = {"verify": config.verify.model_dump(mode="json"), "task": model.task.name}
    if config.target == "trt":
        slice_["trt_precision"] = config.trt.precision
    return slice_
