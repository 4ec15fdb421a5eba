"""`pipeline bench`: latency and throughput of ONNX artifacts, measured side by side in one run.

Every artifact runs in its own ONNX Runtime session with the same thread count; runs take turns in
short blocks (see `timed_blocks`) so that load on the machine hits every artifact alike, and the
ratio of medians is what the comparison reports.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from engines.onnx_io import check_onnx_file
from engines.ort_session import create_session
from pipeline.core.errors import InputError
from pipeline.core.progress import Progress

BLOCK_RUNS = 5


@dataclass
class Artifact:
    label: str
    path: Path


@dataclass
class Measurement:
    artifact: str
    batch: int
    sequence: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    samples_per_s: float
    runs: int


def resolve_artifacts(paths: Sequence[str]) -> list[Artifact]:
    """A build directory stands for its FP32 baseline and its quantized model; files stand for themselves."""
    artifacts: list[Artifact] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            pair = [("fp32", path / "model.fp32.onnx"), ("int8", path / "model.onnx")]
            missing = [str(p) for _, p in pair if not p.is_file()]
            if missing:
                raise InputError(f"{path} is not a finished build directory (missing {', '.join(missing)})")
            for _, file in pair:
                check_onnx_file(file)
            artifacts += [Artifact(f"{path.name}:{label}", file) for label, file in pair]
        elif path.is_file():
            check_onnx_file(path)
            artifacts.append(Artifact(path.name, path))
        else:
            raise InputError(f"no such artifact: {path}")
    labels = [a.label for a in artifacts]
    if len(set(labels)) != len(labels):
        artifacts = [Artifact(str(a.path), a.path) for a in artifacts]
    return artifacts


def text_inputs(tokenizer: Any, input_names: Sequence[str], batch: int, sequence: int) -> dict[str, np.ndarray]:
    """Real BBC News text, truncated to exactly `sequence` tokens per row (no padding)."""
    from calibration.sources import default_source

    text, rows = "", []
    for sentence in default_source():
        text = f"{text} {sentence}"
        if len(text.split()) > sequence * 2:
            rows.append(text)
            text = ""
            if len(rows) == batch:
                break
    encoded = tokenizer(rows, truncation=True, max_length=sequence, padding="max_length", return_tensors="np")
    feed = {}
    for name in input_names:
        values = encoded.get(name)
        feed[name] = np.zeros_like(encoded["input_ids"]) if values is None else values
        feed[name] = np.ascontiguousarray(feed[name], dtype=np.int64)
    return feed


def benchmark(
    artifacts: Sequence[Artifact],
    tokenizer: Any,
    batches: Sequence[int],
    sequences: Sequence[int],
    threads: int,
    runs: int,
    warmup: int,
    progress: Progress,
) -> list[Measurement]:
    sessions = []
    for artifact in artifacts:
        try:
            sessions.append(create_session(artifact.path, threads=threads))
        except Exception as exc:  # ONNX Runtime's Fail/InvalidGraph/NotImplemented: a graph it cannot run
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise InputError(f"ONNX Runtime cannot load {artifact.path}: {message}") from None
    input_names = [i.name for i in sessions[0].get_inputs()]
    results: list[Measurement] = []
    for batch in batches:
        for sequence in sequences:
            feed = text_inputs(tokenizer, input_names, batch, sequence)
            for session in sessions:
                for _ in range(warmup):
                    session.run(None, feed)
            timings = timed_blocks(sessions, feed, runs)
            for artifact, seconds in zip(artifacts, timings):
                ms = np.array(seconds) * 1000
                results.append(Measurement(
                    artifact.label, batch, sequence, float(np.percentile(ms, 50)), float(np.percentile(ms, 90)),
                    float(np.percentile(ms, 99)), float(batch / (np.median(ms) / 1000)), runs,
                ))
            progress.info(f"batch {batch} x {sequence} tokens: " + ", ".join(
                f"{m.artifact} p50 {m.p50_ms:.1f} ms" for m in results[-len(artifacts):]))
    return results


def timed_blocks(sessions: Sequence[Any], feed: dict[str, np.ndarray], runs: int) -> list[list[float]]:
    """`runs` timings per session, taken in blocks of BLOCK_RUNS that take turns (A B, B A, A B, ...).

    Blocks, not single runs: an ONNX Runtime session's worker threads keep spinning for a while after
    its run returns, and on a 2-core host that spinning took 30 ms from every run of the other session
    when runs alternated one by one (measured: FP32 70 ms alone, 101 ms alternated). The first run of
    each block, while the other session's threads settle, is not timed. Taking turns still spreads
    drift in the host's load over every artifact alike.
    """
    timings: list[list[float]] = [[] for _ in sessions]
    order = list(range(len(sessions)))
    while len(timings[0]) < runs:
        count = min(BLOCK_RUNS, runs - len(timings[0]))
        for index in order:
            sessions[index].run(None, feed)
            for _ in range(count):
                started = time.perf_counter()
                sessions[index].run(None, feed)
                timings[index].append(time.perf_counter() - started)
        order.reverse()
    return timings


def ratios(results: Sequence[Measurement], baseline: str) -> dict[str, dict[str, float]]:
    """p50 of the baseline over p50 of every other artifact, per grid point: > 1 means faster."""
    table: dict[str, dict[str, float]] = {}
    by_point: dict[tuple[int, int], dict[str, float]] = {}
    for m in results:
        by_point.setdefault((m.batch, m.sequence), {})[m.artifact] = m.p50_ms
    for (batch, sequence), p50s in by_point.items():
        table[f"{batch}x{sequence}"] = {
            name: round(p50s[baseline] / value, 3) for name, value in p50s.items() if name != baseline
        }
    return table


def render_table(results: Sequence[Measurement], speedups: dict[str, dict[str, float]], baseline: str) -> str:
    lines = ["| artifact | batch x seq | p50 ms | p90 ms | p99 ms | samples/s | speedup vs " + baseline + " |",
             "|---|---|---|---|---|---|---|"]
    for m in results:
        point = f"{m.batch}x{m.sequence}"
        speedup = "1.00" if m.artifact == baseline else f"{speedups[point][m.artifact]:.2f}"
        lines.append(f"| {m.artifact} | {point} | {m.p50_ms:.1f} | {m.p90_ms:.1f} | {m.p99_ms:.1f} | "
                     f"{m.samples_per_s:.1f} | {speedup}x |")
    return "\n".join(lines) + "\n"


def machine() -> dict[str, Any]:
    import onnxruntime

    from pipeline.core.host import host_facts

    facts = host_facts()
    return {"cpu": facts["cpu_model"] or platform.machine(), "isa": facts["isa"], "isa_flags": facts["isa_flags"],
            "cores": os.cpu_count(), "onnxruntime": onnxruntime.__version__, "python": platform.python_version()}


def write_results(out: Path, results: Sequence[Measurement], speedups: dict[str, Any], baseline: str,
                  threads: int) -> None:
    from pipeline.build.manifest import write_text_atomic

    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot write the benchmark results to {out}: {exc.strerror or exc}") from None
    payload = {"threads": threads, "baseline": baseline, "machine": machine(),
               "results": [asdict(m) for m in results], "speedup_p50": speedups}
    write_text_atomic(out / "bench.json", json.dumps(payload, indent=2) + "\n")
    write_text_atomic(out / "bench.md", render_table(results, speedups, baseline))
    temporary = out / ".bench.png.tmp"
    plot(results, temporary)
    os.replace(temporary, out / "bench.png")


def plot(results: Sequence[Measurement], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = sorted({(m.batch, m.sequence) for m in results})
    names = list(dict.fromkeys(m.artifact for m in results))
    width = 0.8 / len(names)
    figure, axis = plt.subplots(figsize=(max(6, 1.4 * len(points) + 2), 4))
    for offset, name in enumerate(names):
        values = {(m.batch, m.sequence): m.p50_ms for m in results if m.artifact == name}
        axis.bar([i + offset * width for i in range(len(points))], [values[p] for p in points], width, label=name)
    axis.set_xticks([i + width * (len(names) - 1) / 2 for i in range(len(points))])
    axis.set_xticklabels([f"{b}x{s}" for b, s in points])
    axis.set_xlabel("batch x sequence length")
    axis.set_ylabel("p50 latency (ms)")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100, format="png")
    plt.close(figure)
