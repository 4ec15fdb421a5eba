"""One parity run, shared by the verify stage and `pipeline verify BUILD_DIR`: inputs in, report out."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from calibration.batches import load_batches, to_batches
from pipeline.config import BuildConfig
from pipeline.core.errors import InputError
from pipeline.core.progress import Progress
from pipeline.models.registry import ModelInfo
from pipeline.parity import policy
from pipeline.parity.engine import ParityResult, measure, run_pair
from pipeline.parity.report import Artifact, Candidate, Evaluation, Heldout, ParityReport, make_report


@dataclass
class ParityInputs:
    """Files a parity run reads, and how the report names them."""

    reference: Path  # the optimized FP32 ONNX graph
    candidate: Path  # any built artifact
    heldout: Path  # heldout.safetensors from calibrate
    reference_sha256: str
    candidate_sha256: str
    candidate_description: str
    heldout_source: str
    heldout_samples: int
    tokenizer: Optional[Path] = None  # needed only with an evaluation file
    export_parity: dict[str, float] = field(default_factory=dict)  # ONNX Runtime against PyTorch (export stage)
    candidate_fp32_nodes: list[str] = field(default_factory=list)  # kept in FP32 (--exclude, fallback search)
    reference_description: str = "FP32 ONNX (optimized)"
    # The reference is a Q/DQ graph run as exact fake quantization (a QAT model's own forward), whatever the target.
    fake_quant_reference: bool = False


def _labelled_outputs(inputs: ParityInputs, config: BuildConfig, model: ModelInfo,
                      progress: Progress) -> tuple[Optional[np.ndarray], Optional[tuple], Optional[Evaluation]]:
    eval_file = config.verify.eval_file
    if not eval_file:
        return None, None, None
    if model.task.name != "text-classification":
        raise InputError(f"verify.eval_file applies to text-classification models, not {model.task.name}")
    from pipeline.models.registry import tokenizer_from
    from pipeline.parity.eval_data import read_labelled

    texts, labels = read_labelled(Path(eval_file), model.config)
    tokenizer = tokenizer_from(inputs.tokenizer, model.trust_remote_code)
    batches = to_batches(texts, tokenizer, model.architecture.input_names,
                         config.calibration.batch_size, config.calibration.max_length)
    progress.info(f"labelled evaluation: {len(texts)} samples from {eval_file}")
    reference, candidate = run_pair(inputs.reference, inputs.candidate, batches, ["logits"],
                                    simulate_tensorrt=config.target == "trt")
    outputs = ({"logits": np.concatenate(reference["logits"])}, {"logits": np.concatenate(candidate["logits"])})
    return labels, outputs, Evaluation(file=Path(eval_file).name, samples=len(texts))


def run_parity(inputs: ParityInputs, config: BuildConfig, model: ModelInfo, progress: Progress,
               gates: Optional[policy.Gates] = None) -> ParityReport:
    """Measure, gate (the build's gates unless `gates` are given), localize when asked or failing; returns
    the parity report."""
    task = model.task
    settings = config.verify
    batches = load_batches(inputs.heldout)
    reference, candidate = run_pair(
        inputs.reference, inputs.candidate, batches, task.output_names,
        on_batch=lambda done, total: progress.batches("held-out", done, total),
        simulate_tensorrt=config.target == "trt", fake_quant_reference=inputs.fake_quant_reference,
    )
    labels, labelled, evaluation = _labelled_outputs(inputs, config, model, progress)
    thresholds = policy.thresholds(config, task) if gates is None else gates
    masks = [batch.get("attention_mask") for batch in batches]
    result = measure(task, reference, candidate, masks, thresholds, labels, labelled)
    localization = None
    if settings.localize == "always" or (settings.localize == "on-failure" and result.failures):
        from pipeline.parity.localize import localize

        progress.info(f"localizing: every layer of both graphs on {settings.localize_batches} held-out batches")
        localization = localize(inputs.reference, inputs.candidate, batches[: settings.localize_batches],
                                simulate_tensorrt=config.target == "trt")
    return build_report(inputs, config, model, result, thresholds, len(batches), evaluation, localization)


def build_report(inputs: ParityInputs, config: BuildConfig, model: ModelInfo, result: ParityResult,
                 thresholds: dict[tuple[str, str], float], batches: int,
                 evaluation: Optional[Evaluation], localization: Optional[dict[str, Any]]) -> ParityReport:
    return make_report(
        family=policy.family_of(model.task),
        target=config.target,
        task=model.task.name,
        primary_output=model.task.primary_output,
        reference=Artifact(description=inputs.reference_description, sha256=inputs.reference_sha256),
        candidate=Candidate(description=inputs.candidate_description, sha256=inputs.candidate_sha256,
                            fp32_nodes=inputs.candidate_fp32_nodes),
        heldout=Heldout(source=inputs.heldout_source, samples=inputs.heldout_samples, batches=batches),
        thresholds=thresholds,
        outputs={name: metrics.to_dict() for name, metrics in result.metrics.items()},
        checks=result.checks,
        export_parity=inputs.export_parity,
        evaluation=evaluation,
        localization=localization,
    )
