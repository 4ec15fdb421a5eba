"""`pipeline bench-fallback`: the fallback search timed sequentially and with N local workers on one build.

The stages before the search are built once (and cached in the build directory); then the search's
stage (quantize for --target cpu, precision for --target trt) runs again for each worker count, and
its chosen nodes must be the same every time.
"""

from __future__ import annotations

import shutil
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
    seconds: float  # the search stage's wall time
    chosen: list[str]
    candidates: int  # graphs evaluated: the sensitivity ranking plus the greedy trials


def _chosen(target: str, metrics: dict[str, Any]) -> tuple[list[str], int]:
    if target == "cpu":
        record = metrics.get("fallback") or {}
        return list(record.get("excluded_nodes", [])), len(record.get("ranking", [])) + len(record.get("trials", []))
    return list(metrics.get("kept_higher_precision", [])), len(metrics.get("sensitivity_top", []))


def bench_fallback(overrides: dict[str, Any], build_dir: Path, jobs: list[int], report: Callable[[str], None],
                   ) -> list[SearchTiming]:
    config = load_config(None, {**overrides, "output_dir": str(build_dir)})
    stage, _ = SEARCH_STAGE[config.target]
    progress = Progress(quiet=True)
    report(f"building the stages before {stage} into {build_dir} (cached after the first run)")
    run_build(config, progress, stop_after="calibrate")
    timings = []
    for count in jobs:
        for entry in (build_dir / CACHE_DIR).glob(f"{stage}-*"):
            shutil.rmtree(entry)
        parallel.configure(jobs=count)
        started = time.perf_counter()
        try:
            result = run_build(config, progress, stop_after=stage)
        finally:
            parallel.configure(jobs=1)
        output = result.outputs[stage]
        chosen, candidates = _chosen(config.target, output.metrics)
        timings.append(SearchTiming(count, round(time.perf_counter() - started, 2), chosen, candidates))
        report(f"--jobs {count}: {stage} with its fallback search in {timings[-1].seconds:.1f}s; "
               f"{len(chosen)} node(s) chosen: {', '.join(chosen) or 'none'}")
    if len({tuple(timing.chosen) for timing in timings}) > 1:
        raise QuantpipeError("the parallel fallback search chose other nodes than the sequential one: "
                             + "; ".join(f"jobs {t.jobs}: {t.chosen}" for t in timings))
    return timings
