"""The fault-injection suite, short: three SIGKILLs of a real `python -m pipeline build` at seeded
random times, then a resumed build that must be byte-identical to the uninterrupted default build.
The 20-run suite is `python -m tests.fault_injection --runs 20` (README: Reliability)."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import pytest

from tests.fault_injection import make_reference, manifest_problems, run_scenario


@pytest.fixture(scope="module")
def reference(default_build, tmp_path_factory: pytest.TempPathFactory):
    copy = tmp_path_factory.mktemp("fault-reference") / "reference"
    shutil.copytree(default_build.build_dir, copy)
    return make_reference(copy)


def test_reference_manifest_is_consistent(reference) -> None:
    assert manifest_problems(reference.build_dir, finished=True) == []


# Quantize and verify are the stages worth killing in the short suite (a few seconds each here);
# "none" kills a build that only reuses the cache: start-up, hash checks, publishing.
@pytest.mark.parametrize("run, cold_from", [(1, "quantize"), (2, "verify"), (3, "none")])
def test_killed_build_resumes_to_identical_artifacts(reference, tmp_path: Path, run: int, cold_from: str) -> None:
    result = run_scenario(reference, tmp_path, run, random.Random(run), cold_from=cold_from)
    assert result.passed, (result.kills, result.killed_in, result.problems)
