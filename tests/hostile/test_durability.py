"""Durability: every publishing rename comes after the fsync of what it publishes, and a process killed
between write and rename leaves nothing that looks finished."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.hostile.conftest import TINY_CALIBRATION, read_json

KILL_AT_RENAME = """
import os, signal, sys
import pipeline.core.durable as durable
target_name = sys.argv[1]
original = durable.replace_durable
def replace_then_die(source, target):
    if os.path.basename(str(target)).startswith(target_name):
        os.kill(os.getpid(), signal.SIGKILL)  # written and fsync'ed, not yet renamed into place
    original(source, target)
durable.replace_durable = replace_then_die
import pipeline.build.manifest, pipeline.build.runner
pipeline.build.manifest.replace_durable = replace_then_die
pipeline.build.runner.replace_durable = replace_then_die
sys.argv = ["pipeline", *sys.argv[2:]]
from pipeline.cli.main import main
main()
"""


def test_every_publishing_rename_follows_the_fsync_of_its_data(build_copy: Path, tiny_model: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.build.runner import run_build
    from pipeline.config import load_config
    from pipeline.core.progress import Progress

    synced: set[int] = set()
    unsynced: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(descriptor: int) -> None:
        real_fsync(descriptor)
        synced.add(os.fstat(descriptor).st_ino)

    def replace(source: object, target: object) -> None:
        source, target = Path(str(source)), Path(str(target))
        # Renames that make something visible (not into a staging folder, which is synced as a whole).
        published = not any(part.startswith(("tmp-", ".")) for part in (target.name, *(p.name for p in target.parents)))
        if published:
            files = [source] if source.is_file() else [p for p in source.rglob("*") if p.is_file()]
            unsynced.extend(str(f) for f in files if f.stat().st_ino not in synced)
            if source.is_dir() and source.stat().st_ino not in synced:
                unsynced.append(str(source))
        real_replace(source, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    config = load_config(None, {"output_dir": str(build_copy), "model": {"path": str(tiny_model)},
                                "calibration": TINY_CALIBRATION})
    run_build(config, Progress(quiet=True), force=True)
    assert unsynced == []
    assert synced, "nothing was fsync'ed"


@pytest.mark.parametrize("rename", ["manifest.json", "quantize-", "model.onnx"])
def test_a_kill_between_write_and_rename_leaves_nothing_that_looks_finished(
        build_copy: Path, tiny_model: Path, rename: str) -> None:
    args = ["build", "--model", str(tiny_model), "-o", str(build_copy), "--calib-samples", "16",
            "--heldout-samples", "16", "-q"]
    if rename == "quantize-":
        for entry in read_json(build_copy / "manifest.json")["stages"]:
            if entry["stage"] in ("quantize", "verify"):
                import shutil

                shutil.rmtree(build_copy / ".stages" / entry["directory"])
    else:
        args.append("--force")
    killed = subprocess.run([sys.executable, "-c", KILL_AT_RENAME, rename, *args], capture_output=True, text=True,
                            timeout=300, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert killed.returncode == -9, killed.stderr
    if rename == "quantize-":  # killed before publishing: the previous build's manifest, still true to its files
        assert not list((build_copy / ".stages").glob("quantize-*")), "a half-made stage entry looks finished"
        _assert_manifest_matches(build_copy)
    else:
        assert not (build_copy / "manifest.json").exists(), "a killed build left a manifest that looks finished"
    resumed = subprocess.run([sys.executable, "-m", "pipeline", *args[:-1]], capture_output=True, text=True,
                             timeout=300, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert resumed.returncode == 0, resumed.stderr
    assert read_json(build_copy / "manifest.json")["status"] == "passed"
    _assert_manifest_matches(build_copy)


def _assert_manifest_matches(build_dir: Path) -> None:
    from pipeline.core.hashing import file_sha256

    for name, digest in read_json(build_dir / "manifest.json")["artifacts"].items():
        if not name.endswith("/"):
            assert file_sha256(build_dir / name) == digest, name
