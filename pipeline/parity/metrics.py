"""Parity metrics between a reference and a candidate graph (the thresholds that gate them: policy.py).

The element-wise error statistics (max, mean, median and p99 of absolute and
relative error) and the SNR come from Polygraphy's comparator
(`SimpleCompareFunc`, `SnrCompareFunc`), run once over all held-out rows of an
output, so the median and p99 are of the whole set, not averages of batches.
Per-row cosine, top-1 agreement and label accuracy are ours: Polygraphy's
cosine is one number over a flattened tensor, and it has no notion of rows or labels.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator, Optional, Sequence

import numpy as np

from pipeline.parity.gates import Check, evaluate_values

# Absolute-error histogram bins, in decades: fixed, so histograms of two builds can be compared.
HISTOGRAM_LOG10_EDGES = tuple(round(-8.0 + 0.25 * step, 2) for step in range(41))  # 1e-8 .. 1e2
REFERENCE_RUNNER, CANDIDATE_RUNNER = "reference", "candidate"


@dataclass
class OutputMetrics:
    output: str
    rows: int  # samples, or real (unpadded) tokens for per-token outputs
    max_abs: float
    mean_abs: float
    p99_abs: float
    relative_l2: float  # ||cand - ref|| / ||ref||
    cosine_mean: float  # per row (sample or real token), then averaged
    cosine_min: float
    top1_agreement: Optional[float] = None
    median_abs: Optional[float] = None
    max_rel: Optional[float] = None  # |cand - ref| / |ref|, element-wise
    mean_rel: Optional[float] = None
    median_rel: Optional[float] = None
    p99_rel: Optional[float] = None
    snr_db: Optional[float] = None  # 10 log10(mean(ref^2) / mean((cand - ref)^2))
    extra: dict[str, float] = field(default_factory=dict)  # task metrics: label accuracy, perplexity, ...
    histogram: Optional[dict[str, list]] = None  # counts of |cand - ref| per log10 bin

    def to_dict(self) -> dict[str, object]:
        data = {k: v for k, v in asdict(self).items() if v is not None and k != "extra"}
        data.update(self.extra)
        return data


def _rows(array: np.ndarray, mask: Optional[np.ndarray]) -> np.ndarray:
    """2-D view, one row per sample or per real token."""
    if array.ndim == 3 and mask is not None:
        return array[mask.astype(bool)]
    return array.reshape(array.shape[0], -1)


@contextlib.contextmanager
def _without_polygraphy_output_logging() -> Iterator[None]:
    """Polygraphy 0.53's comparator computes every output's mean, median and quantiles for its log lines whether
    or not the logger would print them (comparator/util.py: log_output_stats, log_compared_output_stats): on
    [512, 49152] LLM logits that was two thirds of compare_accuracy's time. We log nothing of it, so the two
    are no-ops while our comparison runs; the statistics we report come from its compare functions."""
    from polygraphy.comparator import util as comparator_util

    saved = comparator_util.log_output_stats, comparator_util.log_compared_output_stats
    comparator_util.log_output_stats = comparator_util.log_compared_output_stats = lambda *args, **kwargs: None
    try:
        yield
    finally:
        comparator_util.log_output_stats, comparator_util.log_compared_output_stats = saved


def _polygraphy_statistics(name: str, reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
    from polygraphy.comparator import (
        Comparator,
        IterationResult,
        RunResults,
        SimpleCompareFunc,
        SnrCompareFunc,
    )
    from polygraphy.logger import G_LOGGER

    results = RunResults()
    results.append((REFERENCE_RUNNER, [IterationResult({name: reference}, runner_name=REFERENCE_RUNNER)]))
    results.append((CANDIDATE_RUNNER, [IterationResult({name: candidate}, runner_name=CANDIDATE_RUNNER)]))
    # Gating is ours (gates.py), so Polygraphy's own tolerances are set never to fail.
    statistics = SimpleCompareFunc(check_error_stat="quantile", error_quantile=0.99, atol=math.inf, rtol=math.inf)
    snr = SnrCompareFunc(snr_threshold=-math.inf)
    with G_LOGGER.verbosity(G_LOGGER.CRITICAL), _without_polygraphy_output_logging():
        # (candidate, reference): Polygraphy divides by the second output, so relative error is against the reference.
        accuracy = Comparator.compare_accuracy(results, compare_func=[statistics], comparisons=[(1, 0)])
        # (reference, candidate): Polygraphy's SNR takes the first output's power as the signal.
        signal = Comparator.compare_accuracy(results, compare_func=[snr], comparisons=[(0, 1)])
    pair = (CANDIDATE_RUNNER, REFERENCE_RUNNER)
    simple = accuracy[0][pair][0][name]
    return {
        "max_abs": simple.max_absdiff,
        "mean_abs": simple.mean_absdiff,
        "median_abs": simple.median_absdiff,
        "p99_abs": simple.quantile_absdiff,
        "max_rel": simple.max_reldiff,
        "mean_rel": simple.mean_reldiff,
        "median_rel": simple.median_reldiff,
        "p99_rel": simple.quantile_reldiff,
        "snr_db": float(signal[0][(REFERENCE_RUNNER, CANDIDATE_RUNNER)][0][name].snr),
    }


def error_histogram(reference: np.ndarray, candidate: np.ndarray) -> dict[str, list]:
    error = np.abs(candidate.astype(np.float64) - reference.astype(np.float64)).ravel()
    exponents = np.log10(np.maximum(error, 1e-30))
    # The edges are evenly spaced: bins=count with a range takes numpy's arithmetic path (the same counts as
    # bins=edges, which sorts the data block by block: seconds on [512, 49152] LLM logits).
    counts, _ = np.histogram(np.clip(exponents, HISTOGRAM_LOG10_EDGES[0], HISTOGRAM_LOG10_EDGES[-1]),
                             bins=len(HISTOGRAM_LOG10_EDGES) - 1,
                             range=(HISTOGRAM_LOG10_EDGES[0], HISTOGRAM_LOG10_EDGES[-1]))
    return {"log10_abs_error_edges": list(HISTOGRAM_LOG10_EDGES), "counts": [int(c) for c in counts]}


def compare_output(
    name: str,
    reference: Sequence[np.ndarray],
    candidate: Sequence[np.ndarray],
    masks: Sequence[Optional[np.ndarray]],
    classification: bool = False,
) -> OutputMetrics:
    ref32 = np.ascontiguousarray(np.concatenate([_rows(r, m) for r, m in zip(reference, masks)]), dtype=np.float32)
    cand32 = np.ascontiguousarray(np.concatenate([_rows(c, m) for c, m in zip(candidate, masks)]), dtype=np.float32)
    statistics = _polygraphy_statistics(name, ref32, cand32)
    ref, cand = ref32.astype(np.float64), cand32.astype(np.float64)
    norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(cand, axis=1)
    cosine = np.sum(ref * cand, axis=1) / np.maximum(norms, 1e-12)
    top1 = float(np.mean(ref.argmax(axis=1) == cand.argmax(axis=1))) if classification else None
    return OutputMetrics(
        output=name,
        rows=int(ref.shape[0]),
        relative_l2=float(np.linalg.norm(cand - ref) / max(np.linalg.norm(ref), 1e-12)),
        cosine_mean=float(cosine.mean()),
        cosine_min=float(cosine.min()),
        top1_agreement=top1,
        histogram=error_histogram(ref32, cand32),
        **statistics,
    )


def label_accuracy(reference_logits: np.ndarray, candidate_logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Classifiers on a labelled evaluation file: the accuracy of both graphs, and what INT8 cost."""
    reference = float(np.mean(reference_logits.argmax(axis=1) == labels))
    candidate = float(np.mean(candidate_logits.argmax(axis=1) == labels))
    return {
        "accuracy_reference": reference,
        "accuracy_candidate": candidate,
        "accuracy_drop": reference - candidate,
        "labelled_samples": int(labels.shape[0]),
    }


# Per task, metrics beyond the element-wise ones, computed from whole outputs:
# (reference outputs, candidate outputs, labels or None) -> {output: {metric: value}}.
# Language models (perplexity, greedy-token agreement) register here.
TaskMetricFunction = Callable[[dict[str, np.ndarray], dict[str, np.ndarray], Optional[np.ndarray]], dict[str, dict[str, float]]]


def _classification_metrics(reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray],
                            labels: Optional[np.ndarray]) -> dict[str, dict[str, float]]:
    if labels is None:
        return {}
    return {"logits": label_accuracy(reference["logits"], candidate["logits"], labels)}


TASK_METRICS: dict[str, TaskMetricFunction] = {"text-classification": _classification_metrics}


def evaluate(metrics: dict[str, OutputMetrics], thresholds: dict[tuple[str, str], float]) -> list[Check]:
    """Every check, failing or not: a failed build names all of its failures at once."""
    return evaluate_values({name: m.to_dict() for name, m in metrics.items()}, thresholds)
