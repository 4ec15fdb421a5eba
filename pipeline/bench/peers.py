"""`pipeline bench-peers`: a Quantpipe build against what a user would make instead, measured in one run.

Every contender runs on the same host with the same thread count, the same real BBC News inputs for
speed, and the same held-out out-of-domain sentences (tweets and Amazon review snippets, never used for
calibration) for accuracy, scored against one reference outside all of them: the model's FP32 forward as
sentence-transformers computes it. Speed is timed in blocks that take turns (`latency.timed_blocks`), so
load on a shared host hits every contender alike; the ratios are what the comparison reports.
"""

from __future__ import annotations

import json
import lzma
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Protocol, Sequence

import numpy as np

from pipeline.bench.latency import timed_blocks
from pipeline.core.host import host_facts
from pipeline.core.progress import Progress

DATA = Path(__file__).parent / "data"
# hutto_ICWSM_2014 from the vaderSentiment 3.3.2 sdist (MIT, data/LICENSE.txt): id, human score, sentence.
OUT_OF_DOMAIN_FILES = ("tweets_GroundTruth.txt.xz", "amazonReviewSnippets_GroundTruth.txt.xz")


class Contender(Protocol):
    """One way of running the model: `run(None, feed)` for timing, `embed(texts)` for accuracy."""

    name: str

    def run(self, outputs: None, feed: dict[str, np.ndarray]) -> Any: ...

    def embed(self, texts: Sequence[str]) -> np.ndarray: ...


@dataclass
class Unavailable:
    name: str
    reason: str


@dataclass
class PeerResult:
    name: str
    available: bool
    reason: str = ""
    setup_s: float = 0.0
    size_mb: float = 0.0
    p50_ms: dict[str, float] = field(default_factory=dict)  # "8x128" -> median ms
    samples_per_s: dict[str, float] = field(default_factory=dict)
    speedup_vs_fp32: dict[str, float] = field(default_factory=dict)
    cosine_mean: Optional[float] = None
    cosine_p01: Optional[float] = None
    cosine_min: Optional[float] = None


def out_of_domain_sentences(count: int) -> list[str]:
    """`count` sentences taken alternately from the tweets and the review snippets, in file order."""
    columns = []
    for name in OUT_OF_DOMAIN_FILES:
        with lzma.open(DATA / name, "rt", encoding="utf-8") as handle:
            columns.append([line.split("\t", 2)[2].strip() for line in handle if line.count("\t") >= 2])
    mixed = [sentence for pair in zip(*columns) for sentence in pair if sentence]
    return mixed[:count]


def cosines(reference: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    reference = reference / np.linalg.norm(reference, axis=1, keepdims=True)
    candidate = candidate / np.linalg.norm(candidate, axis=1, keepdims=True)
    return np.sum(reference * candidate, axis=1)


def measure(
    contenders: Sequence[Contender],
    setup_s: dict[str, float],
    sizes: dict[str, float],
    feeds: dict[str, dict[str, np.ndarray]],
    reference: np.ndarray,
    sentences: Sequence[str],
    runs: int,
    warmup: int,
    progress: Progress,
) -> list[PeerResult]:
    """Speed at every shape (blocks taking turns) and cosine to `reference` on `sentences`, per contender."""
    results = {c.name: PeerResult(c.name, True, setup_s=setup_s.get(c.name, 0.0), size_mb=sizes.get(c.name, 0.0))
               for c in contenders}
    for shape, feed in feeds.items():
        for contender in contenders:
            for _ in range(warmup):
                contender.run(None, feed)
        timings = timed_blocks(contenders, feed, runs)
        batch = next(iter(feed.values())).shape[0]
        for contender, seconds in zip(contenders, timings):
            median = float(np.median(seconds))
            results[contender.name].p50_ms[shape] = round(median * 1000, 2)
            results[contender.name].samples_per_s[shape] = round(batch / median, 1)
        progress.info(f"{shape}: " + ", ".join(f"{c.name} {results[c.name].p50_ms[shape]:.1f} ms" for c in contenders))
    baseline = results.get("fp32")
    for result in results.values():
        if baseline is not None:
            result.speedup_vs_fp32 = {shape: round(baseline.p50_ms[shape] / ms, 2) for shape, ms in result.p50_ms.items()}
    for contender in contenders:
        values = cosines(reference, contender.embed(sentences))
        result = results[contender.name]
        result.cosine_mean = round(float(values.mean()), 5)
        result.cosine_p01 = round(float(np.percentile(values, 1)), 5)
        result.cosine_min = round(float(values.min()), 5)
        progress.info(f"{contender.name}: cosine mean {result.cosine_mean:.4f} on {len(sentences)} sentences")
    return list(results.values())


def timed_setup(name: str, make: Callable[[], Contender], setup_s: dict[str, float]) -> Contender | Unavailable:
    """A contender, or why it is missing: an ImportError (peer not installed) or its own failure, in one line."""
    started = time.perf_counter()
    try:
        contender = make()
    except ImportError as exc:
        return Unavailable(name, f"not installed ({exc.name or exc}); pip install quantpipe[peers]")
    except Exception as exc:  # a peer's own failure is reported, not raised: the others still run
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return Unavailable(name, f"{type(exc).__name__}: {first[:200]}")
    setup_s[name] = round(time.perf_counter() - started, 1)
    return contender


def render_table(results: Sequence[PeerResult], shapes: Sequence[str], host: dict[str, Any]) -> str:
    header = ["contender", *(f"{s} p50 ms (x fp32)" for s in shapes), "cosine mean / p1 (out of domain)", "MB"]
    title = f"host: {host['cpu_model']}, ISA {host['isa']} ({' '.join(host['isa_flags'])}), {host['threads']} threads"
    lines = [title, "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for result in results:
        if not result.available:
            lines.append(f"| {result.name} | " + " | ".join(["-"] * len(shapes)) + f" | unavailable: {result.reason} | - |")
            continue
        cells = [f"{result.p50_ms[s]:.1f} ({result.speedup_vs_fp32.get(s, 0):.2f}x)" for s in shapes]
        lines.append(f"| {result.name} | " + " | ".join(cells) +
                     f" | {result.cosine_mean:.4f} / {result.cosine_p01:.4f} | {result.size_mb:.1f} |")
    return "\n".join(lines) + "\n"


def lead(results: Sequence[PeerResult], ours: str, shape: str) -> dict[str, Any]:
    """How far `ours` is ahead of the fastest available peer at `shape` (fp32 is the baseline, not a peer)."""
    peers = [r for r in results if r.available and not r.name.startswith(ours) and r.name != "fp32"
             and shape in r.p50_ms]
    mine = next((r for r in results if r.name == ours and r.available), None)
    if not peers or mine is None:
        return {}
    fastest = min(peers, key=lambda r: r.p50_ms[shape])
    return {"shape": shape, "fastest_peer": fastest.name, "speedup": round(fastest.p50_ms[shape] / mine.p50_ms[shape], 2),
            "cosine": mine.cosine_mean, "peer_cosine": fastest.cosine_mean}


def write_json(path: Path, payload: dict[str, Any]) -> None:
    from pipeline.core.durable import write_bytes_durable

    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_durable(path, (json.dumps(payload, indent=2) + "\n").encode("utf-8"))


def host_record(threads: int) -> dict[str, Any]:
    facts = dict(host_facts())
    facts["threads"] = threads
    return facts


def as_dicts(results: Sequence[PeerResult | Unavailable]) -> list[dict[str, Any]]:
    return [asdict(r) for r in results]
