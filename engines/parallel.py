"""Independent evaluations (the fallback search's candidate graphs) run in parallel: local worker processes
by default, Ray tasks when the build runs on a Ray cluster.

Local workers are forked, so a candidate function may close over anything (sessions' weights, calibration
batches): the children inherit it; only the items and the results (node names, floats) are pickled. Ray
tasks get the function through the object store (cloudpickle); one that cannot be serialized is
evaluated by local workers instead. Results come back in the order of the items, so a caller that picks
among them (first to reach a target, ties by name) decides exactly as its sequential loop would.
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Callable, Optional, Sequence, TypeVar

T = TypeVar("T")
R = TypeVar("R")

_SETTINGS: dict[str, Any] = {"jobs": 1, "backend": "local"}
_TASK: list[Callable[[Any], Any]] = []  # the function the forked workers call (inherited, never pickled)


def configure(jobs: Optional[int] = None, backend: Optional[str] = None) -> None:
    """jobs: local worker processes (1: sequential); backend: 'local' or 'ray' (the connected cluster)."""
    if jobs is not None:
        _SETTINGS["jobs"] = max(1, int(jobs))
    if backend is not None:
        if backend not in ("local", "ray"):
            raise ValueError(f"backend {backend!r}: expected 'local' or 'ray'")
        _SETTINGS["backend"] = backend


def width() -> int:
    """How many evaluations run at once: the local jobs, or the Ray cluster's CPUs."""
    if _SETTINGS["backend"] == "ray":
        import ray

        return max(1, int(ray.cluster_resources().get("CPU", 1)))
    return int(_SETTINGS["jobs"])


def _call_task(item: Any) -> Any:
    return _TASK[-1](item)


def _share_cores(threads: int) -> None:
    from pipeline.core import host

    host.WORKER_THREADS[:] = [threads]


def _local_map(function: Callable[[T], R], items: Sequence[T], jobs: int) -> list[R]:
    _TASK.append(function)
    workers = min(jobs, len(items))
    try:
        context = multiprocessing.get_context("fork")
        with ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_share_cores,
                                 initargs=(max(1, (os.cpu_count() or 1) // workers),)) as pool:
            return list(pool.map(_call_task, items))
    finally:
        _TASK.pop()


def _ray_map(function: Callable[[T], R], items: Sequence[T]) -> Optional[list[R]]:
    import ray

    try:
        shared = ray.put(function)
    except Exception:  # a closure over something cloudpickle cannot serialize
        return None
    task = ray.remote(_apply).options(num_cpus=1, max_retries=2)
    return ray.get([task.remote(shared, item) for item in items])


def _apply(function: Callable[[T], R], item: T) -> R:
    _share_cores(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))  # Ray sets it to the task's num_cpus
    return function(item)


def parallel_map(function: Callable[[T], R], items: Sequence[T]) -> list[R]:
    """[function(item) for item in items], evaluated in parallel as configured; results in item order."""
    items = list(items)
    if len(items) > 1 and _SETTINGS["backend"] == "ray":
        results = _ray_map(function, items)
        if results is not None:
            return results
    jobs = int(_SETTINGS["jobs"]) if _SETTINGS["backend"] == "local" else min(width(), os.cpu_count() or 1)
    if len(items) <= 1 or jobs <= 1 or multiprocessing.parent_process() is not None and _TASK:
        return [function(item) for item in items]
    return _local_map(function, items, jobs)
