"""Parity reports end to end on the real default build: a broken candidate, re-verification,
re-gating and diffing saved reports, JUnit and HTML."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from pipeline.core.errors import ExitCode
from pipeline.reports.html import PLOTS_ENV
from tests.helpers import assert_one_line_error, run_cli

BROKEN_LAYER = "/model/encoder/layer.2/intermediate/dense/MatMul"
CHROMIUM = Path("/usr/bin/chromium")


def _scale_int8_matmul_weight(model: onnx.ModelProto, node_prefix: str, factor: float) -> str:
    """Scale the weight scale of one MatMulInteger: the dequantized weight becomes factor x the real one."""
    node = next(n for n in model.graph.node if n.op_type == "MatMulInteger" and n.name.startswith(node_prefix))
    scale_name = node.input[1].removesuffix("_quantized") + "_scale"
    scale = next(init for init in model.graph.initializer if init.name == scale_name)
    scale.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(scale) * np.float32(factor), scale_name))
    return node.name


@pytest.fixture(scope="module")
def broken_run(default_build, tmp_path_factory: pytest.TempPathFactory):
    """`pipeline verify BUILD --candidate broken.onnx`: the build's INT8 graph with one MatMul weight x3."""
    folder = tmp_path_factory.mktemp("broken")
    model = onnx.load(str(default_build.build_dir / "model.onnx"))
    _scale_int8_matmul_weight(model, BROKEN_LAYER, 3.0)
    onnx.save(model, str(folder / "broken.onnx"))
    summary = folder / "step-summary.md"
    result = subprocess.run(
        [sys.executable, "-m", "pipeline", "verify", str(default_build.build_dir), "--candidate",
         str(folder / "broken.onnx"), "-o", str(folder / "reports"), "--quiet"],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "GITHUB_STEP_SUMMARY": str(summary), PLOTS_ENV: "1"},  # the HTML tests read its plots
    )
    return result, folder / "reports", summary


def test_broken_candidate_fails_and_names_the_layer(broken_run) -> None:
    result, reports, summary = broken_run
    assert_one_line_error(result, ExitCode.PARITY_FAILED, "sentence_embedding cosine_mean")
    report = json.loads((reports / "parity.json").read_text())
    assert report["status"] == "fail" and report["schema_version"] == 3
    assert report["family"] == "encoder" and report["target"] == "cpu"
    top3 = [layer["node"] for layer in report["localization"]["ranked"][:3]]
    assert BROKEN_LAYER in top3, top3
    assert report["localization"]["first_divergent"]["node"] == BROKEN_LAYER
    assert report["localization"]["matched_tensors"] >= 40, "Q/DQ, MatMulInteger and QAttention outputs matched"
    assert f"`{BROKEN_LAYER}`" in (reports / "parity.md").read_text()
    assert "Most divergent layers" in summary.read_text(), "appended to $GITHUB_STEP_SUMMARY"


def test_same_build_verified_twice_gives_identical_numbers(default_build, tmp_path: Path) -> None:
    """The build's own verify stage, then `pipeline verify`: byte-identical reports."""
    result = run_cli("verify", str(default_build.build_dir), "-o", str(tmp_path), "-q")
    assert result.returncode == 0, result.stderr
    for name in ("parity.json", "parity.md", "parity.junit.xml"):
        assert (tmp_path / name).read_bytes() == (default_build.build_dir / name).read_bytes(), name
    assert json.loads((tmp_path / "parity.json").read_text())["outputs"]["sentence_embedding"]["snr_db"] > 0


def test_localization_on_request_is_deterministic(default_build) -> None:
    from calibration.batches import load_batches
    from pipeline.parity.localize import localize

    batches = load_batches(default_build.outputs["calibrate"].path("heldout.safetensors"))[:1]
    fp32, int8 = default_build.build_dir / "model.fp32.onnx", default_build.build_dir / "model.onnx"
    first, second = localize(fp32, int8, batches), localize(fp32, int8, batches)
    assert first == second and first["matched_tensors"] >= 40
    assert all(0 <= layer["relative_l2"] < 0.5 for layer in first["layers"]), "a healthy INT8 graph: small errors"


def test_metrics_are_complete_and_match_an_independent_recomputation(default_build, default_parity_recomputed) -> None:
    """Every statistic of every output (percentiles, relative errors, SNR) as numpy computes it from plain ONNX
    Runtime runs of the published graphs (tests/independent.py), not checked against the report's own formulas."""
    outputs = json.loads((default_build.build_dir / "parity.json").read_text())["outputs"]
    assert set(outputs) == set(default_parity_recomputed) == {"sentence_embedding", "last_hidden_state"}
    for output, recomputed in default_parity_recomputed.items():
        metrics = outputs[output]
        for name in ("max_abs", "mean_abs", "median_abs", "p99_abs", "max_rel", "mean_rel", "median_rel", "p99_rel",
                     "cosine_mean", "snr_db"):
            assert isinstance(metrics[name], float), (output, name)
        for name in ("median_abs", "p99_abs", "max_rel", "median_rel", "p99_rel", "snr_db", "relative_l2"):
            assert metrics[name] == pytest.approx(recomputed[name], rel=1e-3), (output, name)
        assert sum(metrics["histogram"]["counts"]) == metrics["rows"] * 384


