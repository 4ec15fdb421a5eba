"""`pipeline verify BUILD_DIR`: parity again for a finished build, from its manifest and stage cache."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from pydantic import ValidationError

from pipeline.config import BuildConfig
from pipeline.errors import InputError, ParityError
from pipeline.hashing import directory_hashes, file_sha256
from pipeline.progress import Progress
from pipeline.reports import append_step_summary, write_reports
from pipeline.stages.base import STAGE_RECORD, StageOutput

NEEDED_STAGES = ("export", "optimize", "calibrate", "quantize")


def read_manifest(build_dir: Path) -> dict[str, Any]:
    path = build_dir / "manifest.json"
    if not path.is_file():
        raise InputError(f"{build_dir} is not a build directory (no manifest.json); run `pipeline build` first")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path} is not valid JSON: {exc}") from None


def stage_outputs(build_dir: Path, manifest: dict[str, Any], needed: tuple[str, ...]) -> dict[str, StageOutput]:
    """The manifest's stage outputs, each checked against the hashes it recorded."""
    from pipeline.runner import CACHE_DIR

    entries = {entry["stage"]: entry for entry in manifest.get("stages", [])}
    outputs = {}
    for stage in needed:
        if stage not in entries:
            raise InputError(f"the build in {build_dir} has no '{stage}' stage; run `pipeline build` to completion")
        directory = build_dir / CACHE_DIR / entries[stage]["directory"]
        if not (directory / STAGE_RECORD).is_file():
            raise InputError(f"stage output {directory} is missing; run `pipeline build` again to recreate it")
        output = StageOutput.read(directory)
        actual = directory_hashes(directory)
        actual.pop(STAGE_RECORD, None)
        if actual != output.files:
            raise InputError(f"stage output {directory} does not match its recorded hashes; run `pipeline build` again")
        outputs[stage] = output
    return outputs


def reverify(
    build_dir: Path,
    verify_overrides: dict[str, Any],
    progress: Progress,
    candidate: Optional[Path] = None,
    output_dir: Optional[Path] = None,
) -> dict[str, Any]:
    """Run parity for the build's candidate (or another artifact) and write the four reports."""
    from pipeline.models import inspect_model
    from pipeline.runner import build_lock
    from pipeline.stages.base import StageContext
    from pipeline.stages.verify import parity_inputs
    from pipeline.verification import run_parity

    manifest = read_manifest(build_dir)
    try:
        config_data = manifest["config"]
        config_data["verify"] = {**config_data.get("verify", {}), **verify_overrides}
        config = BuildConfig.model_validate(config_data)
    except (KeyError, ValidationError) as exc:
        raise InputError(f"cannot read the configuration in {build_dir / 'manifest.json'}: {exc}") from None
    model = inspect_model(config.model.path, manifest.get("model", {}).get("task"))
    context = StageContext(config=config, model=model, progress=progress,
                           inputs=stage_outputs(build_dir, manifest, NEEDED_STAGES))
    inputs = parity_inputs(context)
    if candidate is not None:
        if not candidate.is_file():
            raise InputError(f"candidate not found: {candidate}")
        inputs.candidate, inputs.candidate_sha256 = candidate, file_sha256(candidate)
        inputs.candidate_description = f"ONNX {candidate.name}"
    target = output_dir or build_dir
    target.mkdir(parents=True, exist_ok=True)
    progress.stage("verify")
    with build_lock(build_dir, progress):
        report = run_parity(inputs, config, model, progress)
        write_reports(report, target)
    append_step_summary(target / "parity.md")
    if report["failures"]:
        raise ParityError("parity failed: " + "; ".join(report["failures"]) + f" (report: {target / 'parity.md'})")
    return report
