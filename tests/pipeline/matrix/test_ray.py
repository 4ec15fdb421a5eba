"""`pipeline matrix --ray` on a real local Ray cluster (a head and one worker node on 127.0.0.1, one CPU
each, started once for this module): four builds (tiny BERT and tiny Llama x cpu and trt) whose
artifacts are byte-identical to the same builds run locally one by one; a killed worker process whose
job is retried and resumed from the shared cache; the fallback search fanned out as Ray tasks."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest

from pipeline.build.runner import LOCK_FILE, run_build
from pipeline.config import load_config
from pipeline.core.hashing import directory_hashes
from pipeline.core.progress import Progress
from tests.pipeline.matrix.conftest import TINY_CALIBRATION, write_matrix
from tests.pipeline.matrix.test_local import _wait_for, _worker_pid

ray = pytest.importorskip("ray")
# A real two-node cluster and eight builds (~2.5 min on an AVX2 EPYC): `make test-slow` (CI runs it too).
pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[3]
LLM_CALIBRATION = {"samples": 8, "heldout_samples": 24, "max_length": 32}
# Reports hold measured speeds (LLM decode tokens/s) and the manifest times and paths: they are not
# expected to be byte-identical; every model, tokenizer and bundle file is.
NOT_REPRODUCIBLE = ("manifest.json", "parity.json", "parity.md", "parity.html", "parity.junit.xml")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _stop(process: subprocess.Popen) -> None:
    """The `ray start --block` we started, and everything it started (its own process group)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
            process.wait(timeout=20)
            return
        except (ProcessLookupError, subprocess.TimeoutExpired):
            continue


@pytest.fixture(scope="module")
def ray_cluster():
    """A head (1 CPU) and a worker node (1 CPU) on 127.0.0.1, token auth off (loopback only)."""
    temp = Path(tempfile.mkdtemp(prefix="qp-ray-", dir="/tmp"))  # short: Ray's socket paths have a length limit
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    previous_auth = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"  # for this process's ray.init
    address = f"127.0.0.1:{_free_port()}"
    command = [str(Path(sys.executable).with_name("ray")), "start", "--block", "--num-cpus=1",
               "--node-ip-address=127.0.0.1", "--disable-usage-stats"]
    logs = (temp / "head.log").open("w"), (temp / "worker.log").open("w")
    head = subprocess.Popen([*command, "--head", f"--port={address.split(':')[1]}", "--include-dashboard=false",
                             f"--temp-dir={temp}"], env=env, stdout=logs[0], stderr=subprocess.STDOUT,
                            start_new_session=True)
    workers: list[subprocess.Popen] = []
    try:
        _wait_for(lambda: "Ray runtime started" in (temp / "head.log").read_text(), 120, "the Ray head")
        workers.append(subprocess.Popen([*command, f"--address={address}"], env=env, stdout=logs[1],
                                        stderr=subprocess.STDOUT, start_new_session=True))
        ray.init(address=address, log_to_driver=False, configure_logging=False)
        _wait_for(lambda: len([n for n in ray.nodes() if n["Alive"]]) == 2, 120, "the worker node")
        yield address
    finally:
        ray.shutdown()
        for process in [*workers, head]:
            _stop(process)
        for log in logs:
            log.close()
        shutil.rmtree(temp, ignore_errors=True)
        if previous_auth is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = previous_auth


@pytest.fixture(scope="module")
def tiny_models(tiny_bert_folder: Path, tiny_llama_folder: Path) -> dict[str, dict]:
    return {"bert": {"model": {"path": str(tiny_bert_folder)}, "calibration": TINY_CALIBRATION},
            "llama": {"model": {"path": str(tiny_llama_folder), "task": "text-generation"},
                      "calibration": LLM_CALIBRATION, "verify": {"greedy_prompts": 2}}}


def _published(build_dir: Path) -> dict[str, str]:
    return {name: digest for name, digest in directory_hashes(build_dir).items()
            if not name.startswith(".") and Path(name).name not in NOT_REPRODUCIBLE}