def test_junit_parses_with_one_case_per_check(default_build, broken_run) -> None:
    from junitparser import Failure, JUnitXml

    passing = JUnitXml.fromfile(str(default_build.build_dir / "parity.junit.xml"))
    cases = [case for suite in passing for case in suite]
    assert len(cases) == 1 and cases[0].is_passed
    _, reports, _ = broken_run
    report = json.loads((reports / "parity.json").read_text())
    failing = [case for suite in JUnitXml.fromfile(str(reports / "parity.junit.xml")) for case in suite]
    assert len(failing) == len(report["checks"])
    failures = [case for case in failing if any(isinstance(r, Failure) for r in case.result)]
    assert len(failures) == len(report["failures"]) >= 1
    assert BROKEN_LAYER in failures[0].result[0].text


def test_html_is_self_contained_with_plots(broken_run) -> None:
    _, reports, _ = broken_run
    page = (reports / "parity.html").read_text()
    assert "<script" not in page and "http://" not in page and "https://" not in page
    assert page.count('src="data:image/png;base64,') == 3, "two error histograms and the error-per-layer plot"


def test_html_without_plots_keeps_every_table(broken_run, monkeypatch) -> None:
    """QUANTPIPE_REPORT_PLOTS=0 (the suite's setting) drops the images only: the same tables as the full page."""
    from pipeline.parity.report import ParityReport
    from pipeline.reports.html import render_html

    _, reports, _ = broken_run
    report = ParityReport.model_validate_json((reports / "parity.json").read_text())
    monkeypatch.setenv(PLOTS_ENV, "0")
    page = render_html(report)
    assert "<img" not in page and f"{PLOTS_ENV}=0" in page
    full = (reports / "parity.html").read_text()
    assert page.count("<tr>") == full.count("<tr>") and BROKEN_LAYER in page


def test_html_renders_in_headless_chromium(broken_run, tmp_path: Path) -> None:
    from matplotlib.image import imread

    if not CHROMIUM.exists():
        # .ci/run installs chromium and sets CI: there a missing browser is a failure, not a silent skip.
        message = "needs Debian's chromium at /usr/bin/chromium"
        if os.environ.get("CI"):
            pytest.fail(f"CI is set: {message}")
        pytest.skip(message)
    _, reports, _ = broken_run
    screenshot = tmp_path / "parity.png"
    result = subprocess.run(
        [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
         "--enable-logging=stderr", "--v=0", "--hide-scrollbars", "--window-size=1200,2400",
         f"--screenshot={screenshot}", (reports / "parity.html").resolve().as_uri()],
        capture_output=True, text=True, timeout=120,
    )
    assert screenshot.is_file(), result.stderr
    console = [line for line in result.stderr.splitlines() if "CONSOLE" in line or "Failed to load" in line]
    assert not console, console
    pixels = (imread(str(screenshot))[..., :3] * 255).astype(int)
    plot_blue = np.all(np.abs(pixels - np.array([76, 114, 176])) <= 12, axis=-1)  # bars and lines of the plots
    assert plot_blue.sum() > 2000, "the plots rendered"


