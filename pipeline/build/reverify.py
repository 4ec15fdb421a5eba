"""`pipeline verify BUILD_DIR`: parity again for a finished build, from its manifest and stage cache."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from engines.onnx_io import check_onnx_file
from pipeline.build.manifest_schema import Manifest
from pipeline.build.readback import check_stage_record, load_manifest
from pipeline.config import BuildConfig
from pipeline.core.errors import InputError, ParityError
from pipeline.core.hashing import file_sha256
from pipeline.core.progress import Progress
from pipeline.parity.report import ParityReport
from pipeline.reports.write import append_step_summary, write_reports
from pipeline.stages.base import STAGE_RECORD, StageOutput

NEEDED_STAGES = ("export", "optimize", "calibrate", "quantize")



def stage_outputs(build_dir: Path, manifest: Manifest, needed: tuple[str, ...]) -> dict[str, StageOutput]:
    """The manifest's stage outputs, each record and file checked against the hashes the manifest recorded."""
    from pipeline.build.runner import CACHE_DIR

    outputs = {}
    for stage in needed:
        entry = manifest.stage(stage)
        if entry is None:
            raise InputError(f"the build in {build_dir} has no '{stage}' stage; run `pipeline build` to completion")
        directory = build_dir / CACHE_DIR / entry.directory  # the schema keeps it a plain name inside .stages/
        if directory.is_symlink() or not (directory / STAGE_RECORD).is_file():
            raise InputError(f"stage output {directory} is missing; run `pipeline build` again to recreate it")
        check_stage_record(directory, entry)
        try:
            output = StageOutput.read(directory, signed=False)  # built elsewhere is fine: it matched the manifest
        except (ValueError, KeyError, TypeError) as exc:
            raise InputError(f"stage record {directory / STAGE_RECORD} is unreadable ({exc}); run `pipeline build` again") from None
        if output.files != entry.outputs or output.stage != stage:
            raise InputError(f"stage record {directory / STAGE_RECORD} disagrees with the manifest; run `pipeline build` again")
        outputs[stage] = output
    return outputs


def check_candidate_fits(candidate: Path, reference: Path) -> None:
    """A candidate must take the reference's inputs and give its outputs, or parity cannot compare them."""
    import onnx

    def names(path: Path) -> tuple[set[str], set[str]]:
        graph = onnx.load_model(str(path), load_external_data=False).graph
        initializers = {tensor.name for tensor in graph.initializer}
        return {i.name for i in graph.input if i.name not in initializers}, {o.name for o in graph.output}

    (ref_in, ref_out), (cand_in, cand_out) = names(reference), names(candidate)
    if not cand_in <= ref_in or not ref_out <= cand_out:
        raise InputError(
            f"candidate {candidate} does not fit this build: inputs {sorted(cand_in)}, outputs {sorted(cand_out)}; "
            f"the reference takes {sorted(ref_in)} and gives {sorted(ref_out)}"
        )


def reverify(
    build_dir: Path,
    verify_overrides: dict[str, Any],
    progress: Progress,
    candidate: Optional[Path] = None,
    output_dir: Optional[Path] = None,
    trust_remote_code: bool = False,
    raise_on_failure: bool = True,
) -> ParityReport:
    """Run parity for the build's candidate (or another artifact) and write the four reports."""
    from pipeline.build.runner import build_lock, check_build_directory, mark_build_directory
    from pipeline.models.registry import inspect_model
    from pipeline.parity.verification import run_parity
    from pipeline.stages.base import StageContext
    from pipeline.stages.verify import parity_inputs

    if candidate is not None:
        if not candidate.is_file():
            raise InputError(f"candidate not found: {candidate}")
        check_onnx_file(candidate, runnable=True)
    # Under the build's lock from the first read: a build running meanwhile cannot swap files underneath.
    with build_lock(build_dir, progress):
        manifest = load_manifest(build_dir)
        config_data = manifest.config.to_dict()
        # Trust comes from the user's flag, never from the build directory's manifest.
        config_data["model"]["trust_remote_code"] = trust_remote_code
        config_data["verify"] = {**config_data["verify"], **verify_overrides}
        try:
            config = BuildConfig.model_validate(config_data)
        except ValueError as exc:  # pydantic's ValidationError is a ValueError
            problem = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise InputError(f"cannot read the configuration in {build_dir / 'manifest.json'}: {problem}") from None
        manifest_task = manifest.model.task
        stages = {entry.stage for entry in manifest.stages}
        if "export" in stages and "optimize" not in stages:  # only CPU encoder builds have an optimize stage
            qat = manifest.model.origin is not None and manifest.model.origin.kind == "onnx-qdq"
            kind = "a Q/DQ ONNX (QAT)" if qat else "a TensorRT" if config.target == "trt" else "a decoder LLM"
            raise InputError(f"{build_dir} is {kind} build; `pipeline verify` re-checks CPU encoder builds. Run the "
                             "same `pipeline build` with the new thresholds instead: only its verify stage re-runs")
        model = inspect_model(config.model.path, manifest_task, config.model.trust_remote_code)
        context = StageContext(config=config, model=model, progress=progress,
                               inputs=stage_outputs(build_dir, manifest, NEEDED_STAGES))
        inputs = parity_inputs(context)
        if candidate is not None:
            check_candidate_fits(candidate, inputs.reference)
            inputs.candidate, inputs.candidate_sha256 = candidate, file_sha256(candidate)
            inputs.candidate_description = f"ONNX {candidate.name}"
        target = output_dir or build_dir
        if output_dir is not None:  # only a new, empty or Quantpipe-marked folder: never a user's files
            check_build_directory(output_dir, "--output")
        try:
            target.mkdir(parents=True, exist_ok=True)
            if output_dir is not None:
                mark_build_directory(output_dir)
        except OSError as exc:
            raise InputError(f"cannot write the reports to {target}: {exc.strerror or exc}") from None
        progress.stage("verify")
        report = run_parity(inputs, config, model, progress)
        write_reports(report, target)
    append_step_summary(report)
    if report.failures and raise_on_failure:
        raise ParityError("parity failed: " + "; ".join(report.failures) + f" (report: {target / 'parity.md'})")
    return report