@pytest.fixture(scope="module")
def ray_matrix(ray_cluster: str, tiny_models: dict, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("ray-matrix")
    matrix = write_matrix(root / "m.yaml", {
        "product": {"model": tiny_models, "target": {"cpu": {"target": "cpu"}, "trt": {"target": "trt"}}}})
    result = subprocess.run([sys.executable, "-m", "pipeline", "matrix", str(matrix), "-o", str(root / "out"),
                             "--ray", ray_cluster], capture_output=True, text=True, timeout=900)
    yield result, root / "out"
    shutil.rmtree(_node_root(root / "out"), ignore_errors=True)


def _node_root(out: Path) -> Path:
    from pipeline.matrix.ray_backend import node_work_root

    return Path(node_work_root(out))  # where the tasks built (both nodes are this host)


def test_four_builds_on_ray_are_byte_identical_to_local_builds_one_by_one(
        ray_matrix, tiny_models: dict, tmp_path_factory: pytest.TempPathFactory) -> None:
    result, out = ray_matrix
    assert result.returncode == 0, result.stderr
    assert "4/4 builds passed" in result.stdout
    builds = json.loads((out / "matrix.json").read_text())["builds"]
    assert {build["name"] for build in builds} == {"bert-cpu", "bert-trt", "llama-cpu", "llama-trt"}
    assert len({build["host"] for build in builds}) == 2, "both nodes of the cluster ran jobs"
    local = tmp_path_factory.mktemp("one-by-one")
    for build in builds:
        model, target = build["labels"]["model"], build["labels"]["target"]
        config = load_config(None, {**tiny_models[model], "target": target, "output_dir": str(local / build["name"])})
        run_build(config, Progress(quiet=True))
        expected, actual = _published(local / build["name"]), _published(out / build["name"])
        assert "model.onnx" in expected and any(name.startswith("tokenizer/") for name in expected)
        assert actual == expected, build["name"]
        verdicts = [json.loads((folder / "parity.json").read_text())["status"] for folder in (local / build["name"],
                                                                                          out / build["name"])]
        assert verdicts == ["pass", "pass"]


def test_a_killed_ray_worker_is_retried_and_resumes_from_the_shared_cache(
        ray_cluster: str, tiny_models: dict, tmp_path: Path) -> None:
    matrix = write_matrix(tmp_path / "m.yaml", {"product": {"model": {"bert": tiny_models["bert"]},
                                                            "target": {"cpu": {"target": "cpu"}}}, "retries": 2})
    out, cache = tmp_path / "out", tmp_path / "cache"
    node_build = _node_root(out) / "bert-cpu"
    killed: list[int] = []

    def kill_after_export() -> None:
        _wait_for(lambda: list(cache.glob("optimize-*/stage.json")), 300, "the optimize stage in the shared cache")
        pid = _wait_for(lambda: _worker_pid(node_build), 60, "the Ray worker's pid")
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)

    killer = threading.Thread(target=kill_after_export, daemon=True)
    killer.start()
    result = subprocess.run([sys.executable, "-m", "pipeline", "matrix", str(matrix), "-o", str(out), "--ray",
                             ray_cluster, "--cache-dir", str(cache)], capture_output=True, text=True, timeout=600)
    killer.join(timeout=5)
    assert killed, "the worker was killed mid-job"
    assert result.returncode == 0, result.stderr
    (build,) = json.loads((out / "matrix.json").read_text())["builds"]
    assert build["status"] == "passed" and build["attempts"] == 2
    assert {"export", "optimize"} <= set(build["reused"]), "the retry resumed from the cache"
    assert not list(cache.glob("tmp-*")) and not list(out.glob(".*.tmp")), "nothing half-published"
    manifest = json.loads((out / "bert-cpu" / "manifest.json").read_text())
    assert manifest["status"] == "passed"
    assert directory_hashes(out / "bert-cpu")["model.onnx"] == manifest["artifacts"]["model.onnx"]
    assert str(killed[0]) not in (node_build / LOCK_FILE).read_text()
    shutil.rmtree(_node_root(out), ignore_errors=True)


def test_the_fallback_search_on_ray_tasks_picks_the_nodes_of_the_sequential_search(
        ray_cluster: str, tiny_bert_folder: Path, tmp_path: Path) -> None:
    from engines import fallback, parallel
    from pipeline.stages.quantize import tuning_metric

    config = load_config(None, {"model": {"path": str(tiny_bert_folder)}, "calibration": TINY_CALIBRATION,
                                "quantization": {"mode": "static"}, "output_dir": str(tmp_path / "b")})
    stages = run_build(config, Progress(quiet=True), stop_after="quantize").outputs
    fp32, int8 = stages["optimize"].path("model.onnx"), stages["quantize"].path("model.onnx")
    from calibration.batches import load_batches
    from pipeline.build.plan import plan_build

    batches = load_batches(stages["calibrate"].path("calibration.safetensors"))[:2]
    evaluate = tuning_metric(plan_build(config).model.task, fp32, batches)
    (tmp_path / "s").mkdir()
    sequential = fallback.rank_sensitivity(fp32, int8, evaluate, tmp_path / "s")
    parallel.configure(backend="ray")
    try:
        on_ray = fallback.rank_sensitivity(fp32, int8, evaluate, tmp_path / "s")
        # greedy candidates scored two at a time on the cluster: it stops where the sequential loop stops
        outcome = fallback.greedy_search(on_ray, lambda names: len(names) / 10, 0.25, 6, 0.0)
    finally:
        parallel.configure(backend="local")
    assert len(sequential) >= 6 and on_ray == sequential
    assert outcome.chosen == [name for name, _ in sequential[:3]] and len(outcome.trials) == 4
