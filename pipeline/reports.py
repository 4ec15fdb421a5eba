"""Parity reports: parity.json (versioned schema) and parity.md (a table for pull requests)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

PARITY_SCHEMA_VERSION = 1
_METRIC_COLUMNS = ("max_abs", "mean_abs", "p99_abs", "relative_l2", "cosine_mean", "cosine_min", "top1_agreement")


def write_json(report: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


def render_markdown(report: dict[str, Any]) -> str:
    verdict = "PASS" if report["status"] == "pass" else "FAIL"
    lines = [
        f"## Parity: {verdict}",
        "",
        f"Candidate `{report['candidate']['description']}` against reference "
        f"`{report['reference']['description']}` on {report['heldout']['samples']} held-out samples "
        f"({report['heldout']['source']}, never used for calibration).",
        "",
        "| check | value | threshold | result |",
        "|---|---|---|---|",
    ]
    for check in report["checks"]:
        relation = ">=" if check["metric"] in ("cosine_mean", "cosine_min", "top1_agreement") else "<="
        lines.append(
            f"| {check['output']} {check['metric']} | {check['value']:.6g} | {relation} {check['threshold']:g} "
            f"| {'pass' if check['passed'] else '**FAIL**'} |"
        )
    lines += ["", "| output | rows | " + " | ".join(_METRIC_COLUMNS) + " |", "|---" * (len(_METRIC_COLUMNS) + 2) + "|"]
    for name, metrics in report["outputs"].items():
        cells = [f"{metrics[c]:.4g}" if c in metrics else "" for c in _METRIC_COLUMNS]
        lines.append(f"| {name} | {metrics['rows']} | " + " | ".join(cells) + " |")
    export = report.get("export_parity")
    if export:
        worst = ", ".join(f"{name} {value:.2g}" for name, value in export.items())
        lines += ["", f"Export check (ONNX Runtime against PyTorch, max abs difference): {worst}."]
    return "\n".join(lines) + "\n"


def write_markdown(report: dict[str, Any], path: Path) -> None:
    text = render_markdown(report)
    path.write_text(text, encoding="utf-8")


def append_step_summary(markdown_path: Path) -> None:
    """GitHub Actions shows what is appended to $GITHUB_STEP_SUMMARY on the run's page."""
    summary = os.environ.get("GITHUB_STEP_SUMMARY")
    if summary:
        with open(summary, "a", encoding="utf-8") as handle:
            handle.write(markdown_path.read_text(encoding="utf-8"))
