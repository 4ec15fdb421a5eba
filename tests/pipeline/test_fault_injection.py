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
# "none" kills a build that only reuses the cache, while it publishes.
# The two stage kills re-run real stages of the default model (~95 s on an AVX2 EPYC): `make test-slow`.
@pytest.mark.parametrize("run, cold_from, aim", [pytest.param(1, "quantize", "quantize", marks=pytest.mark.slow),
                                                 pytest.param(2, "verify", "verify", marks=pytest.mark.slow),
                                                 (3, "none", "publish")])
def test_killed_build_resumes_to_identical_artifacts(reference, tmp_path: Path, run: int, cold_from: str,
                                                     aim: str) -> None:
    result = run_scenario(reference, tmp_path, run, random.Random(run), cold_from=cold_from)
    assert result.aimed_at == aim and result.killed_in == [aim] * len(result.kills), result.killed_in
    assert result.passed, (result.kills, result.killed_in, result.problems)


def test_a_run_whose_kill_never_landed_fails(reference, tmp_path: Path) -> None:
    """The check can fail: aimed at quantize in a build that reuses every stage, no kill lands, and the run is
    not a pass even though the resumed build is byte-identical."""
    result = run_scenario(reference, tmp_path, 4, random.Random(2), cold_from="none", aim="quantize")  # one kill
    assert result.killed_in == ["finished"]
    assert result.problems == ["kill 1 aimed at quantize landed in finished"] and not result.passed
