from __future__ import annotations

import json
from pathlib import Path

from calibration.batches import load_batches
from pipeline.config import load_config
from pipeline.models import inspect_model
from pipeline.progress import Progress
from pipeline.stages.base import StageContext
from pipeline.stages.calibrate import CalibrateStage


def test_calibration_and_heldout_never_overlap(default_build) -> None:
    calibrate = default_build.outputs["calibrate"]
    samples = json.loads(calibrate.path("samples.json").read_text())
    assert len(samples["calibration"]) == 128
    assert len(samples["heldout"]) == 256
    assert not set(samples["calibration"]) & set(samples["heldout"])
    heldout = load_batches(calibrate.path("heldout.safetensors"))
    assert sum(len(batch["input_ids"]) for batch in heldout) == 256
    assert {tuple(sorted(batch)) for batch in heldout} == {("attention_mask", "input_ids", "token_type_ids")}
    assert len({batch["input_ids"].shape[1] for batch in heldout}) > 1, "batches follow the samples' lengths"


def _calibrate(tmp_path: Path, seed: int) -> bytes:
    config = load_config(None, {"calibration": {"samples": 16, "heldout_samples": 8, "seed": seed}})
    out = tmp_path / f"seed{seed}-{len(list(tmp_path.iterdir()))}"
    out.mkdir()
    CalibrateStage().run(StageContext(config, inspect_model(None, None), Progress(quiet=True)), out)
    return (out / "calibration.safetensors").read_bytes()


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path: Path) -> None:
    first, second, other = _calibrate(tmp_path, 1), _calibrate(tmp_path, 1), _calibrate(tmp_path, 2)
    assert first == second
    assert first != other
