"""Fault injection: kill `python -m pipeline build` with SIGKILL at random points, run it again, and
check that the result is byte-identical to an uninterrupted build's and that the manifest is consistent.

    python -m tests.fault_injection --runs 20            # the documented suite (README: Reliability)
    python -m tests.fault_injection --runs 3 --seed 7    # a short one

Each run starts from a copy of a finished build directory whose cache entries from a randomly drawn
stage onwards are deleted (or all of them, or none), so the killed build has real stages to run. Each
kill aims at one place: the first stage to run (cold from that stage; "empty": export) or, with a warm
cache ("none"), publishing. The build's progress lines say when it got there; the kill lands a random
time later, drawn over the reference's wall time of that stage, and where it landed is read back from
the progress lines. A kill that lands elsewhere (the stage finished first) is undone and retried
earlier; a run whose kills did not all land where they aimed is a failed run. Some runs are killed
twice. After each kill the directory must not look finished unless it is (a manifest, when present,
matches every artifact it lists); after the final, uninterrupted run every artifact (the published
files and every stage output, calibration cache included) must hash as in the reference, and every
manifest record must match the files on disk.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from pipeline.core.hashing import combined_hash, directory_hashes, file_sha256

STAGES = ("export", "optimize", "calibrate", "quantize", "verify")
PUBLISHED = ("model.onnx", "model.fp32.onnx", "parity.json", "parity.md", "parity.html", "parity.junit.xml")
CACHE = ".stages"
_PROGRESS = re.compile(r"^\[\s*[\d.]+s\] (\w+): ")


@dataclass
class Reference:
    build_dir: Path
    hashes: dict[str, str]  # published files and "<stage>/<file>" of every stage output
    stage_seconds: dict[str, float]
    startup_seconds: float


@dataclass
class RunResult:
    run: int
    cold_from: str  # first stage whose cache entry was deleted ("none": warm cache, "empty": no directory)
    aimed_at: str = ""  # where every kill of the run was meant to land: a stage, or "publish"
    kills: list[float] = field(default_factory=list)  # seconds after the aimed stage started
    killed_in: list[str] = field(default_factory=list)  # where the build was when killed ("finished": it was not)
    leftovers: int = 0  # staging folders and .tmp files the kills left (removed by the next build)
    problems: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.problems


def build_command(build_dir: Path) -> list[str]:
    return [sys.executable, "-m", "pipeline", "build", "-o", str(build_dir)]


def run_build(build_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(build_command(build_dir), capture_output=True, text=True, timeout=1800)


def aim_of(cold_from: str) -> str:
    """Where the kills of a run aim: the first stage the build really runs, or publishing."""
    return {"empty": STAGES[0], "none": "publish"}.get(cold_from, cold_from)


def _place(line: str) -> Optional[str]:
    """The place a progress line says the build is in; after the last stage finished (or was reused): publish."""
    match = _PROGRESS.match(line)
    if not match:
        return None
    stage, message = match.group(1), line[match.end():]
    if stage == STAGES[-1] and (message.startswith("done in") or message.startswith("reused cached output")):
        return "publish"
    return stage


def _started(line: str, aim: str) -> bool:
    if aim == "publish":
        return _place(line) == "publish"
    return line.startswith("[") and f"] {aim}: running" in line


def kill_build_at(build_dir: Path, aim: str, delay: float, log: Path) -> str:
    """Start a build, SIGKILL its process group `delay` seconds after it reached `aim` (the progress line of
    that stage starting, or of the last stage ending for "publish"). Returns where the build was when the
    kill landed, from its progress lines ("start-up" before any; "finished" when it ended before the kill
    or never reached `aim`)."""
    lines: list[str] = []
    process = subprocess.Popen(build_command(build_dir), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    try:
        assert process.stderr is not None
        for line in process.stderr:
            lines.append(line)
            if _started(line, aim):
                break
        else:  # the build ended without reaching the aimed place
            process.wait()
            return "finished"
        try:
            process.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            lines += process.stderr.readlines()
            places = [place for place in map(_place, lines) if place]
            return places[-1] if places else "start-up"
        lines += process.stderr.readlines()
        return "finished"
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        log.write_text("".join(lines), encoding="utf-8")


def artifact_hashes(build_dir: Path) -> dict[str, str]:
    """What must be byte-identical across builds: published files, the tokenizer, every stage output."""
    hashes = {name: file_sha256(build_dir / name) for name in PUBLISHED if (build_dir / name).is_file()}
    if (build_dir / "tokenizer").is_dir():
        hashes.update({f"tokenizer/{name}": digest for name, digest in directory_hashes(build_dir / "tokenizer").items()})
    manifest = json.loads((build_dir / "manifest.json").read_text(encoding="utf-8"))
    for entry in manifest["stages"]:
        for name, digest in directory_hashes(build_dir / CACHE / entry["directory"]).items():
            if name != "stage.json":
                hashes[f"{entry['stage']}/{name}"] = digest
    return hashes


def leftovers(build_dir: Path) -> list[str]:
    return sorted(p.name for p in (build_dir / CACHE).glob("tmp-*")) + sorted(p.name for p in build_dir.glob(".*.tmp"))


def manifest_problems(build_dir: Path, finished: bool) -> list[str]:
    """A manifest must match what it lists. finished=True: also a passed build, every stage record
    matching its files, and each stage's inputs matching its upstream outputs."""
    path = build_dir / "manifest.json"
    if not path.is_file():
        return ["no manifest.json"] if finished else []
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        return [f"manifest.json is not valid JSON ({exc})"]
    problems = []
    for name, digest in manifest.get("artifacts", {}).items():
        if not (build_dir / name).is_file():
            problems.append(f"manifest lists {name}, which is missing")
        elif file_sha256(build_dir / name) != digest:
            problems.append(f"{name} does not match the manifest's hash")
    if manifest.get("status") == "passed":
        for name in PUBLISHED:
            if name not in manifest.get("artifacts", {}):
                problems.append(f"a passed manifest does not list {name}")
    if not finished:
        return problems
    if manifest.get("status") != "passed":
        problems.append(f"status is {manifest.get('status')!r}, not 'passed'")
    content: dict[str, str] = {}
    for entry in manifest["stages"]:
        directory = build_dir / CACHE / entry["directory"]
        files = directory_hashes(directory) if directory.is_dir() else {}
        record = json.loads((directory / "stage.json").read_text()) if "stage.json" in files else {}
        files.pop("stage.json", None)
        if files != entry["outputs"] or record.get("files") != entry["outputs"]:
            problems.append(f"stage {entry['stage']}: files, stage.json and manifest disagree")
        for upstream, digest in entry["inputs"].items():
            if upstream.startswith("stage:") and content.get(upstream[6:]) != digest:
                problems.append(f"stage {entry['stage']}: input {upstream} is not that stage's output")
        content[entry["stage"]] = combined_hash(entry["outputs"])
    if [entry["stage"] for entry in manifest["stages"]] != list(STAGES):
        problems.append("the manifest does not record the five stages in order")
    return problems


