"""`pipeline matrix` (many builds as jobs, locally or on Ray) and `pipeline bench-fallback`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import click

from pipeline.core.errors import ExitCode, QuantpipeError
from pipeline.core.logs import quiet_libraries


class MatrixFailed(QuantpipeError):
    """Some builds of the matrix failed; the exit code is the first failed build's."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = ExitCode(exit_code)


@click.command()
@click.argument("matrix_file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--output", "-o", type=click.Path(file_okay=False, path_type=Path), default=Path("build/matrix"),
              show_default=True, help="Every job builds into OUTPUT/<job>; the summary is OUTPUT/matrix.{md,json,junit.xml}.")
@click.option("--jobs", "-j", type=click.IntRange(min=1), default=None,
              help="Local runs: builds in parallel worker processes. [default: 1, one after another]")
@click.option("--ray", "ray_address", metavar="ADDRESS|auto",
              help="Run the jobs as Ray tasks on the cluster at ADDRESS (host:port of the head) or `auto`.")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Stage cache shared by all jobs (a local folder, or one every Ray node mounts). [default: each build's own]")
@click.option("--search-jobs", type=click.IntRange(min=1), default=1, show_default=True,
              help="Local runs: worker processes of each build's fallback search (same chosen nodes at any number).")
@click.option("--list", "list_only", is_flag=True, help="Print the jobs and their configuration, run nothing.")
@click.option("--quiet", "-q", is_flag=True, help="Print nothing but errors and the summary line.")
def matrix(matrix_file: Path, output: Path, jobs: Optional[int], ray_address: Optional[str],
           cache_dir: Optional[Path], search_jobs: int, list_only: bool, quiet: bool) -> None:
    """Run a build matrix: models x targets x options, each job a normal build with its own manifest and parity report.

    \b
    Example:
      pipeline matrix release.yaml -o build/release --jobs 2
      pipeline matrix release.yaml -o build/release --ray auto --cache-dir /mnt/shared/quantpipe-cache
    """
    from pipeline.matrix.spec import load_matrix

    if ray_address and jobs:
        raise click.UsageError("--jobs is for local runs; on Ray, the matrix file's num_cpus decides how many run at once")
    plan = load_matrix(matrix_file, output)
    if list_only:
        for job in plan.jobs:
            click.echo(f"{job.name}: {json.dumps(job.labels)}")
        return
    if ray_address:
        from pipeline.matrix.ray_backend import import_ray

        import_ray()  # missing Ray: one line, exit 5, before anything is written
    quiet_libraries()
    from pipeline.matrix.run import run_matrix

    report = (lambda message: None) if quiet else (lambda message: click.echo(f"matrix: {message}", err=True))
    results, data = run_matrix(plan, output, jobs or 1, ray_address, cache_dir, report, search_jobs)
    click.echo(f"matrix: {data['passed']}/{data['jobs']} builds passed in {data['wall_time_s']:.1f}s "
               f"({data['executor']}); summary: {output / 'matrix.md'}")
    failed = [result for result in results if not result.ok]
    if failed:
        names = ", ".join(f"{result.name} ({result.status}, exit {result.exit_code})" for result in failed)
        raise MatrixFailed(f"{len(failed)} of {len(results)} builds failed: {names}; see {output / 'matrix.md'}",
                           failed[0].exit_code if failed[0].exit_code else ExitCode.INTERNAL)


@click.command("bench-fallback")
@click.option("--model", type=str, help="Model folder. [default: bundled all-MiniLM-L6-v2]")
@click.option("--target", type=click.Choice(["cpu", "trt"]), default="cpu", show_default=True)
@click.option("--quant", type=click.Choice(["static", "dynamic"]), default="static", show_default=True,
              help="--target cpu: the INT8 scheme whose fallback is searched.")
@click.option("--tolerable-loss", type=float, default=0.0005, show_default=True,
              help="--target cpu: allowed drop of the tuning metric (small, so the search has work to do).")
@click.option("--calib-samples", type=int, default=32, show_default=True)
@click.option("--max-nodes", type=click.IntRange(min=1), default=4, show_default=True, help="Most nodes kept back.")
@click.option("--jobs", "-j", "jobs", default="1,2", show_default=True, help="Worker counts to time, comma-separated.")
@click.option("--repeat", type=click.IntRange(min=1), default=3, show_default=True,
              help="Runs per worker count, interleaved; the median is reported.")
@click.option("--output", "-o", type=click.Path(file_okay=False, path_type=Path), default=Path("build/bench-fallback"),
              show_default=True, help="Build directory of the stages before the search (reused between runs).")
def bench_fallback(model: Optional[str], target: str, quant: str, tolerable_loss: float, calib_samples: int,
                   max_nodes: int, jobs: str, repeat: int, output: Path) -> None:
    """Time the fallback search sequentially and with N worker processes; the chosen nodes must not change.

    \b
    Example:
      pipeline bench-fallback --jobs 1,2
      pipeline bench-fallback --target trt --jobs 1,2
    """
    quiet_libraries()
    from pipeline.matrix.bench_fallback import bench_fallback as run

    counts = [int(part) for part in jobs.split(",") if part.strip()]
    if not counts or min(counts) < 1:
        raise click.BadParameter(f"expected positive whole numbers, got '{jobs}'", param_hint="--jobs")
    overrides: dict[str, object] = {"target": target, "calibration": {"samples": calib_samples}}
    if model:
        overrides["model"] = {"path": model}
    if target == "cpu":
        overrides["quantization"] = {"mode": quant, "fallback": "auto", "tolerable_loss": tolerable_loss,
                                     "max_fallback_nodes": max_nodes}
    else:
        overrides["trt"] = {"max_fallback_nodes": max_nodes}
    timings = run(overrides, output, counts, lambda message: click.echo(message, err=True), repeat)
    base = timings[0].seconds
    for timing in timings:
        runs = ", ".join(f"{seconds:.1f}" for seconds in timing.runs)
        click.echo(f"jobs {timing.jobs}: median {timing.seconds:.1f}s of {runs} ({base / timing.seconds:.2f}x as fast as "
                   f"jobs {timings[0].jobs}); {timing.trials} greedy trials; chosen: {', '.join(timing.chosen) or 'none'}")
