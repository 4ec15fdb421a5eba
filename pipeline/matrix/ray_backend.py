"""The Ray executor: each job a Ray task that declares its CPUs and builds on whichever node runs it.

The task builds into a folder on its node (under the node's temp dir, or in the shared --cache-dir's
stages), then sends the published build (artifacts, reports, manifest) back as a tar, which the driver
unpacks into its own OUTPUT/<name>. Ray retries a task whose worker process or node died
(`max_retries`), and only those (`retry_exceptions=False`); a build that fails on its input returns a
result and is never retried. The retry resumes from the stage cache: the node's build folder, or the
shared cache every node mounts.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional

from pipeline.core.errors import ExitCode, InputError, MissingDependencyError
from pipeline.core.logs import quiet_libraries
from pipeline.matrix.jobs import DIED, JobResult, pack_build, run_job, unpack_build
from pipeline.matrix.spec import Job

Report = Callable[[str], None]
INSTALL_HINT = "install the `ray` extra: pip install 'quantpipe[ray]'"


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise MissingDependencyError(f"--ray needs Ray, which is not installed; {INSTALL_HINT}") from None
    return ray


def connect(address: str) -> Any:
    """Join the cluster at ADDRESS (host:port of the head, or `auto`: the one `ray start` runs on this host)."""
    ray = import_ray()
    if not ray.is_initialized():
        try:
            ray.init(address=address, log_to_driver=False, configure_logging=False)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise InputError(f"cannot join the Ray cluster at {address!r}: {first}") from None
    return ray


def node_work_root(out: Path) -> str:
    """Where a node builds this matrix's jobs: a folder of its temp dir named after the driver's output."""
    tag = hashlib.sha256(f"{os.uname().nodename}:{out.resolve()}".encode()).hexdigest()[:12]
    return str(Path(tempfile.gettempdir()) / "quantpipe-matrix" / tag)


def build_on_node(name: str, config: dict[str, Any], cache_dir: Optional[str],
                  work_root: str) -> tuple[dict[str, Any], bytes, bytes]:
    """The Ray task: (result, the published build as a tar, the job's log)."""
    from engines import parallel

    quiet_libraries()
    parallel.configure(backend="ray")  # the job's fallback search fans out to the cluster too
    root = Path(work_root)
    root.mkdir(parents=True, exist_ok=True)
    with (root / f"{name}.attempts").open("a", encoding="utf-8") as attempts:  # one line per attempt
        attempts.write(f"{os.getpid()}\n")
    log = root / f"{name}.log"
    result = run_job(name, {**config, "output_dir": str(root / name)}, cache_dir, log)
    result.attempts = len((root / f"{name}.attempts").read_text(encoding="utf-8").split())
    import ray

    result.host = f"{result.host} node {ray.get_runtime_context().get_node_id()[:8]}"
    build_dir = root / name
    data = pack_build(build_dir) if result.status in ("passed", "parity_failed") and build_dir.is_dir() else b""
    return result.to_dict(), data, log.read_bytes() if log.is_file() else b""


def run_ray(jobs: list[Job], out: Path, cache_dir: Optional[Path], address: str, num_cpus: float,
            retries: int, report: Report) -> list[JobResult]:
    ray = connect(address)
    task = ray.remote(build_on_node).options(num_cpus=num_cpus, max_retries=retries, retry_exceptions=False)
    root = node_work_root(out)
    futures = {task.remote(job.name, job.config, str(cache_dir) if cache_dir else None, root): job for job in jobs}
    report(f"submitted {len(jobs)} jobs to the Ray cluster ({num_cpus:g} CPU each, up to {retries} retries)")
    results: dict[str, JobResult] = {}
    waiting = list(futures)
    while waiting:
        done, waiting = ray.wait(waiting, num_returns=1)
        job = futures[done[0]]
        try:
            payload, data, log = ray.get(done[0])
        except ray.exceptions.RayTaskError as exc:  # our code raised (a bug, not a dead worker): not retried
            result = JobResult(job.name, "failed", int(ExitCode.INTERNAL), str(exc).strip().splitlines()[-1])
        except ray.exceptions.RayError as exc:  # the worker or node died on every attempt
            result = JobResult(job.name, DIED, int(ExitCode.INTERNAL),
                               f"worker died on all {retries + 1} attempts: {type(exc).__name__}")
        else:
            result = JobResult.from_dict(payload)
            if data:
                unpack_build(data, out / job.name)
                result.build_dir = str(out / job.name)
            (out / f"{job.name}.log").write_bytes(log)
        results[job.name] = result
        report(f"{job.name}: {result.status} on {result.host} (attempt {result.attempts})"
               + (f" ({result.message})" if result.message else ""))
    return [results[job.name] for job in jobs]
