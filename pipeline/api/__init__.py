"""The Python API: `build`, `verify`, `load`. The `pipeline` command calls these same functions.

    import pipeline
    result = pipeline.build(model="./my-bert", quant="static", output="build/my-bert")
    if result.passed:
        embeddings = pipeline.load(result.build_dir).encode(["a sentence", "another one"])

A parity failure is a result (`status == "parity_failed"`, the report in `result.report`), not an
exception; errors (a bad option, a model folder that cannot be read, a stage that fails) raise a
`QuantpipeError` subclass from `pipeline.core.errors` (ConfigError, InputError, StageError, ...).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Union

from pipeline.api.options import overrides_from_options
from pipeline.config import BuildConfig
from pipeline.core.errors import ParityError
from pipeline.core.progress import Progress

ConfigLike = Union[BuildConfig, Mapping[str, Any], str, Path, None]

__all__ = ["BuildResult", "build", "load", "verify"]

# Published files a user opens, by the name BuildResult.paths gives them.
_PATHS = {"model": "model.onnx", "model_fp32": "model.fp32.onnx", "tokenizer": "tokenizer", "config": "config.json",
          "manifest": "manifest.json", "parity_json": "parity.json", "parity_md": "parity.md",
          "parity_html": "parity.html", "parity_junit": "parity.junit.xml", "genai_config": "genai_config.json",
          "trt_bundle": "trt"}


@dataclass
class BuildResult:
    """What `build()` made. `status`: passed, parity_failed, or incomplete (stopped before verify)."""

    build_dir: Path
    status: str
    manifest: dict[str, Any]
    report: Optional[Any]  # pipeline.parity.report.ParityReport; None when the build stopped before verify
    wall_time_s: float
    outputs: dict[str, Any] = field(default_factory=dict)  # stage name -> StageOutput (the stage cache)

    @property
    def passed(self) -> Optional[bool]:
        return {"passed": True, "parity_failed": False}.get(self.status)

    @property
    def failures(self) -> list[str]:
        return list(self.report.failures) if self.report is not None else []

    @property
    def paths(self) -> dict[str, Path]:
        """The published files that exist: model, model_fp32, tokenizer, config, manifest, parity_*, ..."""
        return {name: self.build_dir / file for name, file in _PATHS.items() if (self.build_dir / file).exists()}

    def load(self, threads: int = 0) -> Any:
        return load(self.build_dir, threads)

    def raise_for_status(self) -> "BuildResult":
        """Raise ParityError (exit code 4 in the CLI) when parity failed; return self otherwise."""
        if self.status == "parity_failed":
            raise ParityError("parity failed: " + "; ".join(self.failures)
                              + f" (report: {self.build_dir / 'parity.md'})")
        return self


def resolve_config(config: ConfigLike = None, **options: Any) -> BuildConfig:
    """A BuildConfig from a BuildConfig, a nested mapping, or a build file path, with keyword options
    (the build command's flag names, or whole sections as mappings) on top."""
    from pipeline.api.options import set_nested
    from pipeline.config import _merge, load_config

    overrides = overrides_from_options(options)
    if isinstance(config, BuildConfig):  # only what was set: defaults the plan decides stay undecided
        return config if not overrides else load_config(
            None, _merge(config.model_dump(mode="json", exclude_unset=True), overrides))
    if isinstance(config, Mapping):
        nested: dict[str, Any] = {}
        for key, value in config.items():  # dotted keys allowed: {"quantization.mode": "static"}
            set_nested(nested, key, value)
        return load_config(None, _merge(nested, overrides))
    return load_config(Path(config) if config is not None else None, overrides)


def build(config: ConfigLike = None, *, progress: Optional[Progress] = None, quiet: bool = True,
          force: bool = False, stop_after: Optional[str] = None, lock_timeout: Optional[float] = None,
          check_data: bool = True, **options: Any) -> BuildResult:
    """Export, optimize, calibrate, quantize and verify a model; returns the BuildResult.

    config: a BuildConfig, a mapping, or a YAML/TOML build file; options: flag names of `pipeline build`
    (model, target, quant, calib_samples, output, ...) or sections (quantization={...}). Parity failure is
    returned (status "parity_failed"); errors raise QuantpipeError subclasses.
    """
    from pipeline.build.manifest import read_manifest
    from pipeline.build.runner import run_build
    from pipeline.core.logs import quiet_libraries

    resolved = resolve_config(config, **options)
    quiet_libraries()
    if check_data and stop_after not in ("export", "optimize"):
        from pipeline.stages.calibrate import check_source

        check_source(resolved.calibration)  # a bad data file fails before export runs, not after
    result = run_build(resolved, progress or Progress(quiet=quiet), force=force, stop_after=stop_after,
                       lock_timeout=lock_timeout, raise_on_parity_failure=False)
    manifest = read_manifest(result.build_dir)
    report = None
    if "verify" in result.outputs:
        from pipeline.reports.write import read_report

        report = read_report(result.outputs["verify"].path("parity.json"))
    return BuildResult(result.build_dir, str(manifest.get("status")), manifest, report, result.wall_time_s,
                       result.outputs)


def verify(build_dir: Union[str, Path], *, candidate: Union[str, Path, None] = None,
           output_dir: Union[str, Path, None] = None, progress: Optional[Progress] = None, quiet: bool = True,
           trust_remote_code: bool = False, **gates: Any) -> Any:
    """Run parity again for a finished CPU encoder build; returns the ParityReport (its `failures` empty when
    it passed). gates: min_cosine, max_abs, min_snr_db, localize, eval_file."""
    from pipeline.build.reverify import reverify
    from pipeline.core.logs import quiet_libraries

    quiet_libraries()
    overrides = {key: str(value) if isinstance(value, Path) else value for key, value in gates.items()
                 if value is not None}
    return reverify(Path(build_dir), overrides, progress or Progress(quiet=quiet),
                    Path(candidate) if candidate is not None else None,
                    Path(output_dir) if output_dir is not None else None, trust_remote_code,
                    raise_on_failure=False)


def load(build_dir: Union[str, Path], threads: int = 0) -> Any:
    """A runner for a finished build, with the ONNX Runtime session settings it was measured with:
    `.encode(texts)` (embedding builds), `.predict(texts)` (classifiers), `.generate(prompt)` (LLM builds)."""
    from pipeline.core.logs import quiet_libraries
    from pipeline.deploy.runtime import open_build

    quiet_libraries()
    return open_build(Path(build_dir), threads)
