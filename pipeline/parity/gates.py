"""Parity gates: a threshold per (output, metric), checked against measured values.

Kept free of numpy and model libraries: `pipeline report check` re-gates a saved
parity.json through this module alone, so it must stay light to import.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional

PARITY_SCHEMA_VERSION = 3  # the one version every parity.json is written with (pipeline.parity.report)

# Metrics where larger is better; a threshold on them is a lower bound. Every other metric is an upper bound.
LOWER_BOUNDS = frozenset({
    "cosine_mean", "cosine_min", "top1_agreement", "snr_db", "accuracy_candidate",
    "greedy_token_agreement", "greedy_prefix_agreement", "decode_speedup",
})


def relation(metric: str) -> str:
    return ">=" if metric in LOWER_BOUNDS else "<="


@dataclass
class Check:
    output: str
    metric: str
    value: Optional[float]  # None: the gated metric is missing from what was measured (the check fails)
    threshold: float
    passed: bool

    @property
    def name(self) -> str:
        return f"{self.output} {self.metric}"

    @property
    def description(self) -> str:
        value = "missing" if self.value is None else f"{self.value:.6g}"
        return f"{self.output} {self.metric} {value} (required {relation(self.metric)} {self.threshold:g})"


def check_value(output: str, metric: str, value: float, threshold: float) -> Check:
    passed = value >= threshold if metric in LOWER_BOUNDS else value <= threshold
    # NaN compares False both ways, so a NaN metric fails every gate.
    return Check(output, metric, float(value), float(threshold), bool(passed))


def evaluate_values(
    values: Mapping[str, Mapping[str, Any]], thresholds: Mapping[tuple[str, str], float]
) -> list[Check]:
    """Every check, failing or not, in a stable order; a gated metric that is missing or null fails."""
    checks = []
    for (output, metric), threshold in sorted(thresholds.items()):
        value = values.get(output, {}).get(metric)
        if value is None:
            checks.append(Check(output, metric, None, float(threshold), False))
        else:
            checks.append(check_value(output, metric, value, threshold))
    return checks
