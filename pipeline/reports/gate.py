"""Saved parity reports: load (through pipeline.parity.report.ParityReport), re-gate with new thresholds,
and diff two builds.

No model, no ONNX Runtime, no numpy: CI steps that only read artifacts import this.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Optional

from pydantic import ValidationError

from pipeline.core.errors import InputError, read_json_input
from pipeline.parity.gates import PARITY_SCHEMA_VERSION, Check, evaluate_values
from pipeline.parity.report import OutputMetrics, ParityReport

GATEABLE_METRICS = frozenset(name for name in OutputMetrics.model_fields if name != "histogram")


def _first_problem(error: ValidationError) -> str:
    first = error.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or "the report"
    more = f" (and {error.error_count() - 1} more)" if error.error_count() > 1 else ""
    # One printable line, whatever the report's keys hold.
    return "".join(c if c.isprintable() else "?" for c in f"{where}: {first['msg']}{more}")[:300]


def load_report(path: Path) -> ParityReport:
    """A saved parity.json through the model: anything damaged or of another schema is one InputError."""
    if not path.is_file():
        raise InputError(f"parity report not found: {path}")
    data = read_json_input(path)
    if not isinstance(data, dict) or "schema_version" not in data:
        raise InputError(f"{path} is not a parity report (no 'schema_version')")
    if data["schema_version"] != PARITY_SCHEMA_VERSION:
        raise InputError(
            f"{path} has parity schema {data['schema_version']!r}; this quantpipe reads {PARITY_SCHEMA_VERSION} "
            "(re-create the report with `pipeline verify` or `pipeline build`)"
        )
    try:
        # strict: `true` is not the number 1, "0.99" is not a number (a forged metric must not pass a gate).
        return ParityReport.model_validate(data, strict=True)
    except ValidationError as exc:
        raise InputError(f"{path} is not a valid parity report: {_first_problem(exc)}") from None
    except RecursionError:
        raise InputError(f"{path} is not a valid parity report: nested too deeply") from None


def regate(report: ParityReport, overrides: Mapping[tuple[str, str], float], keep_recorded: bool = True) -> list[Check]:
    """Check the saved metrics against the recorded gates, overridden (or extended) by new ones.

    A gate whose metric is missing or null fails (exit 4, named); a new gate on a metric no report has, or on
    an output this report lacks, is bad input; no gate at all is refused.
    """
    values = report.metric_values()
    thresholds = report.recorded_thresholds() if keep_recorded else {}
    thresholds.update(overrides)
    if not thresholds:  # nothing to check is not a pass
        raise InputError("the report records no gate and none was given: add one (--min-cosine, --max-abs, "
                         "--gate OUTPUT.METRIC=VALUE) or re-create the report with its thresholds")
    for output, metric in overrides:
        if output not in values:
            raise InputError(f"the report has no output '{output}' (it has: {', '.join(values)})")
        if metric not in values[output] and metric not in GATEABLE_METRICS:  # a known metric not measured fails below
            raise InputError(f"output '{output}' has no metric '{metric}' (it has: {', '.join(sorted(values[output]))})")
    return evaluate_values(values, thresholds)


def parse_gate(text: str, primary: str) -> tuple[tuple[str, str], float]:
    """'[OUTPUT.]METRIC=VALUE' -> ((output, metric), value); the output defaults to the primary one."""
    key, separator, value = text.partition("=")
    if not separator:
        raise InputError(f"--gate '{text}': expected [OUTPUT.]METRIC=VALUE, e.g. sentence_embedding.snr_db=15")
    output, dot, metric = key.strip().rpartition(".")
    try:
        return (output if dot else primary, metric), float(value)
    except ValueError:
        raise InputError(f"--gate '{text}': '{value}' is not a number") from None


def diff_reports(before: ParityReport, after: ParityReport) -> dict[str, Any]:
    """What changed between two parity reports: verdict, candidate, every shared metric, checks, top layers."""
    outputs: dict[str, dict[str, dict[str, Optional[float]]]] = {}
    values_before, values_after = before.metric_values(), after.metric_values()
    for name in dict.fromkeys([*values_before, *values_after]):
        a, b = values_before.get(name, {}), values_after.get(name, {})
        rows = {}
        for metric in dict.fromkeys([*a, *b]):
            old = None if a.get(metric) is None else float(a[metric])
            new = None if b.get(metric) is None else float(b[metric])
            change = None if old is None or new is None else new - old
            relative = change / abs(old) if change is not None and old not in (0, None) else None
            rows[metric] = {"before": old, "after": new, "change": change, "relative_change": relative}
        outputs[name] = rows
    checks_before = {(c.output, c.metric): c.passed for c in before.checks}
    checks_after = {(c.output, c.metric): c.passed for c in after.checks}
    checks = [
        {"check": f"{key[0]} {key[1]}", "before": checks_before.get(key), "after": checks_after.get(key)}
        for key in dict.fromkeys([*checks_before, *checks_after])
    ]
    return {
        "status": {"before": before.status, "after": after.status},
        "candidate": {"before": before.candidate.sha256, "after": after.candidate.sha256},
        "reference": {"before": before.reference.sha256, "after": after.reference.sha256},
        "outputs": outputs,
        "checks": checks,
        "top_layers": {"before": _top_layers(before), "after": _top_layers(after)},
    }


def _top_layers(report: ParityReport, count: int = 3) -> list[str]:
    ranked = report.localization.ranked if report.localization else []
    return [layer.node for layer in ranked[:count]]


def _fmt(value: Optional[float]) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return f"{value:.6g}"


def render_diff(diff: Mapping[str, Any], changed_only: bool = True) -> str:
    status, candidate = diff["status"], diff["candidate"]
    lines = [f"status: {status['before']} -> {status['after']}"]
    if candidate["before"] != candidate["after"]:
        lines.append(f"candidate: {str(candidate['before'])[:12]} -> {str(candidate['after'])[:12]}")
    if diff["reference"]["before"] != diff["reference"]["after"]:
        lines.append("reference: differs (the two reports compare against different FP32 graphs)")
    for check in diff["checks"]:
        if check["before"] != check["after"] or not changed_only:
            verdict = {True: "pass", False: "FAIL", None: "-"}
            lines.append(f"check {check['check']}: {verdict[check['before']]} -> {verdict[check['after']]}")
    header = f"{'output':<22} {'metric':<20} {'before':>12} {'after':>12} {'change':>12} {'rel.':>9}"
    table = []
    for output, rows in diff["outputs"].items():
        for metric, row in rows.items():
            if changed_only and row["change"] == 0:
                continue
            relative = "-" if row["relative_change"] is None else f"{row['relative_change']:+.1%}"
            table.append(f"{output:<22} {metric:<20} {_fmt(row['before']):>12} {_fmt(row['after']):>12} "
                         f"{_fmt(row['change']):>12} {relative:>9}")
    lines += [header, *table] if table else ["no metric changed"]
    layers = diff["top_layers"]
    if layers["before"] != layers["after"]:
        lines.append(f"top layers: {', '.join(layers['before']) or '-'} -> {', '.join(layers['after']) or '-'}")
    return "\n".join(lines)
