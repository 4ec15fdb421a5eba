"""`pipeline verify BUILD_DIR` and `pipeline report check|diff`: parity for CI steps.

`report check` and `report diff` read saved JSON only: nothing here imports a
model library at module level, so they start in well under two seconds.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import click

from pipeline.core.errors import ParityError

_EXISTING_FILE = click.Path(exists=True, dir_okay=False, path_type=Path)


@click.command("verify")
@click.argument("build_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--candidate", type=_EXISTING_FILE,
              help="Verify this ONNX file instead of the build's INT8 model (needs --output).")
@click.option("--output", "-o", "output_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Where to write the reports. [default: BUILD_DIR]")
@click.option("--localize", type=click.Choice(["on-failure", "always", "never"]),
              help="Layer localization. [default: the build's setting, on-failure]")
@click.option("--min-cosine", type=float, help="Gate: minimum mean cosine of the primary output.")
@click.option("--max-abs", type=float, help="Gate: maximum absolute error of the primary output.")
@click.option("--min-snr-db", type=float, help="Gate: minimum SNR (dB) of the primary output.")
@click.option("--eval-file", type=_EXISTING_FILE, help="Classifiers: labelled evaluation file.")
@click.option("--trust-remote-code", is_flag=True,
              help="Run Python code shipped with the model or tokenizer (never taken from the build's manifest).")
@click.option("--quiet", "-q", is_flag=True, help="Print nothing but errors (for CI).")
def verify(build_dir: Path, candidate: Optional[Path], output_dir: Optional[Path], quiet: bool,
           trust_remote_code: bool, **flags: Any) -> None:
    """Run parity again for an existing build (reads BUILD_DIR/manifest.json and BUILD_DIR/.stages).

    \b
    Example:
      pipeline verify build/all-MiniLM-L6-v2-cpu --localize always
      pipeline verify build/all-MiniLM-L6-v2-cpu --candidate other.onnx -o reports/other
    """
    if candidate is not None and output_dir is None:
        raise click.UsageError("--candidate needs --output, so the build's own reports are not overwritten")
    from pipeline.api import verify as verify_api
    from pipeline.core.progress import Progress

    report = verify_api(build_dir, candidate=candidate, output_dir=output_dir, progress=Progress(quiet=quiet),
                        trust_remote_code=trust_remote_code, **flags)
    if report.failures:
        raise ParityError("parity failed: " + "; ".join(report.failures)
                          + f" (report: {(output_dir or build_dir) / 'parity.md'})")
    if not quiet:
        click.echo(f"parity passed: {len(report.checks)} checks; reports in {output_dir or build_dir}")


@click.group("report")
def report() -> None:
    """Read saved parity reports: re-gate one, or compare two (no model is loaded)."""


@report.command("check")
@click.argument("report_path", metavar="PARITY_JSON", type=click.Path(path_type=Path))
@click.option("--max-abs", type=float, help="Maximum absolute error of the primary output.")
@click.option("--min-cosine", type=float, help="Minimum mean cosine of the primary output.")
@click.option("--min-top1-agreement", type=float, help="Classifiers: minimum top-1 agreement.")
@click.option("--min-snr-db", type=float, help="Minimum SNR (dB) of the primary output.")
@click.option("--gate", "gates", multiple=True, metavar="[OUTPUT.]METRIC=VALUE",
              help="Any metric of any output (repeatable), e.g. last_hidden_state.p99_abs=0.2.")
@click.option("--only", is_flag=True, help="Check only the gates given here, not the ones recorded in the report.")
def check(report_path: Path, gates: tuple[str, ...], only: bool, **flags: Optional[float]) -> None:
    """Re-gate a saved parity.json; exit 4 when a check fails, naming every failing check.

    \b
    Example:
      pipeline report check build/all-MiniLM-L6-v2-cpu/parity.json --min-cosine 0.99 --max-abs 0.05
    """
    from pipeline.reports.gate import load_report, parse_gate, regate

    saved = load_report(report_path)
    primary = saved.primary_output
    metric_of = {"max_abs": "max_abs", "min_cosine": "cosine_mean",
                 "min_top1_agreement": "top1_agreement", "min_snr_db": "snr_db"}
    overrides = {(primary, metric_of[flag]): value for flag, value in flags.items() if value is not None}
    overrides.update(parse_gate(text, primary) for text in gates)
    checks = regate(saved, overrides, keep_recorded=not only)
    for item in checks:
        click.echo(f"{'pass' if item.passed else 'FAIL'}  {item.description}")
    failures = [item.description for item in checks if not item.passed]
    if failures:
        raise ParityError(f"parity failed ({report_path}): " + "; ".join(failures))


@report.command("diff")
@click.argument("before", metavar="A_JSON", type=click.Path(path_type=Path))
@click.argument("after", metavar="B_JSON", type=click.Path(path_type=Path))
@click.option("--all", "show_all", is_flag=True, help="Show unchanged metrics too.")
@click.option("--json", "as_json", is_flag=True, help="Print the difference as JSON.")
def diff(before: Path, after: Path, show_all: bool, as_json: bool) -> None:
    """Show what changed between two builds' parity reports (A before, B after).

    \b
    Example:
      pipeline report diff main/parity.json branch/parity.json
    """
    from pipeline.reports.gate import diff_reports, load_report, render_diff

    difference = diff_reports(load_report(before), load_report(after))
    click.echo(json.dumps(difference, indent=2) if as_json else render_diff(difference, changed_only=not show_all))
