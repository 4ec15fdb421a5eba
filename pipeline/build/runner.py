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

from pipeline.build.manifest import publish_build
from pipeline.config import BuildConfig
from pipeline.core.durable import fsync_tree, replace_durable, write_bytes_durable
from pipeline.core.errors import (
    ConfigError,
    EngineError,
    InputError,
    LockedError,
    ParityError,
    QuantpipeError,
    StageError,
)
from pipeline.core.hashing import directory_hashes, stage_key
from pipeline.core.progress import Progress, raise_pending
from pipeline.models.registry import ModelInfo
from pipeline.reports.write import append_step_summary, read_report
from pipeline.stages.base import STAGE_RECORD, Stage, StageContext, StageOutput
from pipeline.stages.config_reads import ConfigReads
from pipeline.stages.facts import VerifyFacts

CACHE_DIR = ".stages"
LOCK_FILE = ".lock"
MARKER_FILE = ".quantpipe-build"
SHARED_LOCKS = ".locks"  # a shared stage cache's per-entry lock files


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


def check_build_directory(build_dir: Path, option: str = "--output") -> None:
    """A build writes model.onnx, parity.*, manifest.json and replaces tokenizer/ in its directory: only in
    a folder Quantpipe marked as its own (MARKER_FILE, written by the first build there) or an empty one;
    never in a folder that holds a user's files (an --output of `.` or `~`, or one with a manifest.json)."""
    if build_dir.is_symlink() or (build_dir.exists() and not build_dir.is_dir()):
        raise InputError(f"{option} {build_dir} is a file or a symlink; give a folder for the build")
    if not build_dir.is_dir():
        return
    marker = build_dir / MARKER_FILE
    if marker.is_file() and not marker.is_symlink():
        return
    entries = {path.name for path in build_dir.iterdir()}
    if entries <= {LOCK_FILE, CACHE_DIR}:  # empty, or a stage cache being seeded (no file of the user's)
        return
    raise InputError(f"refusing to build into {build_dir}: it is not empty and not a build directory Quantpipe "
                     f"created (no {MARKER_FILE}); give a new or empty {option}")


def mark_build_directory(build_dir: Path) -> None:
    """Claim the folder: later builds (and `-o`) write only into folders that carry this marker."""
    marker = build_dir / MARKER_FILE
    if not marker.is_file():
        write_bytes_durable(marker, b"This folder is a Quantpipe build directory; its files are rewritten by builds.\n")


LOCK_POLL_S = 0.2


def _holder(handle: Any) -> str:
    handle.seek(0)
    pid = handle.read().strip()
    return f" (pid {pid})" if pid.isdigit() else ""


@contextmanager
def build_lock(build_dir: Path, progress: Progress, wait: bool = True,
               timeout: Optional[float] = None) -> Iterator[None]:
    """One build per directory at a time. A second one waits for it: forever (timeout None), or up to
    `timeout` seconds and then fails with LockedError (timeout 0 or wait=False: fails at once).

    flock is released by the kernel when its holder dies, so a killed build never leaves a stale lock.
    """
    try:
        build_dir.mkdir(parents=True, exist_ok=True)
        # O_NOFOLLOW: a `.lock` symlinked to a user's file (a hostile build directory) must not truncate it.
        descriptor = os.open(build_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        handle = os.fdopen(descriptor, "r+")
    except OSError as exc:
        raise InputError(f"cannot use {build_dir} as a build directory: {exc.strerror or exc}") from None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(handle)
            if not wait or timeout == 0:
                raise LockedError(f"another build{holder} is running in {build_dir}; "
                                  "wait for it, give --lock-timeout SECONDS, or use another --output") from None
            progress.info(f"another build{holder} holds {build_dir}; waiting for it to finish")
            if not _wait_for_lock(handle, timeout):
                raise LockedError(f"another build{holder} still holds {build_dir} after waiting "
                                  f"{timeout:g}s (--lock-timeout); try again later or use another --output")
        with _holding(handle):
            yield


def _wait_for_lock(handle: Any, timeout: Optional[float]) -> bool:
    """Polled, so that Ctrl-C and SIGTERM are honoured while waiting; False when `timeout` ran out."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if deadline is not None and time.monotonic() >= deadline:
                return False
            raise_pending()
            time.sleep(LOCK_POLL_S)


@contextmanager
def _holding(handle: Any) -> Iterator[None]:
    try:
        handle.seek(0)
        handle.truncate(0)
        handle.write(str(os.getpid()))
        handle.flush()
        yield
    finally:
        fcntl.flock(handle, fcntl.LOCK_UN)


@contextmanager
def entry_lock(cache: Path, entry: str, progress: Progress, shared: bool) -> Iterator[None]:
    """One writer per stage output of a shared cache (--cache-dir): held from the cache check until the entry
    is published, so two builds sharing it (processes, or nodes mounting one folder) never both run the same
    stage; the second waits and reuses the first's output. Its staging leftovers (`tmp-<entry>-*`, of a
    killed holder) are removed under this lock, where no live build can be writing them. A build directory's
    own cache needs none: the build lock already admits one build."""
    if not shared:
        yield
        return
    locks = cache / SHARED_LOCKS
    locks.mkdir(exist_ok=True)
    with (locks / f"{entry}{LOCK_FILE}").open("a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            progress.info(f"another build{_holder(handle)} is running this stage ({entry}); waiting for it")
            _wait_for_lock(handle, None)
        with _holding(handle):
            for leftover in cache.glob(f"tmp-{entry}-*"):
                shutil.rmtree(leftover, ignore_errors=True)
            yield


def clean_stale(build_dir: Path, progress: Progress) -> int:
    """Remove what a killed build left behind: staging folders (`.stages/tmp-*`) and half-written files
    (`.*.tmp`). Only ever called while holding the build directory's lock, so nothing live is removed."""
    stale = list((build_dir / CACHE_DIR).glob("tmp-*")) + list(build_dir.glob(".*.tmp"))
    for path in stale:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    if stale:
        progress.info(f"removed {len(stale)} leftovers of an interrupted build: "
                      + ", ".join(sorted(path.name for path in stale)))
    return len(stale)


