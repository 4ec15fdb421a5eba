"""The staged runner on the real model: cache reuse, partial re-runs, --force, corrupted cache."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.build.runner import CACHE_DIR, run_build
from pipeline.config import load_config
from pipeline.core.progress import Progress
from tests.helpers import run_cli


def _build(build_dir: Path, **overrides):
    config = load_config(None, {"output_dir": str(build_dir), **overrides})
    return run_build(config, Progress(quiet=True))


def _reran(result) -> list[str]:
    return [name for name, output in result.outputs.items() if not output.reused]


def test_identical_build_reuses_every_stage(default_build, cached_copy: Path) -> None:
    """The behaviour, not the speed (benchmarks time it): no stage runs, the same bytes are published."""
    result = _build(cached_copy)
    assert _reran(result) == []
    manifest = json.loads((cached_copy / "manifest.json").read_text())
    assert [stage["reused"] for stage in manifest["stages"]] == [True] * 5
    for name in ("model.onnx", "model.fp32.onnx", "parity.json"):
        assert (cached_copy / name).read_bytes() == (default_build.build_dir / name).read_bytes(), name


def test_cli_says_which_stages_were_reused(cached_copy: Path) -> None:
    result = run_cli("build", "-o", str(cached_copy))
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("reused cached output") == 5
    assert "reused 5/5 stages" in result.stdout


def test_changing_one_option_reruns_only_downstream_stages(cached_copy: Path) -> None:
    result = _build(cached_copy, verify={"min_cosine": 0.98})
    assert _reran(result) == ["verify"]
    # What re-runs is under test here, not static INT8's accuracy (cosine ~0.93 on MiniLM, the known outlier
    # problem, and different with 7-bit weights on hosts without VNNI): a gate no INT8 graph of it misses.
    result = _build(cached_copy, quantization={"mode": "static"}, verify={"min_cosine": 0.5})
    assert _reran(result) == ["quantize", "verify"]
    manifest = json.loads((cached_copy / "manifest.json").read_text())
    quantize = next(stage for stage in manifest["stages"] if stage["stage"] == "quantize")
    assert quantize["config"]["quantization"]["mode"] == "static"
    assert "stage:calibrate" in quantize["inputs"], "static quantization is keyed by its calibration data"


def test_corrupted_cached_artifact_is_detected_and_rebuilt(cached_copy: Path) -> None:
    (quantized,) = (cached_copy / CACHE_DIR).glob("quantize-*/model.onnx")
    quantized.write_bytes(quantized.read_bytes()[:1000])
    result = _build(cached_copy)
    assert _reran(result) == ["quantize"]
    assert result.passed


def test_force_reruns_everything_and_stop_after_stops(cached_copy: Path) -> None:
    result = _build_forced(cached_copy)
    assert _reran(result) == ["export", "optimize"]
    manifest = json.loads((cached_copy / "manifest.json").read_text())
    assert manifest["status"] == "incomplete"
    assert not (cached_copy / "model.onnx").exists()


def _build_forced(build_dir: Path):
    config = load_config(None, {"output_dir": str(build_dir)})
    return run_build(config, Progress(quiet=True), force=True, stop_after="optimize")