def test_report_check_regates_without_a_model(default_build) -> None:
    parity = str(default_build.build_dir / "parity.json")
    result = run_cli("report", "check", parity, "--min-cosine", "0.99", "--max-abs", "0.2")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("pass  ") == 2
    strict = run_cli("report", "check", parity, "--min-cosine", "0.9999", "--gate", "last_hidden_state.snr_db=40")
    assert_one_line_error(strict, ExitCode.PARITY_FAILED, "sentence_embedding cosine_mean", "last_hidden_state snr_db")
    probe = (
        "import sys\nfrom pipeline.cli.main import cli\n"
        f"cli.main(['report', 'check', {parity!r}], standalone_mode=False)\n"
        "heavy = [m for m in ('torch', 'onnxruntime', 'transformers', 'onnx', 'polygraphy', 'numpy') if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert "HEAVY []" in loaded.stdout, loaded.stdout + loaded.stderr


def test_report_check_bad_input_is_exit_2(default_build, tmp_path: Path) -> None:
    # a missing report: the exit-code table (tests/pipeline/test_exit_codes.py, code 2)
    (tmp_path / "bad.json").write_text("{ not json")
    assert_one_line_error(run_cli("report", "check", str(tmp_path / "bad.json")), ExitCode.BAD_INPUT, "not valid JSON")
    future = json.loads((default_build.build_dir / "parity.json").read_text())
    future["schema_version"] = 99
    (tmp_path / "future.json").write_text(json.dumps(future))
    assert_one_line_error(run_cli("report", "check", str(tmp_path / "future.json")), ExitCode.BAD_INPUT, "schema 99")
    parity = str(default_build.build_dir / "parity.json")
    assert_one_line_error(run_cli("report", "check", parity, "--gate", "logits.top1_agreement=0.9"),
                          ExitCode.BAD_INPUT, "no output 'logits'")


def test_report_check_refuses_an_older_schema(default_build, tmp_path: Path) -> None:
    """Schema 2 (the dicts before the report model) is another version: one line, exit 2, how to fix it."""
    report = json.loads((default_build.build_dir / "parity.json").read_text())
    version2 = {key: value for key, value in report.items() if key not in ("family", "target")}
    version2["schema_version"] = 2
    (tmp_path / "v2.json").write_text(json.dumps(version2))
    for command in (("check", str(tmp_path / "v2.json")),
                    ("diff", str(default_build.build_dir / "parity.json"), str(tmp_path / "v2.json"))):
        assert_one_line_error(run_cli("report", *command), ExitCode.BAD_INPUT, "schema 2", "pipeline verify")


@pytest.mark.parametrize("damage, needle", [
    (lambda r: r["outputs"]["sentence_embedding"].pop("cosine_min"), "cosine_min"),
    (lambda r: r["checks"][0].update(passed="maybe"), "checks.0.passed"),
    (lambda r: r.update(status="fail"), "status 'fail'"),
    (lambda r: r["candidate"].update(comment="edited by hand"), "candidate.comment"),
    (lambda r: r.update(outputs=[]), "outputs"),
])
def test_report_check_damaged_report_is_one_line_exit_2(default_build, tmp_path: Path, damage, needle: str) -> None:
    report = json.loads((default_build.build_dir / "parity.json").read_text())
    damage(report)
    (tmp_path / "damaged.json").write_text(json.dumps(report))
    for command in (("check", str(tmp_path / "damaged.json")),
                    ("diff", str(tmp_path / "damaged.json"), str(default_build.build_dir / "parity.json"))):
        assert_one_line_error(run_cli("report", *command), ExitCode.BAD_INPUT, "not a valid parity report", needle)


@pytest.mark.parametrize("damage", [lambda metrics: metrics.pop("snr_db"), lambda metrics: metrics.update(snr_db=None)])
def test_report_check_fails_a_gated_metric_that_is_missing(default_build, tmp_path: Path, damage) -> None:
    """A recorded gate on an optional metric that is gone or null: a parity failure (exit 4), not a pass."""
    report = json.loads((default_build.build_dir / "parity.json").read_text())
    report["thresholds"].append({"output": "sentence_embedding", "metric": "snr_db", "threshold": 10.0, "relation": ">="})
    (tmp_path / "gated.json").write_text(json.dumps(report))
    assert run_cli("report", "check", str(tmp_path / "gated.json")).returncode == 0, "the metric is there: passes"
    damage(report["outputs"]["sentence_embedding"])
    (tmp_path / "missing.json").write_text(json.dumps(report))
    result = run_cli("report", "check", str(tmp_path / "missing.json"), "--max-abs", "0.2")
    assert_one_line_error(result, ExitCode.PARITY_FAILED, "sentence_embedding snr_db missing (required >= 10)")
    assert "pass  sentence_embedding max_abs" in result.stdout and "pass  sentence_embedding cosine_mean" in result.stdout


def test_report_check_refuses_a_required_metric_that_is_null(default_build, tmp_path: Path) -> None:
    report = json.loads((default_build.build_dir / "parity.json").read_text())
    report["outputs"]["sentence_embedding"]["cosine_mean"] = None
    (tmp_path / "null.json").write_text(json.dumps(report))
    assert_one_line_error(run_cli("report", "check", str(tmp_path / "null.json")), ExitCode.BAD_INPUT,
                          "outputs.sentence_embedding.cosine_mean")


def test_report_diff_names_what_changed(default_build, broken_run) -> None:
    _, reports, _ = broken_run
    result = run_cli("report", "diff", str(default_build.build_dir / "parity.json"), str(reports / "parity.json"))
    assert result.returncode == 0, result.stderr
    assert "status: pass -> fail" in result.stdout
    assert "check sentence_embedding cosine_mean: pass -> FAIL" in result.stdout
    assert "sentence_embedding" in result.stdout and "snr_db" in result.stdout
    same = run_cli("report", "diff", str(default_build.build_dir / "parity.json"), str(default_build.build_dir / "parity.json"))
    assert "no metric changed" in same.stdout


def test_verify_bad_input_is_exit_2(default_build, tmp_path: Path) -> None:
    assert_one_line_error(run_cli("verify", str(tmp_path)), ExitCode.BAD_INPUT, "no manifest.json")
    candidate = tmp_path / "c.onnx"
    shutil.copyfile(default_build.build_dir / "model.onnx", candidate)
    result = run_cli("verify", str(default_build.build_dir), "--candidate", str(candidate))
    assert result.returncode == ExitCode.BAD_INPUT and "--candidate needs --output" in result.stderr