@contextmanager
def scratch_space(cache: Path) -> Iterator[Path]:
    """Route Python-level temporary files (tempfile) into the build's cache while the build runs, so a
    killed build's scratch files (graphs of ~100 MB) are removed by the next build instead of piling up
    in /tmp. Same filesystem as the cache, too."""
    folder = Path(tempfile.mkdtemp(prefix="tmp-scratch-", dir=cache))
    # torch's compile caches take their folder from tempfile once per process: left to follow the
    # scratch folder they would outlive it and be written under a deleted build's scratch path.
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(tempfile.gettempdir()) / "quantpipe-torchinductor"))
    previous = tempfile.tempdir
    tempfile.tempdir = str(folder)
    try:
        yield folder
    finally:
        tempfile.tempdir = previous
        shutil.rmtree(folder, ignore_errors=True)


def _cached_output(directory: Path, progress: Progress) -> Optional[StageOutput]:
    """A finished cache entry whose files still hash to what was recorded, else None."""
    if not (directory / STAGE_RECORD).is_file():
        return None
    try:
        output = StageOutput.read(directory)  # signed by this user's Quantpipe, or not reused
    except (ValueError, KeyError, TypeError, OSError) as exc:
        progress.info(f"cached output in {directory.name} is not reusable ({exc}); running the stage again")
        _remove_tree(directory)
        return None
    if output is not None:
        actual = directory_hashes(directory)
        actual.pop(STAGE_RECORD, None)
        if actual == output.files:
            output.reused = True
            return output
    progress.info(f"cached output in {directory.name} is corrupt or incomplete; running the stage again")
    _remove_tree(directory)
    return None


def _remove_tree(directory: Path) -> None:
    """Rename to a `tmp-` name first: a kill during the removal leaves a stale folder the next build
    cleans, never a half-deleted entry under its real name."""
    doomed = directory.with_name(f"tmp-old-{directory.name}-{os.getpid()}")
    try:
        os.replace(directory, doomed)
    except FileNotFoundError:
        return
    except OSError:  # cannot rename (a leftover under that name): remove in place
        doomed = directory
    shutil.rmtree(doomed, ignore_errors=True)


