from __future__ import annotations

import json
from pathlib import Path

from pipeline.core.errors import ExitCode
from tests.helpers import run_cli


def test_bench_compares_fp32_and_int8_in_one_run(default_build, tmp_path: Path) -> None:
    out = tmp_path / "bench"
    result = run_cli("bench", str(default_build.build_dir), "--batch", "1,4", "--seq", "32",
                     "--runs", "3", "--warmup", "1", "-o", str(out), "--quiet")
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
