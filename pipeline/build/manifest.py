"""Publishing a build: final artifacts moved into place, and manifest.json, the lineage record."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Optional

from pipeline import __version__
from pipeline.build.manifest_schema import MANIFEST_SCHEMA_VERSION, validate_manifest
from pipeline.config import BuildConfig
from pipeline.core.durable import fsync_directory, fsync_file, fsync_tree, replace_durable, write_bytes_durable
from pipeline.core.errors import InputError, read_json_input
from pipeline.core.hashing import file_sha256
from pipeline.core.host import host_facts
from pipeline.models.registry import ModelInfo
from pipeline.stages.base import StageOutput
from pipeline.stages.facts import FACTS_VERSION, VerifyFacts

# build-dir name -> (stage, file in that stage's output); published only when parity passed.
MODEL_ARTIFACTS = {
    "model.onnx": ("quantize", "model.onnx"),
    "model.fp32.onnx": ("optimize", "model.onnx"),
}
REPORT_ARTIFACTS = {name: ("verify", name) for name in ("parity.json", "parity.md", "parity.html", "parity.junit.xml")}
TRT_MODEL_ARTIFACTS = {
    "model.onnx": ("precision", "model.onnx"),  # the graph that carries its TensorRT precision
    "model.fp32.onnx": ("export", "model.onnx"),
}
TRT_BUNDLE_DIR = "trt"
QDQ_INPUT_FLOAT = "model.float.onnx"  # pipeline.stages.qdq_input.FLOAT_GRAPH


def _place(source: Path, target: Path) -> None:
    """Hard-link (or copy) next to the target, then rename over it: readers never see half a file."""
    if target.exists() and os.path.samefile(source, target):
        return  # already this build's file (renaming a hard link onto itself would do nothing)
    temporary = target.with_name(f".{target.name}.tmp")
    if temporary.exists() or temporary.is_symlink():
        temporary.unlink()
    try:
        os.link(source, temporary)  # the stage output it links to was fsync'ed when the stage finished
    except OSError:
        shutil.copyfile(source, temporary)
        fsync_file(temporary)
    replace_durable(temporary, target)


def _place_tree(source: Path, target: Path, ignore: tuple[str, ...] = ()) -> None:
    """Copy a folder beside the target and swap it in; an identical folder is left alone. The old
    folder is renamed to a `.*.tmp` name before the new one takes its place, so a kill in between
    leaves no half-copied folder under the real name, only leftovers the next build removes."""
    from pipeline.core.hashing import directory_hashes

    temporary = target.with_name(f".{target.name}.tmp")
    retired = target.with_name(f".{target.name}.old.tmp")
    for leftover in (temporary, retired):
        shutil.rmtree(leftover, ignore_errors=True)
    shutil.copytree(source, temporary, ignore=shutil.ignore_patterns(*ignore) if ignore else None)
    if target.is_dir() and not target.is_symlink() and directory_hashes(target) == directory_hashes(temporary):
        shutil.rmtree(temporary)
        return
    fsync_tree(temporary)
    _remove(target, retired)
    replace_durable(temporary, target)
    shutil.rmtree(retired, ignore_errors=True)


def _remove(target: Path, retired: Path) -> None:
    if target.is_dir() and not target.is_symlink():
        os.replace(target, retired)
    elif target.exists() or target.is_symlink():
        target.unlink()


def write_text_atomic(path: Path, text: str) -> None:
    """Write beside the target, fsync, rename over it: a reader sees the old file or the new one, even after
    a power loss."""
    write_bytes_durable(path, text.encode("utf-8"))


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def publish_build(
    build_dir: Path,
    config: BuildConfig,
    model: ModelInfo,
    outputs: dict[str, StageOutput],
    wall_time_s: float,
) -> Optional[bool]:
    """Move the final artifacts into the build directory; return the parity verdict (None: no verify)."""
    verify = outputs.get("verify")
    passed: Optional[bool] = None if verify is None else VerifyFacts.model_validate(verify.facts).passed
    # The old manifest goes first: while artifacts are swapped, and if the build is killed before the
    # new manifest is written, the directory has no manifest and cannot pass for a finished build.
    (build_dir / "manifest.json").unlink(missing_ok=True)
    fsync_directory(build_dir)  # the removal is durable before any artifact is swapped (power loss included)
    artifacts: dict[str, str] = {}
    models = TRT_MODEL_ARTIFACTS if config.target == "trt" else MODEL_ARTIFACTS
    for name, (stage, file) in {**models, **REPORT_ARTIFACTS}.items():
        if name == "model.fp32.onnx" and "optimize" not in outputs:
            stage = "export"  # TensorRT and decoder LLM builds have no optimize stage: the export is the FP32 baseline
            if "export" in outputs and QDQ_INPUT_FLOAT in outputs["export"].files:
                file = QDQ_INPUT_FLOAT  # a Q/DQ ONNX input: its export is the Q/DQ graph; the float graph under it
        target = build_dir / name
        is_report = name in REPORT_ARTIFACTS
        if stage in outputs and (is_report or passed):
            _place(outputs[stage].path(file), target)
            artifacts[name] = outputs[stage].files[file]
        elif target.exists():
            target.unlink()  # a stale artifact of an earlier build must not look like this build's
    if passed and "export" in outputs:
        _place_tree(outputs["export"].path("tokenizer"), build_dir / "tokenizer")
        artifacts.update({name: digest for name, digest in sorted(outputs["export"].files.items())
                          if name.startswith("tokenizer/")})
    else:
        _remove(build_dir / "tokenizer", build_dir / ".tokenizer.old.tmp")
        shutil.rmtree(build_dir / ".tokenizer.old.tmp", ignore_errors=True)
    if passed and "bundle" in outputs:
        _place_tree(outputs["bundle"].directory, build_dir / TRT_BUNDLE_DIR, ignore=("stage.json",))
        artifacts[f"{TRT_BUNDLE_DIR}/"] = outputs["bundle"].content_hash
    else:
        _remove(build_dir / TRT_BUNDLE_DIR, build_dir / f".{TRT_BUNDLE_DIR}.old.tmp")
        shutil.rmtree(build_dir / f".{TRT_BUNDLE_DIR}.old.tmp", ignore_errors=True)
    runtime = build_runtime(config.target)
    _publish_standalone_files(build_dir, model, outputs, runtime, artifacts, bool(passed))
    status = {None: "incomplete", True: "passed", False: "parity_failed"}[passed]
    manifest = {
        "schema_version": MANIFEST_SCHEMA_VERSION,
        "quantpipe_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "status": status,
        "wall_time_s": round(wall_time_s, 3),
        "model": {"name": model.name, "path": str(model.path), "task": model.task.name,
                  "family": model.architecture.family, **({"origin": model.origin} if model.origin else {})},
        "config": config.to_dict(),
        "stages": [_stage_entry(output) for output in outputs.values()],
        "artifacts": artifacts,
    }
    manifest["runtime"] = runtime
    manifest["host"] = host_facts()  # the build host; config.quantization.cpu_isa is the deployment host's ISA
    validate_manifest(manifest, "the manifest being written")  # what the reader will accept, checked here
    write_json_atomic(build_dir / "manifest.json", manifest)
    return passed


def _publish_standalone_files(build_dir: Path, model: ModelInfo, outputs: dict[str, StageOutput],
                              runtime: dict[str, Any], artifacts: dict[str, str], passed: bool) -> None:
    """config.json (labels), and genai_config.json with the tokenizer files for LLMs: see build/standalone.py."""
    from pipeline.build.standalone import GENAI_CONFIG, GENAI_TOKENIZER_FILES, MODEL_CONFIG, write_standalone_files
    from pipeline.core.hashing import file_sha256

    names = (MODEL_CONFIG, GENAI_CONFIG, *GENAI_TOKENIZER_FILES)
    for name in names:  # a stale file of an earlier build must not look like this build's
        (build_dir / name).unlink(missing_ok=True)
    if passed and "export" in outputs:
        for name in write_standalone_files(build_dir, model, build_dir / "tokenizer", runtime,
                                           write_text_atomic, _place):
            artifacts[name] = file_sha256(build_dir / name)


def build_runtime(target: str) -> dict[str, Any]:
    """The ONNX Runtime session settings the artifacts were measured with, which `pipeline.load` and
    `pipeline serve` read back (TensorRT builds: the settings of the CPU simulation parity ran)."""
    from engines.ort_session import SessionSettings

    return SessionSettings.for_target(target).to_dict()


def _stage_entry(output: StageOutput) -> dict[str, Any]:
    record_file = output.directory / "stage.json"
    record = json.loads(record_file.read_text(encoding="utf-8"))
    return {
        "stage": output.stage,
        "key": output.key,
        "reused": output.reused,
        "directory": str(output.directory.name),
        "record_sha256": file_sha256(record_file),
        "config": record["config"],
        "inputs": record["inputs"],
        "outputs": output.files,
        "wall_time_s": output.wall_time_s,
        "metrics": output.metrics,
        "facts": output.facts,
        "facts_version": FACTS_VERSION,
    }


def read_manifest(build_dir: Path) -> dict[str, Any]:
    """The manifest as JSON, after its schema accepted it (pipeline.build.manifest_schema; one InputError if not)."""
    path = build_dir / "manifest.json"
    if path.is_symlink() or not path.is_file():
        raise InputError(f"{build_dir} is not a build directory (no manifest.json); run `pipeline build` first")
    manifest = read_json_input(path)
    validate_manifest(manifest, str(path))
    return manifest