def _run_stage(stage: Stage, context: StageContext, cache: Path, key: str,
               config_slice: dict[str, Any], inputs: dict[str, str]) -> StageOutput:
    final = cache / f"{stage.name}-{key[:16]}"
    staging = Path(tempfile.mkdtemp(prefix=f"tmp-{final.name}-", dir=cache))
    started = time.perf_counter()
    reads: set[str] = set()
    viewed = StageContext(config=ConfigReads(context.config, reads), model=context.model,  # type: ignore[arg-type]
                          progress=context.progress, inputs=context.inputs)
    try:
        stage.requires(viewed)
        metrics = stage.run(viewed, staging)
        stage.ensures(staging)
        output = StageOutput(stage.name, key, staging, directory_hashes(staging), metrics,
                             round(time.perf_counter() - started, 3), facts=stage.record_facts(metrics))
        output.write_record(config_slice, inputs, config_read=sorted(reads))
        fsync_tree(staging)  # every output on disk before the rename that makes the entry look finished
        if final.exists():
            _remove_tree(final)
        replace_durable(staging, final)
    except EngineError as exc:  # engines do not know which stage called them
        raise StageError(stage.name, exc.message) from exc
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
    lock_timeout: Optional[float] = None,
    cache_dir: Optional[Path] = None,
    raise_on_parity_failure: bool = True,
) -> BuildResult:
    """`cache_dir`: a stage cache shared with other builds (a local folder, or one every node mounts);
    default: the build directory's own `.stages/`. Keys are content hashes, so sharing changes no output.
    A parity failure raises ParityError after publishing, unless raise_on_parity_failure is off (the
    Python API): then the result says passed=False."""
    started = time.perf_counter()
    from pipeline.build.plan import plan_build

    plan = plan_build(config)
    config, model = plan.config, plan.model
    build_dir = build_directory(config, model)
    pipeline_stages = list(stages) if stages is not None else list(plan.stages)
    if stop_after is not None and stop_after not in [stage.name for stage in pipeline_stages]:
        names = ", ".join(stage.name for stage in pipeline_stages)
        raise ConfigError(f"--stop-after {stop_after}: target '{config.target}' has no such stage (stages: {names})")
    check_build_directory(build_dir)
    if config.verify.eval_file and model.task.name == "text-classification":  # bad data fails before export
        from pipeline.parity.eval_data import read_labelled

        read_labelled(Path(config.verify.eval_file), model.config)
    with build_lock(build_dir, progress, timeout=lock_timeout):
        check_build_directory(build_dir)  # again under the lock: nothing changed it in between
        mark_build_directory(build_dir)
        local = build_dir / CACHE_DIR
        local.mkdir(parents=True, exist_ok=True)
        clean_stale(build_dir, progress)
        cache = local if cache_dir is None else _shared_cache(Path(cache_dir))
        with scratch_space(local):
            context = _run_stages(config, model, progress, pipeline_stages, cache, force, stop_after,
                                  shared=cache_dir is not None)
        progress.stage("publish")
        passed = publish_build(build_dir, config, model, context.inputs, time.perf_counter() - started)
        if "verify" in context.inputs:
            append_step_summary(read_report(context.inputs["verify"].path("parity.json")))
    result = BuildResult(build_dir, context.inputs, passed, time.perf_counter() - started)
    if passed is False and raise_on_parity_failure:
        failures = context.facts("verify", VerifyFacts).failures
        raise ParityError("parity failed: " + "; ".join(failures) + f" (report: {build_dir / 'parity.md'})")
    return result


def _shared_cache(folder: Path) -> Path:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot use {folder} as a stage cache (--cache-dir): {exc.strerror or exc}") from None
    return folder


def stage_cache_key(stage: Stage, config: BuildConfig, model: ModelInfo,
                    upstream: dict[str, str]) -> tuple[str, dict[str, Any], dict[str, str]]:
    """A stage output's key: the stage and its version, the configuration slice it declares, the
    fingerprints of the files it reads from outside the build, and its upstream outputs' content hashes."""
    config_slice = stage.config_slice(config, model)
    inputs = dict(stage.external_inputs(config, model))
    inputs.update({f"stage:{name}": digest for name, digest in upstream.items()})
    return stage_key(stage.name, stage.version, config_slice, inputs), config_slice, inputs


def _run_stages(config: BuildConfig, model: ModelInfo, progress: Progress, pipeline_stages: Sequence[Stage],
                cache: Path, force: bool, stop_after: Optional[str], shared: bool = False) -> StageContext:
    context = StageContext(config=config, model=model, progress=progress)
    for stage in pipeline_stages:
        progress.stage(stage.name)
        upstream = {name: context.input(name).content_hash for name in stage.depends_on(config)}
        key, config_slice, inputs = stage_cache_key(stage, config, model, upstream)
        directory = cache / f"{stage.name}-{key[:16]}"
        with entry_lock(cache, directory.name, progress, shared):
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
    return context
