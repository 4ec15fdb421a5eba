from __future__ import annotations

import copy
import json

from pipeline.core.errors import ExitCode
from tests.helpers import run_cli, seed_stage_cache
from tests.independent import discrepancies, sha256


def test_default_build_meets_parity(default_build, default_parity_recomputed) -> None:
    build = default_build.build_dir
    report = json.loads((build / "parity.json").read_text())
    assert report["status"] == "pass"
    # The report is about the published graphs, and its numbers are what an independent run measures.
    assert report["reference"]["sha256"] == sha256(build / "model.fp32.onnx")
    assert report["candidate"]["sha256"] == sha256(build / "model.onnx")
    assert discrepancies(report, default_parity_recomputed) == []
    embedding = default_parity_recomputed["sentence_embedding"]
    assert embedding["rows"] == report["heldout"]["samples"] >= 200
    assert embedding["cosine_mean"] >= 0.99
    assert 0 < embedding["max_abs"] < 0.2, "a real INT8 graph differs from FP32, but not by much"
    assert "| sentence_embedding cosine_mean |" in (build / "parity.md").read_text()


def test_an_edited_report_disagrees_with_the_recomputation(default_build, default_parity_recomputed) -> None:
    """The check above can fail: a report whose cosine was raised by 0.001 (or whose rows were cut) is caught."""
    report = json.loads((default_build.build_dir / "parity.json").read_text())
    edited = copy.deepcopy(report)
    edited["outputs"]["sentence_embedding"]["cosine_mean"] += 0.001
    problems = discrepancies(edited, default_parity_recomputed)
    assert len(problems) == 1 and problems[0].startswith("sentence_embedding cosine_mean: report"), problems
    edited = copy.deepcopy(report)
    edited["outputs"]["last_hidden_state"]["max_abs"] *= 0.9
    edited["outputs"]["sentence_embedding"]["rows"] -= 8
    assert [p.split(":")[0] for p in discrepancies(edited, default_parity_recomputed)] == [
        "sentence_embedding rows", "last_hidden_state max_abs"]


def test_missed_threshold_fails_with_parity_exit_code(default_build, tmp_path) -> None:
    build_dir = tmp_path / "strict"
    # The default build's stages up to quantize, seeded into a fresh folder: only verify runs (new gates).
    seed_stage_cache(build_dir, default_build.outputs, ("export", "optimize", "calibrate", "quantize"))
    result = run_cli("build", "-o", str(build_dir), "--min-cosine", "0.9999", "--max-abs", "0.001", "--quiet")
    assert result.returncode == ExitCode.PARITY_FAILED, result.stderr
    assert "Traceback" not in result.stderr
    assert "sentence_embedding cosine_mean" in result.stderr and "sentence_embedding max_abs" in result.stderr
    report = json.loads((build_dir / "parity.json").read_text())
    assert report["status"] == "fail" and len(report["failures"]) == 2
    assert not (build_dir / "model.onnx").exists(), "a failed build publishes no model"
    assert json.loads((build_dir / "manifest.json").read_text())["status"] == "parity_failed"
