from __future__ import annotations

import json

from pipeline.core.errors import ExitCode
from tests.helpers import run_cli


def test_default_build_meets_parity(default_build) -> None:
    report = json.loads((default_build.build_dir / "parity.json").read_text())
    assert report["status"] == "pass"
    embedding = report["outputs"]["sentence_embedding"]
    assert embedding["rows"] >= 200
    assert embedding["cosine_mean"] >= 0.99
    assert 0 < embedding["max_abs"] < 0.2, "a real INT8 graph differs from FP32, but not by much"
    assert report["heldout"]["samples"] >= 200
    assert "| sentence_embedding cosine_mean |" in (default_build.build_dir / "parity.md").read_text()


def test_missed_threshold_fails_with_parity_exit_code(default_build, tmp_path) -> None:
    build_dir = tmp_path / "strict"
    result = run_cli("build", "-o", str(build_dir), "--min-cosine", "0.9999", "--max-abs", "0.001", "--quiet")
    assert result.returncode == ExitCode.PARITY_FAILED, result.stderr
    assert "Traceback" not in result.stderr
    assert "sentence_embedding cosine_mean" in result.stderr and "sentence_embedding max_abs" in result.stderr
    report = json.loads((build_dir / "parity.json").read_text())
    assert report["status"] == "fail" and len(report["failures"]) == 2
    assert not (build_dir / "model.onnx").exists(), "a failed build publishes no model"
    assert json.loads((build_dir / "manifest.json").read_text())["status"] == "parity_failed"
