"""The local executor: each job in its own worker process (`python -m pipeline.matrix.worker`), at most
`jobs` at a time. A worker killed by a signal (OOM killer, a kill) is retried up to `retries` times and
resumes from the stage cache; a worker that exits with a result is never retried."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import deque
from pathlib import Path
from typing import Callable, Optional

from pipeline.core.errors import ExitCode
from pipeline.core.progress import raise_pending
from pipeline.matrix.jobs import DIED, JobResult
from pipeline.matrix.spec import Job

POLL_S = 0.2
Report = Callable[[str], None]


def job_files(out: Path, job: Job) -> tuple[Path, Path, Path]:
    """The job's spec and result files (OUTPUT/.matrix/) and its log (OUTPUT/<name>.log)."""
    folder = out / ".matrix"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{job.name}.json", folder / f"{job.name}.result.json", out / f"{job.name}.log"


def _start(job: Job, out: Path, cache_dir: Optional[Path], search_jobs: int) -> subprocess.Popen[bytes]:
    spec, result, log = job_files(out, job)
    result.unlink(missing_ok=True)
    spec.write_text(json.dumps({"name": job.name, "config": job.config, "log": str(log), "result": str(result),
                                "cache_dir": str(cache_dir) if cache_dir else None, "search_jobs": search_jobs}),
                    encoding="utf-8")
    with log.open("ab") as stream:
        return subprocess.Popen([sys.executable, "-m", "pipeline.matrix.worker", str(spec)],
                                stdout=stream, stderr=stream, stdin=subprocess.DEVNULL)


def _outcome(job: Job, out: Path, process: subprocess.Popen[bytes]) -> Optional[JobResult]:
    """The job's result; None when its worker died (killed by a signal) before writing one."""
    _, result_file, log = job_files(out, job)
    if result_file.is_file():
        return JobResult.from_dict(json.loads(result_file.read_text(encoding="utf-8")))
    if process.returncode < 0:
        return None
    return JobResult(job.name, "failed", int(ExitCode.INTERNAL),
                     f"worker exited with code {process.returncode} and no result; see {log}")


def run_local(jobs: list[Job], out: Path, cache_dir: Optional[Path], parallel: int, retries: int,
              report: Report, search_jobs: int = 1) -> list[JobResult]:
    pending = deque((job, 1) for job in jobs)
    running: dict[str, tuple[Job, int, subprocess.Popen[bytes]]] = {}
    results: dict[str, JobResult] = {}
    try:
        while pending or running:
            while pending and len(running) < parallel:
                job, attempt = pending.popleft()
                running[job.name] = (job, attempt, _start(job, out, cache_dir, search_jobs))
                report(f"{job.name}: started (attempt {attempt}, pid {running[job.name][2].pid})")
            time.sleep(POLL_S)
            raise_pending()
            for name, (job, attempt, process) in list(running.items()):
                if process.poll() is None:
                    continue
                del running[name]
                result = _outcome(job, out, process)
                if result is None and attempt <= retries:
                    report(f"{name}: worker died (signal {-process.returncode}); retrying from the stage cache")
                    pending.append((job, attempt + 1))
                    continue
                if result is None:
                    result = JobResult(name, DIED, int(ExitCode.INTERNAL),
                                       f"worker died on all {attempt} attempts (last: signal {-process.returncode})")
                result.attempts = attempt
                results[name] = result
                report(f"{name}: {result.status}" + (f" ({result.message})" if result.message else ""))
    finally:
        for _, _, process in running.values():  # interrupted: stop the workers (they remove their staging)
            process.terminate()
        for _, _, process in running.values():
            process.wait()
    return [results[job.name] for job in jobs]
