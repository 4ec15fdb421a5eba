"""Publishing a build: final artifacts moved into place, and manifest.json, the lineage record."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Optional

from pipeline import __version__
from pipeline.config import BuildConfig
from pipeline.models import ModelInfo
from pipeline.stages.base import StageOutput

MANIFEST_SCHEMA_VERSION = 1
# build-dir name -> (stage, file in that stage's output); published only when parity passed.
MODEL_ARTIFACTS = {
    "model.onnx": ("quantize", "model.onnx"),
    "model.fp32.onnx": ("optimize", "model.onnx"),
}
REPORT_ARTIFACTS = {name: ("verify", name) for name in ("parity.json", "parity.md", "parity.html", "parity.junit.xml")}


def _place(source: Path, target: Path) -> None:
    """Hard-link (or copy) next to the target, then rename over it: readers never see half a file."""
    if target.exists() and os.path.samefile(source, target):
        return  # already this build's file (renaming a hard link onto itself would do nothing)
    temporary = target.with_name(f".{target.name}.tmp")
    if temporary.exists() or temporary.is_symlink():
        temporary.unlink()
    try:
        os.link(source, temporary)
    except OSError:
        shutil.copyfile(source, temporary)
    os.replace(temporary, target)


def _place_tree(source: Path, target: Path) -> None:
    temporary = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(temporary, ignore_errors=True)
    shutil.copytree(source, temporary)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(temporary, target)


def write_json_atomic(path: Path, data: Any) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(temporary, path)


def publish_build(
    build_dir: Path,
    config: BuildConfig,
    model: ModelInfo,
    outputs: dict[str, StageOutput],
    wall_time_s: float,
) -> Optional[bool]:
    """Move the final artifacts into the build directory; return the parity verdict (None: no verify)."""
    verify = outputs.get("verify")
    passed: Optional[bool] = None if verify is None else bool(verify.metrics.get("passed"))
    artifacts: dict[str, str] = {}
    for name, (stage, file) in {**MODEL_ARTIFACTS, **REPORT_ARTIFACTS}.items():
        if name == "model.fp32.onnx" and "optimize" not in outputs:
            stage = "export"  # decoder LLM builds have no optimize stage: the export is the FP32 baseline
        target = build_dir / name
        is_report = name in REPORT_ARTIFACTS
        if stage in outputs and (is_report or passed):
            _place(outputs[stage].path(file), target)
            artifacts[name] = outputs[stage].files[file]
        elif target.exists():
            target.unlink()  # a stale artifact of an earlier build must not look like this build's
    if passed and "export" in outputs:
        _place_tree(outputs["export"].path("tokenizer"), build_dir / "tokenizer")
    status = {None: "incomplete", True: "passed", False: "parity_failed"}[passed]
    manifest = {
        "schema_version": MANIFEST_SCHEMA_VERSION,
        "quantpipe_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "status": status,
        "wall_time_s": round(wall_time_s, 3),
        "model": {"name": model.name, "path": str(model.path), "task": model.task.name},
        "config": config.to_dict(),
        "stages": [_stage_entry(output) for output in outputs.values()],
        "artifacts": artifacts,
    }
    write_json_atomic(build_dir / "manifest.json", manifest)
    return passed


def _stage_entry(output: StageOutput) -> dict[str, Any]:
    record = json.loads((output.directory / "stage.json").read_text(encoding="utf-8"))
    return {
        "stage": output.stage,
        "key": output.key,
        "reused": output.reused,
        "directory": str(output.directory.name),
        "config": record["config"],
        "inputs": record["inputs"],
        "outputs": output.files,
        "wall_time_s": output.wall_time_s,
        "metrics": output.metrics,
    }
