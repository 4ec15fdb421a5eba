"""`pipeline matrix` locally: parallel worker processes sharing one stage cache, a killed worker retried
and resumed from the cache, a build that fails on its input named and not retried, the summary files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from pipeline.build.runner import CACHE_DIR, LOCK_FILE, SHARED_LOCKS
from pipeline.core.errors import ExitCode
from pipeline.core.hashing import directory_hashes
from tests.fault_injection import manifest_problems
from tests.helpers import run_cli
from tests.pipeline.matrix.conftest import TINY_CALIBRATION, write_matrix


def _wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _worker_pid(build_dir: Path) -> int:
    text = (build_dir / LOCK_FILE).read_text().strip() if (build_dir / LOCK_FILE).is_file() else ""
    return int(text) if text.isdigit() else 0


@pytest.fixture(scope="module")
def killed_matrix(tiny_bert_folder: Path, tmp_path_factory: pytest.TempPathFactory):
    """Two builds (cpu, trt) with --jobs 2 and a shared cache; the cpu job's worker is SIGKILLed once the
    shared export exists, while it is running a later stage."""
    root = tmp_path_factory.mktemp("local-matrix")
    matrix = write_matrix(root / "m.yaml", {
        "base": {"model": {"path": str(tiny_bert_folder)}, "calibration": TINY_CALIBRATION},
        "product": {"model": {"tiny": {}}, "target": {"cpu": {"target": "cpu"}, "trt": {"target": "trt"}}},
        "retries": 1,
    })
    out, cache = root / "out", root / "cache"
    process = subprocess.Popen([sys.executable, "-m", "pipeline", "matrix", str(matrix), "-o", str(out), "--jobs", "2",
                                "--cache-dir", str(cache)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    build = out / "tiny-cpu"
    _wait_for(lambda: list(cache.glob("export-*/stage.json")), 300, "the shared export")
    victim = _wait_for(lambda: _worker_pid(build), 60, "the cpu job's worker")
    os.kill(victim, signal.SIGKILL)
    stdout, stderr = process.communicate(timeout=600)
    return process.returncode, stdout, stderr, out, cache, victim


def test_a_killed_worker_is_retried_and_resumes_from_the_shared_cache(killed_matrix) -> None:
    returncode, stdout, stderr, out, _, victim = killed_matrix
    assert returncode == 0, stderr
    assert "2/2 builds passed" in stdout
    assert f"tiny-cpu: worker died (signal {signal.SIGKILL})" in stderr
    builds = {build["name"]: build for build in json.loads((out / "matrix.json").read_text())["builds"]}
    assert builds["tiny-cpu"]["attempts"] == 2 and builds["tiny-trt"]["attempts"] == 1
    assert "export" in builds["tiny-cpu"]["reused"], "the retry resumed from the cache"
    log = (out / "tiny-cpu.log").read_text()
    assert f"(pid {victim})" in log and log.count("building into") == 2


def test_nothing_is_half_published_and_the_jobs_shared_one_export(killed_matrix) -> None:
    _, _, _, out, cache, _ = killed_matrix
    for job in ("tiny-cpu", "tiny-trt"):
        problems = [p for p in manifest_problems(out / job, finished=False) if "trt/" not in p]  # a folder: not a file
        assert problems == [], "every published file matches the manifest"
        manifest = json.loads((out / job / "manifest.json").read_text())
        assert manifest["status"] == "passed"
        for entry in manifest["stages"]:  # the stage outputs it names are whole entries of the shared cache
            directory = cache / entry["directory"]
            assert json.loads((directory / "stage.json").read_text())["files"] == entry["outputs"]
            assert directory_hashes(directory).keys() - {"stage.json"} == entry["outputs"].keys()
        assert not list((out / job).glob(".*.tmp")) and not list((out / job / CACHE_DIR).glob("tmp-*"))
    assert not list(cache.glob("tmp-*")), "the killed worker's staging folder was removed under its entry lock"
    assert len(list(cache.glob("export-*/stage.json"))) == 1, "cpu and trt reuse one export"
    assert {path.name for path in (cache / SHARED_LOCKS).iterdir()} == \
        {f"{path.name}{LOCK_FILE}" for path in cache.iterdir() if not path.name.startswith(".")}
    manifests = [json.loads((out / job / "manifest.json").read_text()) for job in ("tiny-cpu", "tiny-trt")]
    exports = [next(s for s in manifest["stages"] if s["stage"] == "export") for manifest in manifests]
    assert exports[0]["key"] == exports[1]["key"]


def test_summary_files_list_every_build(killed_matrix) -> None:
    _, _, _, out, _, _ = killed_matrix
    table = (out / "matrix.md").read_text()
    assert "| tiny-cpu | passed | 0 | 2 |" in table and "| tiny-trt | passed | 0 | 1 |" in table
    suite = ET.parse(out / "matrix.junit.xml").getroot().find("testsuite")
    assert [case.get("name") for case in suite.iter("testcase")] == ["tiny-cpu", "tiny-trt"]
    assert suite.get("failures") == "0"


def test_a_build_that_fails_on_its_input_is_named_and_not_retried(tiny_bert_folder: Path, tmp_path: Path) -> None:
    matrix = write_matrix(tmp_path / "m.yaml", {
        "base": {"calibration": TINY_CALIBRATION, "quantization": {"mode": "dynamic"}},
        "product": {"model": {"missing": {"model": {"path": "./no-such-model"}}}, "target": {"cpu": {"target": "cpu"}}},
    })
    result = run_cli("matrix", str(matrix), "-o", str(tmp_path / "out"))
    assert result.returncode == ExitCode.BAD_INPUT, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: 1 of 1 builds failed: missing-cpu (failed, exit 2)")
    assert "Traceback" not in result.stderr and "retrying" not in result.stderr
    data = json.loads((tmp_path / "out" / "matrix.json").read_text())
    assert data["failed"] == ["missing-cpu"] and data["builds"][0]["attempts"] == 1
    assert "no-such-model" in data["builds"][0]["message"]
    failure = ET.parse(tmp_path / "out" / "matrix.junit.xml").getroot().find("testsuite/testcase/failure")
    assert failure is not None and failure.get("type") == "failed"
