"""parity.html: one self-contained page (inline CSS, plots as base64 PNG, no scripts, no URLs)."""

from __future__ import annotations

import base64
import html
import io
import os
from typing import Any, Optional

from pipeline.parity.gates import relation
from pipeline.parity.report import Histogram, Localization, ParityReport
from pipeline.reports.write import metric_columns

# `QUANTPIPE_REPORT_PLOTS=0` leaves the matplotlib plots out of parity.html (tables and numbers stay), for test
# suites and CI jobs that build many models and never open the page; unset or any other value draws them.
PLOTS_ENV = "QUANTPIPE_REPORT_PLOTS"

_STYLE = """
body{font-family:system-ui,sans-serif;margin:2rem;max-width:72rem;color:#222}
.scroll{overflow-x:auto}table{border-collapse:collapse;margin:0.5rem 0 1.5rem;font-size:0.9em}td,th{border:1px solid #ccc;padding:0.25rem 0.6rem;text-align:right}
td:first-child,th:first-child{text-align:left}.pass{color:#1a7f37}.fail{color:#cf222e;font-weight:bold}
h1 .pass,h1 .fail{font-size:1em}img{max-width:100%;border:1px solid #eee}code{font-size:0.9em}
"""


def _figure_png(figure: Any) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight", metadata={"Software": None})
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _histogram_plot(name: str, histogram: Histogram) -> str:
    from matplotlib.figure import Figure

    edges, counts = histogram.log10_abs_error_edges, histogram.counts
    figure = Figure(figsize=(7, 2.8))
    axes = figure.add_subplot()
    axes.bar(edges[:-1], counts, width=[b - a for a, b in zip(edges, edges[1:])], align="edge", color="#4c72b0")
    axes.set_xlabel("log10 |candidate - reference| (first and last bins hold everything beyond)")
    axes.set_ylabel("elements")
    axes.set_title(f"{name}: absolute error histogram")
    return _figure_png(figure)


def _layer_plot(localization: Localization) -> str:
    from matplotlib.figure import Figure

    layers = localization.layers
    top = {layer.tensor for layer in localization.ranked[:3]}
    positions = list(range(len(layers)))
    figure = Figure(figsize=(10, 3.6))
    axes = figure.add_subplot()
    axes.plot(positions, [layer.relative_l2 for layer in layers], marker=".", color="#4c72b0",
              label="relative L2 error of the layer's output")
    axes.bar(positions, [layer.introduced for layer in layers], color="#dd8452", alpha=0.8,
             label="error the layer introduces")
    for position, layer in zip(positions, layers):
        if layer.tensor in top:
            axes.annotate("/".join(layer.node.split("/")[-4:]),
                          (position, layer.introduced), textcoords="offset points", xytext=(0, 6),
                          ha="center", fontsize=7, color="#cf222e")
    axes.set_xlabel("layer (topological order in the FP32 graph)")
    axes.set_ylabel("relative error")
    axes.set_title("error per layer")
    axes.legend(loc="upper right", fontsize=8)
    return _figure_png(figure)


_OUTPUT_COLUMNS = (
    "rows", "max_abs", "mean_abs", "median_abs", "p99_abs", "max_rel", "mean_rel", "median_rel", "p99_rel",
    "relative_l2", "snr_db", "cosine_mean", "cosine_min", "top1_agreement", "accuracy_reference", "accuracy_candidate",
)


def _table(headers: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def _fmt(value: Optional[float]) -> str:
    return "" if value is None else f"{value:.4g}"


def _verdict(passed: bool) -> str:
    return '<span class="pass">pass</span>' if passed else '<span class="fail">FAIL</span>'


def plots_enabled() -> bool:
    return os.environ.get(PLOTS_ENV, "1").strip() != "0"


def render_html(report: ParityReport) -> str:
    plots = plots_enabled()
    passed = report.status == "pass"
    candidate, reference, heldout = report.candidate, report.reference, report.heldout
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8"><title>Parity report</title>',
        '<link rel="icon" href="data:,">',
        f"<style>{_STYLE}</style></head><body>",
        f"<h1>Parity: {_verdict(passed)}</h1>",
        f"<p>Candidate <code>{html.escape(candidate.description)}</code> "
        f"(sha256 {candidate.sha256[:12]}) against reference "
        f"<code>{html.escape(reference.description)}</code> "
        f"(sha256 {reference.sha256[:12]}) on {heldout.samples} held-out samples "
        f"({html.escape(heldout.source)}). Task: {html.escape(report.task)}; "
        f"report schema {report.schema_version}.</p>",
        "<h2>Checks</h2>",
        _table(["check", "value", "threshold", "result"], [
            [html.escape(f"{c.output} {c.metric}"), "missing" if c.value is None else f"{c.value:.6g}",
             f"{relation(c.metric)} {c.threshold:g}", _verdict(c.passed)]
            for c in report.checks
        ]),
        "<h2>Outputs</h2>",
    ]
    columns = metric_columns(report.outputs, _OUTPUT_COLUMNS)
    parts.append(_table(["output", *columns], [
        [html.escape(name), *(_fmt(metrics.values().get(c)) for c in columns)]
        for name, metrics in report.outputs.items()
    ]))
    parts.append("<h2>Error histograms</h2>")
    if not plots:
        parts.append(f"<p>Plots not drawn (<code>{PLOTS_ENV}=0</code>).</p>")
    for name, metrics in report.outputs.items():
        if metrics.histogram and plots:
            parts.append(f'<img alt="absolute error histogram of {html.escape(name)}" '
                         f'src="data:image/png;base64,{_histogram_plot(name, metrics.histogram)}">')
    parts.append("<h2>Error per layer</h2>")
    localization = report.localization
    if localization and localization.layers:
        if plots:
            parts.append(f'<img alt="error per layer" src="data:image/png;base64,{_layer_plot(localization)}">')
        first = localization.first_divergent
        if first:
            parts.append(f"<p>First divergent layer: <code>{html.escape(first.node)}</code> "
                         f"({html.escape(first.op_type)}).</p>")
        parts.append(_table(["rank", "layer", "op", "introduced", "relative L2", "SNR dB", "cosine", "max abs"], [
            [str(rank), f"<code>{html.escape(layer.node)}</code>", html.escape(layer.op_type),
             _fmt(layer.introduced), _fmt(layer.relative_l2), _fmt(layer.snr_db),
             f"{layer.cosine:.5f}", _fmt(layer.max_abs)]
            for rank, layer in enumerate(localization.ranked, start=1)
        ]))
    else:
        parts.append("<p>Layer localization did not run (it runs when parity fails, or with "
                     "<code>--localize always</code>).</p>")
    export = report.export_parity
    if export:
        parts.append("<h2>Export check</h2><p>ONNX Runtime against PyTorch, max abs difference: "
                     + ", ".join(f"{html.escape(n)} {v:.2g}" for n, v in export.items()) + ".</p>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
