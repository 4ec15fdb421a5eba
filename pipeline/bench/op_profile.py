"""`pipeline bench --profile`: where each artifact's time goes, by operator type (ONNX Runtime's own profiler).

A speed ratio says which artifact is faster; the profile says why, and how far a graph rewrite could go: the kernel
time of each operator type per forward pass, read from the trace ONNX Runtime writes when profiling is on
(`SessionOptions.enable_profiling`). Profiling slows every run a little, so its times are for comparing operator
types and artifacts within one run, not for quoting as latency (the timed runs are).
"""

from __future__ import annotations

import json
import tempfile
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from engines.ort_session import create_session
from pipeline.bench.latency import Artifact, machine, text_inputs
from pipeline.core.progress import Progress

FEED_NAMES = ("input_ids", "attention_mask", "token_type_ids")  # each session takes the ones its graph reads


@dataclass
class OpProfile:
    artifact: str
    batch: int
    sequence: int
    passes: int
    kernel_ms: dict[str, float]  # per forward pass, by operator type, largest first

    @property
    def total_ms(self) -> float:
        return sum(self.kernel_ms.values())


def kernel_ms_by_op(events: Sequence[dict[str, Any]], skip_runs: int) -> tuple[dict[str, float], int]:
    """Kernel time per operator type, averaged over the runs in an ONNX Runtime trace after the first `skip_runs`
    (the warm-up); returns it with the number of runs counted."""
    runs = sorted(e["ts"] for e in events if e.get("cat") == "Session" and e.get("name") == "model_run")
    counted = runs[skip_runs:]
    if not counted:
        return {}, 0
    start = counted[0]
    totals: dict[str, float] = defaultdict(float)
    for event in events:
        if event.get("cat") == "Node" and str(event.get("name", "")).endswith("_kernel_time") and event["ts"] >= start:
            totals[str(event.get("args", {}).get("op_name", "?"))] += event["dur"] / 1000.0
    per_pass = {op: ms / len(counted) for op, ms in totals.items()}
    return dict(sorted(per_pass.items(), key=lambda item: -item[1])), len(counted)


def profile(artifacts: Sequence[Artifact], feed: dict[str, np.ndarray], batch: int, sequence: int, threads: int,
            passes: int, warmup: int) -> list[OpProfile]:
    """Each artifact alone in a profiling session (one after the other, so that no other session's threads spin
    beside it): `warmup` untimed runs, then `passes` profiled ones."""
    results = []
    with tempfile.TemporaryDirectory(prefix="quantpipe-profile-") as scratch:
        for index, artifact in enumerate(artifacts):
            session = create_session(artifact.path, threads=threads, profile_prefix=str(Path(scratch) / f"a{index}"))
            names = {i.name for i in session.get_inputs()}
            inputs = {name: value for name, value in feed.items() if name in names}
            for _ in range(warmup + passes):
                session.run(None, inputs)
            trace = Path(session.end_profiling())
            kernel_ms, counted = kernel_ms_by_op(json.loads(trace.read_text(encoding="utf-8")), warmup)
            results.append(OpProfile(artifact.label, batch, sequence, counted, kernel_ms))
            del session
    return results


def render_profile(profiles: Sequence[OpProfile], rows: int = 12) -> str:
    """Markdown: operator types (the largest of any artifact first) against artifacts, ms per pass and share."""
    lines: list[str] = []
    for point in dict.fromkeys((p.batch, p.sequence) for p in profiles):
        group = [p for p in profiles if (p.batch, p.sequence) == point]
        ops = sorted({op for p in group for op in p.kernel_ms}, key=lambda op: -max(p.kernel_ms.get(op, 0.0)
                                                                                     for p in group))
        shown, rest = ops[:rows], ops[rows:]
        lines.append(f"Kernel time per forward pass, {point[0]} x {point[1]} tokens (ms, share of the artifact's total):")
        lines.append("")
        lines.append("| operator | " + " | ".join(p.artifact for p in group) + " |")
        lines.append("|---|" + "---|" * len(group))
        for op in shown:
            cells = [f"{p.kernel_ms[op]:.2f} ({100 * p.kernel_ms[op] / (p.total_ms or 1):.0f}%)" if op in p.kernel_ms
                     else "-" for p in group]
            lines.append(f"| {op} | " + " | ".join(cells) + " |")
        if rest:
            lines.append(f"| {len(rest)} other types | " + " | ".join(
                f"{sum(p.kernel_ms.get(op, 0.0) for op in rest):.2f}" for p in group) + " |")
        lines.append("| **total** | " + " | ".join(f"**{p.total_ms:.2f}**" for p in group) + " |")
        lines.append("")
    return "\n".join(lines)


def profile_artifacts(artifacts: Sequence[Artifact], tokenizer: Any, batches: Sequence[int], sequences: Sequence[int],
                      threads: int, passes: int, warmup: int, out: Path, progress: Progress) -> str:
    """Profile every artifact at every grid point; write profile.json and profile.md to `out`; return the table."""
    from pipeline.build.manifest import write_text_atomic

    profiles: list[OpProfile] = []
    for batch in batches:
        for sequence in sequences:
            progress.info(f"profiling {len(artifacts)} artifacts at {batch} x {sequence} tokens, {passes} passes each")
            feed = text_inputs(tokenizer, FEED_NAMES, batch, sequence)
            profiles += profile(artifacts, feed, batch, sequence, threads, passes, warmup)
    table = render_profile(profiles)
    payload = {"threads": threads, "machine": machine(),
               "profiles": [{**asdict(p), "total_ms": p.total_ms} for p in profiles]}
    write_text_atomic(out / "profile.json", json.dumps(payload, indent=2) + "\n")
    write_text_atomic(out / "profile.md", table)
    return table
