from __future__ import annotations

import json
from pathlib import Path

from pipeline.core.errors import ExitCode
from tests.helpers import run_cli


def test_bench_compares_fp32_and_int8_in_one_run(default_build, tmp_path: Path) -> None:
    out = tmp_path / "bench"
    result = run_cli("bench", str(default_build.build_dir), "--batch", "1,4", "--seq", "32",
                     "--runs", "3", "--warmup", "1", "-o", str(out), "--quiet", "--profile")
    assert result.returncode == 0, result.stderr
    name = default_build.build_dir.name
    assert f"{name}:int8 is" in result.stdout and f"as fast as {name}:fp32" in result.stdout
    payload = json.loads((out / "bench.json").read_text())
    assert {(r["batch"], r["sequence"]) for r in payload["results"]} == {(1, 32), (4, 32)}
    assert payload["threads"] == 2 and all(r["p50_ms"] > 0 for r in payload["results"])
    ratio = payload["speedup_p50"]["4x32"][f"{name}:int8"]
    fp32, int8 = (next(r["p50_ms"] for r in payload["results"] if r["artifact"] == f"{name}:{kind}"
                       and r["batch"] == 4) for kind in ("fp32", "int8"))
    assert abs(ratio - fp32 / int8) < 0.01
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert payload["machine"]["isa"] in ("avx2", "avx512-vnni", "amx", "arm64")
    # --profile: ONNX Runtime's own trace, by operator type: the INT8 graph's time is in its integer GEMMs, the
    # FP32 graph's in MatMul, and neither holds the other's kernels.
    profiles = {(p["artifact"], p["batch"]): p for p in json.loads((out / "profile.json").read_text())["profiles"]}
    assert len(profiles) == 4 and all(p["passes"] == 3 for p in profiles.values())
    fp32, int8 = profiles[(f"{name}:fp32", 4)]["kernel_ms"], profiles[(f"{name}:int8", 4)]["kernel_ms"]
    assert "MatMul" in fp32 and "DynamicQuantizeMatMul" not in fp32 and "DynamicQuantizeMatMul" in int8
    assert int8["DynamicQuantizeMatMul"] > 0 and list(int8.values()) == sorted(int8.values(), reverse=True)
    assert "| DynamicQuantizeMatMul |" in (out / "profile.md").read_text() and "Kernel time per forward pass" in result.stdout


def test_profile_counts_the_runs_after_the_warmup() -> None:
    from pipeline.bench.op_profile import kernel_ms_by_op

    def node(ts: int, op: str, dur: int) -> dict:
        return {"cat": "Node", "name": f"n{ts}_kernel_time", "ts": ts, "dur": dur, "args": {"op_name": op}}

    events = [{"cat": "Session", "name": "model_run", "ts": 0, "dur": 90}, node(1, "MatMul", 50_000),
              {"cat": "Session", "name": "model_run", "ts": 100, "dur": 90}, node(101, "MatMul", 2_000),
              node(102, "Add", 1_000), node(103, "MatMul", 0),
              {"cat": "Node", "name": "n104_fence_before", "ts": 104, "dur": 7_000, "args": {"op_name": "Add"}},
              {"cat": "Session", "name": "model_run", "ts": 200, "dur": 90}, node(201, "MatMul", 4_000)]
    assert kernel_ms_by_op(events, skip_runs=1) == ({"MatMul": 3.0, "Add": 0.5}, 2)
    assert kernel_ms_by_op(events, skip_runs=3) == ({}, 0)


def test_bench_refuses_a_missing_artifact(tmp_path: Path) -> None:
    result = run_cli("bench", str(tmp_path / "nothing.onnx"), str(tmp_path / "other.onnx"))
    assert result.returncode == ExitCode.BAD_INPUT
    assert "no such artifact" in result.stderr and "Traceback" not in result.stderr


class _RecordingSession:
    def __init__(self, name: str, log: list[str]) -> None:
        self.name, self.log = name, log

    def run(self, outputs: object, feed: object) -> None:
        self.log.append(self.name)


def test_timed_blocks_take_turns_and_settle_before_timing() -> None:
    from pipeline.bench.latency import BLOCK_RUNS, timed_blocks

    log: list[str] = []
    timings = timed_blocks([_RecordingSession("a", log), _RecordingSession("b", log)], {}, runs=12)
    assert [len(t) for t in timings] == [12, 12]
    # blocks of 1 untimed + BLOCK_RUNS timed runs; the order flips every round: a b | b a | a b
    assert BLOCK_RUNS == 5
    assert log == ["a"] * 6 + ["b"] * 6 + ["b"] * 6 + ["a"] * 6 + ["a"] * 3 + ["b"] * 3
