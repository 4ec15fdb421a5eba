"""run_matrix: the Python API of `pipeline matrix`."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Optional

from pipeline.matrix.jobs import JobResult
from pipeline.matrix.local import run_local
from pipeline.matrix.spec import Matrix
from pipeline.matrix.summary import summary_data, write_summary


def run_matrix(matrix: Matrix, out: Path, jobs: int = 1, ray_address: Optional[str] = None,
               cache_dir: Optional[Path] = None, report: Callable[[str], None] = lambda message: None,
               search_jobs: int = 1) -> tuple[list[JobResult], dict[str, Any]]:
    """Run every job (locally, `jobs` at a time, or on Ray) and write the summary into `out`. search_jobs:
    local worker processes of each job's fallback search (on Ray, its candidates are Ray tasks)."""
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    cache = cache_dir.resolve() if cache_dir else None
    if ray_address:
        from pipeline.matrix.ray_backend import run_ray

        results = run_ray(matrix.jobs, out, cache, ray_address, matrix.num_cpus, matrix.retries, report)
        executor = f"ray {ray_address}"
    else:
        results = run_local(matrix.jobs, out, cache, jobs, matrix.retries, report, search_jobs)
        executor = f"local, {jobs} process{'es' if jobs > 1 else ''}"
    data = summary_data(matrix, results, executor, time.perf_counter() - started)
    write_summary(out, data)
    return results, data