def prepare(reference: Reference, build_dir: Path, cold_from: str) -> None:
    if cold_from == "empty":
        return
    shutil.copytree(reference.build_dir, build_dir)
    if cold_from == "none":
        return
    manifest = json.loads((build_dir / "manifest.json").read_text(encoding="utf-8"))
    cold = STAGES[STAGES.index(cold_from):]
    for entry in manifest["stages"]:
        if entry["stage"] in cold:
            shutil.rmtree(build_dir / CACHE / entry["directory"])


def aimed_seconds(reference: Reference, aim: str) -> float:
    """How long the aimed place lasts in the reference build (publishing: start-up's share at most)."""
    return reference.stage_seconds.get(aim, min(reference.startup_seconds, 1.0))


def _reached(log: Path, aim: str) -> bool:
    return any(_started(line, aim) for line in log.read_text(encoding="utf-8").splitlines(keepends=True))


def run_scenario(reference: Reference, work: Path, run: int, rng: random.Random,
                 cold_from: Optional[str] = None, aim: Optional[str] = None) -> RunResult:
    """One run: prepare a state, kill the build once or twice where it aims (default: `aim_of(cold_from)`)
    at random times, resume, compare."""
    cold_from = cold_from or rng.choice(("empty", *STAGES, "none"))
    kills = 2 if rng.random() < 0.25 else 1
    result = RunResult(run, cold_from, aimed_at=aim or aim_of(cold_from))
    build_dir = work / f"run-{run:02d}"
    shutil.rmtree(build_dir, ignore_errors=True)
    prepare(reference, build_dir, cold_from)
    duration = aimed_seconds(reference, result.aimed_at)
    for attempt in range(kills):
        # The state this kill starts from, to retry from when the kill lands after the aimed place ended.
        snapshot = work / f"run-{run:02d}.snapshot" if attempt and build_dir.is_dir() else None
        if snapshot:
            shutil.rmtree(snapshot, ignore_errors=True)
            shutil.copytree(build_dir, snapshot)
        delay = round(rng.uniform(0.0, duration), 2)
        log = work / f"run-{run:02d}.kill{attempt}.log"
        landed = kill_build_at(build_dir, result.aimed_at, delay, log)
        # A build that never reached the aimed place is not retried: no shorter delay would help.
        for _ in range(4):
            if landed == result.aimed_at or not _reached(log, result.aimed_at):
                break
            shutil.rmtree(build_dir, ignore_errors=True)
            if snapshot:
                shutil.copytree(snapshot, build_dir)
            elif not attempt:
                prepare(reference, build_dir, cold_from)
            delay = round(delay / 3, 2)
            landed = kill_build_at(build_dir, result.aimed_at, delay, log)
        if snapshot:
            shutil.rmtree(snapshot, ignore_errors=True)
        result.kills.append(delay)
        result.killed_in.append(landed)
        if landed != result.aimed_at:
            result.problems.append(f"kill {attempt + 1} aimed at {result.aimed_at} landed in {landed}")
        if build_dir.is_dir():
            result.leftovers += len(leftovers(build_dir))
            result.problems += [f"after kill {attempt + 1}: {p}" for p in manifest_problems(build_dir, finished=False)]
    final = run_build(build_dir)
    if final.returncode != 0:
        result.problems.append(f"the resumed build exited {final.returncode}: {final.stderr.strip()[-300:]}")
        return result
    result.problems += manifest_problems(build_dir, finished=True)
    if leftovers(build_dir):
        result.problems.append(f"leftovers after the resumed build: {leftovers(build_dir)}")
    actual = artifact_hashes(build_dir)
    for name in sorted(set(actual) | set(reference.hashes)):
        if actual.get(name) != reference.hashes.get(name):
            result.problems.append(f"{name} differs from the uninterrupted build's")
    if result.passed:
        shutil.rmtree(build_dir, ignore_errors=True)  # keep failed runs for inspection
    return result


