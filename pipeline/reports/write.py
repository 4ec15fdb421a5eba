"""Parity reports: parity.json (the ParityReport model, docs/parity-report.md), parity.md (a table for pull
requests, also the step summary), parity.html (self-contained, with plots) and parity.junit.xml (one
test case per check). Every renderer takes the model."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from pipeline.parity.gates import relation
from pipeline.parity.report import OutputMetrics, ParityReport

REPORT_FILES = ("parity.json", "parity.md", "parity.html", "parity.junit.xml")
_METRIC_COLUMNS = (
    "max_abs", "mean_abs", "median_abs", "p99_abs", "p99_rel", "relative_l2", "snr_db",
    "cosine_mean", "cosine_min", "top1_agreement", "accuracy_reference", "accuracy_candidate",
)
_TOP_LAYERS_IN_MARKDOWN = 5


def _write_atomic(path: Path, text: str) -> None:
    """Readers (and a CI step) never see half a report: write beside it, then rename over it."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)


def render_json(report: ParityReport) -> str:
    return report.to_json()


def write_json(report: ParityReport, path: Path) -> None:
    _write_atomic(path, render_json(report))


def metric_columns(outputs: dict[str, OutputMetrics], candidates: tuple[str, ...]) -> list[str]:
    """The columns of an outputs table: those metrics any output has."""
    present = {name for metrics in outputs.values() for name in metrics.values()}
    return [column for column in candidates if column in present]


def render_markdown(report: ParityReport) -> str:
    verdict = "PASS" if report.status == "pass" else "FAIL"
    lines = [
        f"## Parity: {verdict}",
        "",
        f"Candidate `{report.candidate.description}` against reference "
        f"`{report.reference.description}` on {report.heldout.samples} held-out samples "
        f"({report.heldout.source}, never used for calibration).",
        "",
        "| check | value | threshold | result |",
        "|---|---|---|---|",
    ]
    for check in report.checks:
        value = "missing" if check.value is None else f"{check.value:.6g}"
        lines.append(
            f"| {check.output} {check.metric} | {value} | {relation(check.metric)} "
            f"{check.threshold:g} | {'pass' if check.passed else '**FAIL**'} |"
        )
    columns = metric_columns(report.outputs, _METRIC_COLUMNS)
    lines += ["", "| output | rows | " + " | ".join(columns) + " |", "|---" * (len(columns) + 2) + "|"]
    for name, metrics in report.outputs.items():
        values = metrics.values()
        cells = [f"{values[c]:.4g}" if c in values else "" for c in columns]
        lines.append(f"| {name} | {metrics.rows} | " + " | ".join(cells) + " |")
    evaluation = report.evaluation
    if evaluation:
        lines += ["", f"Labelled evaluation: {evaluation.samples} samples from `{evaluation.file}`."]
    localization = report.localization
    if localization and localization.ranked:
        lines += [
            "",
            f"### Most divergent layers ({localization.matched_tensors} layers matched, "
            f"{localization.batches} held-out batches)",
            "",
            "| rank | layer | op | introduced rel. error | rel. L2 error | SNR dB | cosine |",
            "|---|---|---|---|---|---|---|",
        ]
        for rank, layer in enumerate(localization.ranked[:_TOP_LAYERS_IN_MARKDOWN], start=1):
            lines.append(
                f"| {rank} | `{layer.node}` | {layer.op_type} | {layer.introduced:.4g} | "
                f"{layer.relative_l2:.4g} | {layer.snr_db:.3g} | {layer.cosine:.5f} |"
            )
        first = localization.first_divergent
        if first:
            lines += ["", f"First divergent layer: `{first.node}` ({first.op_type})."]
    export = report.export_parity
    if export:
        worst = ", ".join(f"{name} {value:.2g}" for name, value in export.items())
        lines += ["", f"Export check (ONNX Runtime against PyTorch, max abs difference): {worst}."]
    return "\n".join(lines) + "\n"


def write_markdown(report: ParityReport, path: Path) -> None:
    _write_atomic(path, render_markdown(report))


def write_reports(report: ParityReport, directory: Path) -> None:
    """All four report files of one parity run, each written atomically."""
    from pipeline.reports.html import render_html
    from pipeline.reports.junit import render_junit

    renderers: dict[str, Callable[[ParityReport], str]] = {
        "parity.json": render_json,
        "parity.md": render_markdown,
        "parity.html": render_html,
        "parity.junit.xml": render_junit,
    }
    for name in REPORT_FILES:
        _write_atomic(directory / name, renderers[name](report))


def read_report(path: Path) -> ParityReport:
    """A report this build just wrote (a user-supplied one goes through reports.gate.load_report)."""
    return ParityReport.model_validate_json(path.read_text(encoding="utf-8"))


def append_step_summary(report: ParityReport) -> None:
    """GitHub Actions shows what is appended to $GITHUB_STEP_SUMMARY on the run's page: the Markdown report."""
    summary = os.environ.get("GITHUB_STEP_SUMMARY")
    if summary:
        with open(summary, "a", encoding="utf-8") as handle:
            handle.write(render_markdown(report))
