"""`pipeline bench-fallback`: the fallback search timed sequentially and with N local workers on one build.

The stages before the search are built once (and cached in the build directory); then the search's
stage (quantize for --target cpu, precision for --target trt) runs again for each worker count, and
its chosen nodes must be the same every time.
"""

from __future__ import annotations

import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from engines import parallel
from pipeline.build.runner import CACHE_DIR, run_build
from pipeline.config import load_config
from pipeline.core.errors import QuantpipeError
from pipeline.core.progress import Progress

SEARCH_STAGE = {"cpu": ("quantize", "excluded_nodes"), "trt": ("precision", "kept_higher_precision")}


@dataclass
class SearchTiming:
    jobs: int
    seconds: float  # the search stage's wall time: the median of the runs
    runs: list[float]
    chosen: list[str]
    trials: int  # candidates of the greedy loop (after the sensitivity ranking, which scores one per node)


def _chosen(target: str, metrics: dict[str, Any]) -> tuple[list[str], int]:
    if target == "cpu":
        record = metrics.get("fallback") or {}
        return list(record.get("excluded_nodes", [])), len(record.get("trials", []))
    kept = list(metrics.get("kept_higher_precision", []))
    return kept, len(kept) + 1


def bench_fallback(overrides: dict[str, Any], build_dir: Path, jobs: list[int], report: Callable[[str], None],
                   repeat: int = 3) -> list[SearchTiming]:
    """Each worker count `repeat` times, interleaved (1, 2, 1, 2, ...) so that load from elsewhere on the
    machine and warm-up (the first run loads the quantizer) fall on every count alike; medians reported."""
    config = load_config(None, {**overrides, "output_dir": str(build_dir)})
    stage, _ = SEARCH_STAGE[config.target]
    progress = Progress(quiet=True)
    report(f"building the stages before {stage} into {build_dir} (cached after the first run)")
    run_build(config, progress, stop_after="calibrate")
    runs: dict[int, list[tuple[float, list[str], int]]] = {count: [] for count in jobs}
    for round_ in range(repeat + 1):  # round 0 warms up (imports, first sessions) and is not counted
        for count in jobs if round_ else jobs[:1]:
            for entry in (build_dir / CACHE_DIR).glob(f"{stage}-*"):
                shutil.rmtree(entry)
            parallel.configure(jobs=count)
            started = time.perf_counter()
            try:
                result = run_build(config, progress, stop_after=stage)
            finally:
                parallel.configure(jobs=1)
            chosen, candidates = _chosen(config.target, result.outputs[stage].metrics)
            if round_:
                runs[count].append((round(time.perf_counter() - started, 2), chosen, candidates))
            report(f"{'' if round_ else 'warm-up, '}--jobs {count}: {stage} with its fallback search in "
                   f"{time.perf_counter() - started:.1f}s; "
                   f"{len(chosen)} node(s) chosen: {', '.join(chosen) or 'none'}")
    choices = {tuple(chosen) for values in runs.values() for _, chosen, _ in values}
    if len(choices) > 1:
        raise QuantpipeError(f"the parallel fallback search chose other nodes than the sequential one: {sorted(choices)}")
    return [SearchTiming(count, statistics.median(s for s, _, _ in values), [s for s, _, _ in values],
                         values[0][1], values[0][2]) for count, values in runs.items()]