def make_reference(build_dir: Path) -> Reference:
    """An uninterrupted build (made now unless build_dir already holds a passed one) and its timings."""
    manifest_path = build_dir / "manifest.json"
    if not manifest_path.is_file() or json.loads(manifest_path.read_text())["status"] != "passed":
        completed = run_build(build_dir)
        if completed.returncode != 0:
            raise SystemExit(f"the reference build failed ({completed.returncode}): {completed.stderr[-500:]}")
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    problems = manifest_problems(build_dir, finished=True)
    if problems:
        raise SystemExit(f"the reference build is inconsistent: {problems}")
    started = time.perf_counter()
    if run_build(build_dir).returncode != 0:  # everything reused: start-up, hashing and publishing only
        raise SystemExit("a no-op rebuild of the reference failed")
    startup = time.perf_counter() - started
    seconds = {entry["stage"]: entry["wall_time_s"] for entry in manifest["stages"]}
    return Reference(build_dir, artifact_hashes(build_dir), seconds, startup)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=Path("build/fault-injection"),
                        help="Scratch folder (failed runs are kept there). [default: build/fault-injection]")
    parser.add_argument("--reference", type=Path,
                        help="A finished default build to compare with. [default: built into WORK/reference]")
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    reference = make_reference(args.reference or args.work / "reference")
    print(f"reference: {reference.build_dir} (start-up {reference.startup_seconds:.1f}s, stages "
          + ", ".join(f"{s} {t:.1f}s" for s, t in reference.stage_seconds.items()) + ")", flush=True)
    rng = random.Random(args.seed)
    results = []
    for run in range(1, args.runs + 1):
        result = run_scenario(reference, args.work, run, rng)
        results.append(result)
        print(f"run {run:2d}: cold from {result.cold_from:9s} aimed at {result.aimed_at:9s} killed "
              + ", ".join(f"{t:5.1f}s in ({s})" for t, s in zip(result.kills, result.killed_in))
              + f"; leftovers {result.leftovers}; " + ("ok" if result.passed else "FAILED: " + "; ".join(result.problems)),
              flush=True)
    passed = sum(result.passed for result in results)
    (args.work / "results.json").write_text(json.dumps([asdict(r) for r in results], indent=1) + "\n")
    landed = sum(stage == r.aimed_at for r in results for stage in r.killed_in)
    print(f"{passed}/{len(results)} runs passed (seed {args.seed}) in {time.perf_counter() - started:.0f}s; "
          f"{landed} of {sum(len(r.kills) for r in results)} SIGKILLs landed where they aimed", flush=True)
    return 0 if passed == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
