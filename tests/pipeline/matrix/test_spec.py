"""MATRIX.yaml: product, zip and exclude make named jobs; every job's configuration is checked first."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.core.errors import ConfigError, ExitCode
from pipeline.matrix.spec import load_matrix
from tests.helpers import assert_one_line_error, run_cli
from tests.pipeline.matrix.conftest import write_matrix

AXES = {
    "model": {"a": {"model": {"path": "./a"}}, "b": {"model": {"path": "./b"}}},
    "target": {"cpu": {"target": "cpu"}, "trt": {"target": "trt"}},
}


def test_product_zip_and_exclude_name_the_jobs_in_order(tmp_path: Path) -> None:
    matrix = write_matrix(tmp_path / "m.yaml", {
        "base": {"calibration": {"samples": 8}},
        "product": AXES,
        "zip": {"calib": {"small": {"calibration": {"samples": 16}}, "big": {"calibration": {"samples": 64}}},
                "gate": {"loose": {"verify": {"min_cosine": 0.9}}, "tight": {"verify": {"min_cosine": 0.99}}}},
        "exclude": [{"model": "b", "target": "trt"}],
    })
    plan = load_matrix(matrix, tmp_path / "out")
    assert [job.name for job in plan.jobs] == [
        "a-cpu-small-loose", "a-cpu-big-tight", "a-trt-small-loose", "a-trt-big-tight",
        "b-cpu-small-loose", "b-cpu-big-tight"]
    job = plan.jobs[1]
    assert job.config["calibration"] == {"samples": 64}, "later fragments win over base"
    assert job.config["verify"] == {"min_cosine": 0.99}
    assert job.config["model"]["path"] == str(tmp_path / "a"), "relative to the matrix file's folder"
    assert job.config["output_dir"] == str(tmp_path / "out" / "a-cpu-big-tight")
    assert "quantization" not in job.config, "defaults the plan resolves (per model family) stay unset"


@pytest.mark.parametrize("data, needle", [
    ({"product": {"model": {"a": {"target": "gpu"}}}}, "job a"),
    ({"product": {"model": {"a": {"modle": {}}}}}, "unknown key 'modle'"),
    ({"product": {"model": {"a": {"output_dir": "x"}}}}, "sets output_dir"),
    ({"product": {"model": {"a-b": {}}}}, "label 'a-b'"),
    ({"product": AXES, "exclude": [{"model": "c"}]}, "no axis 'model' with a value 'c'"),
    ({"zip": {"x": {"p": {}}, "y": {"q": {}, "r": {}}}}, "same number of values"),
    ({"product": {"model": {"a": {}}}, "exclude": [{"model": "a"}]}, "every combination is excluded"),
    ({"base": {}}, "no axes"),
    ({"product": AXES, "retry": 3}, "unknown key 'retry'"),
])
def test_bad_matrices_fail_before_any_build(tmp_path: Path, data: dict, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(")):
        load_matrix(write_matrix(tmp_path / "m.yaml", data), tmp_path / "out")


def test_cli_lists_jobs_and_refuses_a_bad_matrix_in_one_line(tmp_path: Path) -> None:
    matrix = write_matrix(tmp_path / "m.yaml", {"product": AXES})
    listed = run_cli("matrix", str(matrix), "--list")
    assert listed.returncode == 0, listed.stderr
    assert [line.split(":")[0] for line in listed.stdout.splitlines()] == ["a-cpu", "a-trt", "b-cpu", "b-trt"]
    bad = write_matrix(tmp_path / "bad.yaml", {"product": {"model": {"a": {"target": "gpu"}}}})
    assert_one_line_error(run_cli("matrix", str(bad), "-o", str(tmp_path / "out")), ExitCode.BAD_INPUT, "job a")
    assert not (tmp_path / "out").exists(), "nothing was built or written"


def test_ray_missing_is_one_line_and_exit_5(tmp_path: Path) -> None:
    """Without Ray installed (an import that fails, as on a host without the `ray` extra)."""
    import os
    import subprocess
    import sys

    blocker = tmp_path / "no-ray" / "ray"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('No module named ray')\n")
    matrix = write_matrix(tmp_path / "m.yaml", {"product": AXES})
    root = Path(__file__).resolve().parents[3]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocker.parent), str(root)])}
    result = subprocess.run([sys.executable, "-m", "pipeline", "matrix", str(matrix), "-o", str(tmp_path / "out"),
                             "--ray", "auto"], capture_output=True, text=True, env=env, timeout=120)
    assert_one_line_error(result, ExitCode.MISSING_DEPENDENCY, "--ray needs Ray", "quantpipe[ray]")
    assert not (tmp_path / "out").exists()
