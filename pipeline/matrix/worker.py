"""`python -m pipeline.matrix.worker JOB.json`: one matrix job in its own process (the local executor's
worker). Writes the JobResult beside the job file and exits with the build's exit code; a worker killed
mid-job leaves no result, which is how the executor tells a dead worker from a failed build."""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

from pipeline.core.logs import quiet_libraries
from pipeline.core.progress import on_signal
from pipeline.matrix.jobs import run_job, write_result


def main(job_file: Path) -> int:
    signal.signal(signal.SIGTERM, on_signal)  # unwinds like the build command: staging folders removed
    job = json.loads(job_file.read_text(encoding="utf-8"))
    quiet_libraries()
    result = run_job(job["name"], job["config"], job["cache_dir"], Path(job["log"]), job.get("search_jobs", 1))
    write_result(Path(job["result"]), result)
    return result.exit_code


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
