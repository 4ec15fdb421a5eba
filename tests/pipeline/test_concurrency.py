"""One build per directory: two concurrent real builds, --lock-timeout, leftovers of killed builds."""

from __future__ import annotations

import fcntl
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.build.runner import CACHE_DIR, LOCK_FILE, run_build
from pipeline.config import load_config
from pipeline.core.errors import ExitCode
from pipeline.core.progress import Progress
from tests.fault_injection import artifact_hashes, manifest_problems
from tests.helpers import assert_one_line_error, run_cli


def _copy_without(default_build, target: Path, *stages: str) -> Path:
    shutil.copytree(default_build.build_dir, target)
    manifest = json.loads((target / "manifest.json").read_text())
    for entry in manifest["stages"]:
        if entry["stage"] in stages:
            shutil.rmtree(target / CACHE_DIR / entry["directory"])
    return target


def test_two_concurrent_builds_one_does_the_work_the_other_waits_and_reuses(default_build, tmp_path: Path) -> None:
    """No race: the test holds the directory's lock until both builds have said they wait for it; released,
    one takes it and runs the missing stages while the other keeps waiting, then reuses all of them."""
    build_dir = _copy_without(default_build, tmp_path / "build", "quantize", "verify")
    command = [sys.executable, "-m", "pipeline", "build", "-o", str(build_dir)]
    logs: list[list[str]] = [[], []]
    with (build_dir / LOCK_FILE).open("a+") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX)
        builds = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                  for _ in range(2)]
        for build, log in zip(builds, logs):
            assert build.stderr is not None
            for line in build.stderr:
                log.append(line)
                if "waiting for it to finish" in line:
                    break
    finished = [build.communicate(timeout=600) for build in builds]
    errors = ["".join(log) + rest for log, (_, rest) in zip(logs, finished)]
    assert [build.returncode for build in builds] == [0, 0], errors
    assert all("waiting for it to finish" in error for error in errors)
    (worker,) = [i for i, error in enumerate(errors) if "quantize: running" in error]
    other = 1 - worker
    assert "verify: running" in errors[worker] and "reused 3/5 stages" in finished[worker][0]
    assert errors[other].count("reused cached output") == 5 and "running" not in errors[other].replace("waiting", "")
    assert "reused 5/5 stages" in finished[other][0]
    assert manifest_problems(build_dir, finished=True) == []
    assert artifact_hashes(build_dir) == artifact_hashes(default_build.build_dir)


@pytest.mark.parametrize("timeout", ["1.5"])  # "0" (no wait): the exit-code table, tests/pipeline/test_exit_codes.py
def test_lock_timeout_fails_with_exit_6_while_another_build_holds_the_directory(tmp_path: Path, timeout: str) -> None:
    build_dir = tmp_path / "build"
    build_dir.mkdir()
    with (build_dir / LOCK_FILE).open("a+") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX)
        holder.write("4242")
        holder.flush()
        result = run_cli("build", "-o", str(build_dir), "--lock-timeout", timeout, "--quiet")
    assert_one_line_error(result, ExitCode.LOCKED, str(build_dir), "pid 4242")
    assert not (build_dir / CACHE_DIR).exists(), "nothing was written while the lock was held elsewhere"


def test_leftovers_of_a_killed_build_are_removed_under_the_lock(default_build, tmp_path: Path) -> None:
    build_dir = tmp_path / "build"
    shutil.copytree(default_build.build_dir, build_dir)
    staging = build_dir / CACHE_DIR / "tmp-quantize-abc123"
    staging.mkdir()
    (staging / "model.onnx").write_bytes(b"half a graph")
    (build_dir / CACHE_DIR / "tmp-scratch-xyz").mkdir()
    (build_dir / ".model.onnx.tmp").write_bytes(b"half")
    (build_dir / ".tokenizer.tmp").mkdir()
    config = load_config(None, {"output_dir": str(build_dir)})
    result = run_build(config, Progress(quiet=True))
    assert all(output.reused for output in result.outputs.values())
    leftovers = list((build_dir / CACHE_DIR).glob("tmp-*")) + list(build_dir.glob(".*.tmp"))
    assert leftovers == []
    assert manifest_problems(build_dir, finished=True) == []


def test_refuses_to_build_into_a_folder_that_is_not_a_build_directory(tmp_path: Path) -> None:
    (tmp_path / "tokenizer").mkdir()
    (tmp_path / "notes.txt").write_text("mine")
    result = run_cli("build", "-o", str(tmp_path), "--quiet")
    assert_one_line_error(result, ExitCode.BAD_INPUT, "refusing to build into", "not a build directory")
    assert (tmp_path / "tokenizer").is_dir() and (tmp_path / "notes.txt").read_text() == "mine"
