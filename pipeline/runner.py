"""The staged runner: keyed stage cache, lineage manifest, atomic publishing."""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

from pipeline.config import BuildConfig
from pipeline.errors import ConfigError, LockedError, ParityError, QuantpipeError, StageError
from pipeline.hashing import directory_hashes, stage_key
from pipeline.manifest import publish_build
from pipeline.models import ModelInfo, inspect_model
from pipeline.progress import Progress
from pipeline.reports import append_step_summary
from pipeline.stages import stages_for
from pipeline.stages.base import STAGE_RECORD, Stage, StageContext, StageOutput

CACHE_DIR = ".stages"
LOCK_FILE = ".lock"


@dataclass
class BuildResult:
    build_dir: Path
    outputs: dict[str, StageOutput]
    passed: Optional[bool]  # None when the build stopped before verify
    wall_time_s: float


def build_directory(config: BuildConfig, model: ModelInfo) -> Path:
    if config.output_dir:
        return Path(config.output_dir)
    return Path("build") / f"{model.name}-{config.target}"


@contextmanager
def build_lock(build_dir: Path, progress: Progress, wait: bool = True) -> Iterator[None]:
    """One build per directory at a time; a second one waits (or fails with wait=False)."""
    build_dir.mkdir(parents=True, exist_ok=True)
    with (build_dir / LOCK_FILE).open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                raise LockedError(f"another build is running in {build_dir}; wait for it or use another --output")
            progress.info(f"another build holds {build_dir}; waiting for it to finish")
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _cached_output(directory: Path, progress: Progress) -> Optional[StageOutput]:
    """A finished cache entry whose files still hash to what was recorded, else None."""
    if not (directory / STAGE_RECORD).is_file():
        return None
    try:
        output = StageOutput.read(directory)
    except (ValueError, KeyError, OSError):
        output = None
    if output is not None:
        actual = directory_hashes(directory)
        actual.pop(STAGE_RECORD, None)
        if actual == output.files:
            output.reused = True
            return output
    progress.info(f"cached output in {directory.name} is corrupt or incomplete; running the stage again")
    shutil.rmtree(directory, ignore_errors=True)
    return None


def _run_stage(stage: Stage, context: StageContext, cache: Path, key: str,
               config_slice: dict[str, Any], inputs: dict[str, str]) -> StageOutput:
    final = cache / f"{stage.name}-{key[:16]}"
    staging = Path(tempfile.mkdtemp(prefix=f"tmp-{stage.name}-", dir=cache))
    started = time.perf_counter()
    try:
        stage.requires(context)
        metrics = stage.run(context, staging)
        stage.ensures(staging)
        output = StageOutput(stage.name, key, staging, directory_hashes(staging), metrics,
                             round(time.perf_counter() - started, 3))
        output.write_record(config_slice, inputs)
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
    except QuantpipeError:
        raise
    except Exception as exc:  # a library failing on valid input: name the stage, keep the cause
        raise StageError(stage.name, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    output.directory = final
    return output


def run_build(
    config: BuildConfig,
    progress: Progress,
    force: bool = False,
    stop_after: Optional[str] = None,
    stages: Optional[Sequence[Stage]] = None,
) -> BuildResult:
    started = time.perf_counter()
    model = inspect_model(config.model.path, config.model.task)
    build_dir = build_directory(config, model)
    pipeline_stages = list(stages) if stages is not None else stages_for(config)
    if stop_after is not None and stop_after not in [stage.name for stage in pipeline_stages]:
        names = ", ".join(stage.name for stage in pipeline_stages)
        raise ConfigError(f"--stop-after {stop_after}: target '{config.target}' has no such stage (stages: {names})")
    with build_lock(build_dir, progress):
        cache = build_dir / CACHE_DIR
        cache.mkdir(parents=True, exist_ok=True)
        context = StageContext(config=config, model=model, progress=progress)
        for stage in pipeline_stages:
            progress.stage(stage.name)
            config_slice = stage.config_slice(config, model)
            inputs = dict(stage.external_inputs(config, model))
            for upstream in stage.depends_on(config):
                inputs[f"stage:{upstream}"] = context.input(upstream).content_hash
            key = stage_key(stage.name, stage.version, config_slice, inputs)
            directory = cache / f"{stage.name}-{key[:16]}"
            output = None if force else _cached_output(directory, progress)
            if output is not None:
                progress.info(f"reused cached output {directory.name} (built in {output.wall_time_s:.1f}s)")
            else:
                progress.info("running")
                output = _run_stage(stage, context, cache, key, config_slice, inputs)
                progress.info(f"done in {output.wall_time_s:.1f}s")
            context.inputs[stage.name] = output
            if stop_after == stage.name:
                break
        progress.stage("publish")
        passed = publish_build(build_dir, config, model, context.inputs, time.perf_counter() - started)
        if "verify" in context.inputs:
            append_step_summary(build_dir / "parity.md")
    result = BuildResult(build_dir, context.inputs, passed, time.perf_counter() - started)
    if passed is False:
        failures = context.inputs["verify"].metrics.get("failures", [])
        raise ParityError("parity failed: " + "; ".join(failures) + f" (report: {build_dir / 'parity.md'})")
    return result
