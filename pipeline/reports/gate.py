"""Saved parity reports: load, re-gate with new thresholds, and diff two builds.

No model, no ONNX Runtime, no numpy: CI steps that only read artifacts import this.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Optional

from pipeline.core.errors import InputError, read_json_input
from pipeline.parity.gates import Check, evaluate_values

SUPPORTED_SCHEMAS = (1, 2)


def load_report(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise InputError(f"parity report not found: {path}")
    report = read_json_input(path)
    if not isinstance(report, dict) or "outputs" not in report or "schema_version" not in report:
        raise InputError(f"{path} is not a parity report (no 'schema_version' and 'outputs')")
    if report["schema_version"] not in SUPPORTED_SCHEMAS:
        raise InputError(
            f"{path} has parity schema {report['schema_version']}; this quantpipe reads "
            f"{', '.join(map(str, SUPPORTED_SCHEMAS))} (upgrade quantpipe)"
        )
    return report


def recorded_thresholds(report: Mapping[str, Any]) -> dict[tuple[str, str], float]:
    """The gates the report was made with (schema 1 has no 'thresholds': taken from its checks)."""
    entries = report.get("thresholds") or report.get("checks") or []
    return {(entry["output"], entry["metric"]): float(entry["threshold"]) for entry in entries}


def regate(report: Mapping[str, Any], overrides: Mapping[tuple[str, str], float], keep_recorded: bool = True) -> list[Check]:
    """Check the saved metrics against the recorded gates, overridden (or extended) by new ones."""
    thresholds = dict(recorded_thresholds(report)) if keep_recorded else {}
    thresholds.update(overrides)
    for output, metric in overrides:
        if output not in report["outputs"]:
            raise InputError(f"the report has no output '{output}' (it has: {', '.join(report['outputs'])})")
        if metric not in report["outputs"][output]:
            available = sorted(k for k, v in report["outputs"][output].items() if isinstance(v, (int, float)))
            raise InputError(f"output '{output}' has no metric '{metric}' (it has: {', '.join(available)})")
    return evaluate_values(report["outputs"], thresholds)


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


def _numeric(metrics: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def diff_reports(before: Mapping[str, Any], after: Mapping[str, Any]) -> dict[str, Any]:
    """What changed between two parity reports: verdict, candidate, every shared metric, checks, top layers."""
    outputs: dict[str, dict[str, dict[str, Optional[float]]]] = {}
    for name in dict.fromkeys([*before["outputs"], *after["outputs"]]):
        a, b = _numeric(before["outputs"].get(name, {})), _numeric(after["outputs"].get(name, {}))
        rows = {}
        for metric in dict.fromkeys([*a, *b]):
            old, new = a.get(metric), b.get(metric)
            change = None if old is None or new is None else new - old
            relative = change / abs(old) if change is not None and old not in (0, None) else None
            rows[metric] = {"before": old, "after": new, "change": change, "relative_change": relative}
        outputs[name] = rows
    checks_before = {(c["output"], c["metric"]): c for c in before.get("checks", [])}
    checks_after = {(c["output"], c["metric"]): c for c in after.get("checks", [])}
    checks = [
        {"check": f"{key[0]} {key[1]}",
         "before": None if key not in checks_before else checks_before[key]["passed"],
         "after": None if key not in checks_after else checks_after[key]["passed"]}
        for key in dict.fromkeys([*checks_before, *checks_after])
    ]
    return {
        "status": {"before": before.get("status"), "after": after.get("status")},
        "candidate": {"before": before.get("candidate", {}).get("sha256"), "after": after.get("candidate", {}).get("sha256")},
        "reference": {"before": before.get("reference", {}).get("sha256"), "after": after.get("reference", {}).get("sha256")},
        "outputs": outputs,
        "checks": checks,
        "top_layers": {"before": _top_layers(before), "after": _top_layers(after)},
    }


def _top_layers(report: Mapping[str, Any], count: int = 3) -> list[str]:
    localization = report.get("localization") or {}
    return [layer["node"] for layer in (localization.get("ranked") or [])[:count]]


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
