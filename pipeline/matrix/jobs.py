"""One matrix job: a normal build (run_build) in this process, its outcome as a JobResult.

A job that fails on its input (bad model folder, failed stage, missed parity) has a result and is
never retried: running it again would fail again. Only a job whose worker died has no result; the
executors (local.py, ray_backend.py) retry those, and the stage cache lets the retry resume.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from pipeline.build.runner import CACHE_DIR, LOCK_FILE, run_build
from pipeline.config import BuildConfig
from pipeline.core.errors import ExitCode, QuantpipeError
from pipeline.core.progress import Progress

STATUS = {ExitCode.OK: "passed", ExitCode.PARITY_FAILED: "parity_failed"}
DIED = "died"  # the worker was killed or lost, on every attempt


@dataclass
class JobResult:
    name: str
    status: str  # passed | parity_failed | failed | died
    exit_code: int
    message: str = ""
    wall_time_s: float = 0.0
    attempts: int = 1
    reused: list[str] = field(default_factory=list)  # stages taken from the cache
    ran: list[str] = field(default_factory=list)  # stages this attempt ran
    build_dir: str = ""
    host: str = field(default_factory=lambda: os.uname().nodename)

    @property
    def ok(self) -> bool:
        return self.status == "passed"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "JobResult":
        return cls(**data)


def run_job(name: str, config: dict[str, Any], cache_dir: Optional[str], log: Path,
            search_jobs: int = 1) -> JobResult:
    """Build one job in this process; every failure the pipeline knows becomes a result, not an exception.
    search_jobs: worker processes of the job's fallback search (results are the same at any number)."""
    from engines import parallel

    parallel.configure(jobs=search_jobs)
    started = time.perf_counter()
    build = BuildConfig.model_validate(config)
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a", encoding="utf-8") as stream:
        progress = Progress(stream=stream)
        progress.info(f"job {name} (pid {os.getpid()}) building into {build.output_dir}")
        try:
            result = run_build(build, progress, cache_dir=Path(cache_dir) if cache_dir else None)
        except QuantpipeError as exc:
            progress.info(f"failed: {exc.message}")
            code = ExitCode(exc.exit_code)
            return JobResult(name, STATUS.get(code, "failed"), int(code), exc.message,
                             round(time.perf_counter() - started, 3), build_dir=str(build.output_dir))
    return JobResult(name, "passed", int(ExitCode.OK), "", round(time.perf_counter() - started, 3),
                     reused=[stage for stage, output in result.outputs.items() if output.reused],
                     ran=[stage for stage, output in result.outputs.items() if not output.reused],
                     build_dir=str(result.build_dir))


def pack_build(build_dir: Path) -> bytes:
    """The published build (artifacts, reports, manifest) as a tar, without the stage cache and lock."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for path in sorted(build_dir.rglob("*")):
            relative = path.relative_to(build_dir)
            if relative.parts[0] in (CACHE_DIR, LOCK_FILE) or path.name.endswith(".tmp") or path.is_dir():
                continue
            archive.add(path, arcname=str(relative), recursive=False)
    return buffer.getvalue()


def unpack_build(data: bytes, target: Path) -> None:
    """Unpack beside `target` and swap it in: a reader never sees half a build under the real name."""
    incoming = target.with_name(f".{target.name}.incoming.tmp")
    retired = target.with_name(f".{target.name}.old.tmp")
    for leftover in (incoming, retired):
        shutil.rmtree(leftover, ignore_errors=True)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r") as archive:
        archive.extractall(incoming, filter="data")  # our own worker's tar; the filter refuses links out anyway
    if target.exists():
        os.replace(target, retired)
    os.replace(incoming, target)
    shutil.rmtree(retired, ignore_errors=True)


def write_result(path: Path, result: JobResult) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(result.to_dict(), indent=2) + "\n", encoding="utf-8")
    os.replace(temporary, path)
