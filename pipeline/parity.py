"""Parity metrics between a reference and a candidate graph, and the thresholds that gate them."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional, Sequence

import numpy as np

from pipeline.config import BuildConfig, VerifyConfig
from pipeline.models import TaskSpec

# Task defaults: (output, metric) -> threshold. Metrics ending in _min are lower bounds.
TASK_THRESHOLDS: dict[str, dict[tuple[str, str], float]] = {
    "feature-extraction": {("sentence_embedding", "cosine_mean"): 0.99},
    "text-classification": {("logits", "top1_agreement"): 0.98},
}
LOWER_BOUNDS = {"cosine_mean", "cosine_min", "top1_agreement"}
# TensorRT target: default gate on the primary output's mean cosine, per precision.
TRT_MIN_COSINE = {"int8": 0.99, "fp8": 0.98, "fp16": 0.999, "best": 0.99}


@dataclass
class OutputMetrics:
    output: str
    rows: int  # samples, or real (unpadded) tokens for per-token outputs
    max_abs: float
    mean_abs: float
    p99_abs: float
    relative_l2: float  # ||cand - ref|| / ||ref||
    cosine_mean: float
    cosine_min: float
    top1_agreement: Optional[float] = None

    def to_dict(self) -> dict[str, object]:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass
class Check:
    output: str
    metric: str
    value: float
    threshold: float
    passed: bool

    @property
    def description(self) -> str:
        relation = ">=" if self.metric in LOWER_BOUNDS else "<="
        return f"{self.output} {self.metric} {self.value:.6g} (required {relation} {self.threshold:g})"


def _rows(array: np.ndarray, mask: Optional[np.ndarray]) -> np.ndarray:
    """2-D view, one row per sample or per real token."""
    if array.ndim == 3 and mask is not None:
        return array[mask.astype(bool)]
    return array.reshape(array.shape[0], -1)


def compare_output(
    name: str,
    reference: Sequence[np.ndarray],
    candidate: Sequence[np.ndarray],
    masks: Sequence[Optional[np.ndarray]],
    classification: bool = False,
) -> OutputMetrics:
    ref = np.concatenate([_rows(r, m) for r, m in zip(reference, masks)]).astype(np.float64)
    cand = np.concatenate([_rows(c, m) for c, m in zip(candidate, masks)]).astype(np.float64)
    error = np.abs(cand - ref)
    norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(cand, axis=1)
    cosine = np.sum(ref * cand, axis=1) / np.maximum(norms, 1e-12)
    top1 = float(np.mean(ref.argmax(axis=1) == cand.argmax(axis=1))) if classification else None
    return OutputMetrics(
        output=name,
        rows=int(ref.shape[0]),
        max_abs=float(error.max()),
        mean_abs=float(error.mean()),
        p99_abs=float(np.percentile(error, 99)),
        relative_l2=float(np.linalg.norm(cand - ref) / max(np.linalg.norm(ref), 1e-12)),
        cosine_mean=float(cosine.mean()),
        cosine_min=float(cosine.min()),
        top1_agreement=top1,
    )


def thresholds_for(task: TaskSpec, overrides: VerifyConfig) -> dict[tuple[str, str], float]:
    thresholds = dict(TASK_THRESHOLDS[task.name])
    primary = task.primary_output
    if overrides.min_cosine is not None:
        thresholds[(primary, "cosine_mean")] = overrides.min_cosine
    if overrides.max_abs is not None:
        thresholds[(primary, "max_abs")] = overrides.max_abs
    if overrides.min_top1_agreement is not None:
        thresholds[(primary, "top1_agreement")] = overrides.min_top1_agreement
    return thresholds


def trt_thresholds_for(task: TaskSpec, overrides: VerifyConfig, precision: str) -> dict[tuple[str, str], float]:
    """The CPU target's gates, with the primary cosine gate set per TensorRT precision unless overridden."""
    thresholds = thresholds_for(task, overrides)
    if overrides.min_cosine is None and task.name == "feature-extraction":  # classifiers keep their top-1 gate
        thresholds[(task.primary_output, "cosine_mean")] = TRT_MIN_COSINE[precision]
    return thresholds


def trt_min_cosine(config: BuildConfig, task: TaskSpec) -> float:
    """The primary output's cosine the TensorRT graph must keep (for classifiers, a proxy for top-1 agreement)."""
    thresholds = trt_thresholds_for(task, config.verify, config.trt.precision)
    return thresholds.get((task.primary_output, "cosine_mean"), TRT_MIN_COSINE[config.trt.precision])


def evaluate(metrics: dict[str, OutputMetrics], thresholds: dict[tuple[str, str], float]) -> list[Check]:
    """Every check, failing or not: a failed build names all of its failures at once."""
    checks = []
    for (output, metric), threshold in sorted(thresholds.items()):
        value = getattr(metrics[output], metric)
        if value is None:
            continue
        passed = value >= threshold if metric in LOWER_BOUNDS else value <= threshold
        checks.append(Check(output, metric, float(value), float(threshold), bool(passed)))
    return checks
