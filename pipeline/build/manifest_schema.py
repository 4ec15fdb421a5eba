"""The schema of manifest.json: what a build directory read back may hold, and nothing else.

A build directory may come from elsewhere (a CI artifact, a download), so its manifest is untrusted
input: every section is a pydantic model that refuses unknown keys (`extra="forbid"`) and values
outside their closed sets, and a manifest that does not validate is one InputError (exit 2).

One model class per section. To add a section (say `host`), declare a `HostSection(_Section)` here
and a field `host: Optional[HostSection] = None` on `Manifest`; to add a key to a section, declare it
on that section's class. A key written by `publish_build` but not declared here is refused on read.
"""

from __future__ import annotations

import re
from pathlib import PurePosixPath
from typing import Annotated, Any, Literal, Optional

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from pipeline.config import BuildConfig, StageName, Task
from pipeline.core.errors import InputError

MANIFEST_SCHEMA_VERSION = 2  # 2: stage entries carry the sha256 of their stage.json (record_sha256)

Sha256 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
StageDirectory = Annotated[str, StringConstraints(pattern=r"^[a-z]+-[0-9a-f]{16}$")]


def _relative_path(value: str) -> str:
    """A path inside the build directory: relative, no `..`, no backslash or NUL (trailing `/`: a folder)."""
    parts = PurePosixPath(value.rstrip("/")).parts
    if (not value or value.startswith("/") or "\\" in value or "\x00" in value or not parts
            or any(part in ("..", ".") for part in parts)):
        raise ValueError(f"{value!r} is not a relative path inside the build directory")
    return value


RelativePath = Annotated[str, AfterValidator(_relative_path)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class OriginSection(_Section):
    """What a model folder Quantpipe made was made from (pipeline/models/adapters.py, bitsandbytes.py)."""

    kind: Literal["lora", "qlora", "bitsandbytes", "onnx-qdq"]
    base: str
    graph: Optional[str] = Field(None, description="onnx-qdq: the Q/DQ ONNX graph given as the model (a QAT export)")
    graph_sha256: Optional[Sha256] = None
    quantize_linear: Optional[int] = Field(None, ge=0)
    dequantize_linear: Optional[int] = Field(None, ge=0)
    quantized_weights: Optional[int] = Field(None, ge=0)
    scale_tensors: Optional[int] = Field(None, ge=0, description="onnx-qdq: the graph's scales, kept as they are")
    adapter: Optional[str] = None
    adapter_sha256: Optional[Sha256] = None
    quantization: Optional[Literal["8bit", "4bit-nf4", "4bit-fp4"]] = None
    blocks: Optional[int] = Field(None, ge=0, description="4-bit blocks of the bitsandbytes checkpoint")
    affine_blocks: Optional[int] = Field(None, ge=0, description="of them, blocks on an affine 16-level grid")
    block_size: Optional[int] = Field(None, ge=0)
    exact: str = Field(description="what is exact and what is re-rounded")


class ModelSection(_Section):
    name: str
    path: str
    task: Task
    family: Literal["encoder", "decoder"]
    origin: Optional[OriginSection] = None


class RuntimeSection(_Section):
    """The ONNX Runtime settings the CPU artifacts were measured with (and `pipeline serve` uses)."""

    engine: Literal["onnxruntime"]
    onnxruntime_version: str
    execution_provider: Literal["CPUExecutionProvider"]
    graph_optimization_level: Literal["ORT_ENABLE_ALL"]
    disabled_optimizers: list[str]
    # issue 16: TensorRT builds record the settings of their CPU simulation (session.disable_quant_qdq, ...)
    session_config_entries: dict[str, str] = Field(default_factory=dict)


class HostSection(_Section):
    """The build host (issue 16, pipeline/core/host.py): CPU model, ISA class and flags, library versions."""

    cpu_model: str
    machine: str
    isa: Literal["avx2", "avx512-vnni", "amx", "arm64"]
    isa_flags: list[str]
    python: str
    libraries: dict[str, str]


class StageEntry(_Section):
    stage: StageName
    key: Sha256
    reused: bool
    directory: StageDirectory
    record_sha256: Sha256 = Field(description="sha256 of the stage's stage.json (its record, verdicts included)")
    config: dict[str, Any]
    inputs: dict[str, str]
    outputs: dict[RelativePath, Sha256]
    wall_time_s: float = Field(ge=0)
    metrics: dict[str, Any]
    facts: dict[str, Any]
    facts_version: int


class Manifest(_Section):
    schema_version: Literal[MANIFEST_SCHEMA_VERSION]  # type: ignore[valid-type]
    quantpipe_version: str
    created: str
    status: Literal["passed", "parity_failed", "incomplete"]
    wall_time_s: float = Field(ge=0)
    model: ModelSection
    config: BuildConfig
    stages: list[StageEntry]
    artifacts: dict[RelativePath, Sha256]
    runtime: Optional[RuntimeSection] = None
    host: Optional[HostSection] = None

    def stage(self, name: str) -> Optional[StageEntry]:
        return next((entry for entry in self.stages if entry.stage == name), None)


_PRINTABLE = re.compile(r"[^\x20-\x7e]")


def validate_manifest(data: Any, origin: str) -> Manifest:
    """The manifest as its model, or one InputError naming the first problem (exit 2)."""
    if not isinstance(data, dict):
        raise InputError(f"{origin} is not a Quantpipe manifest (a JSON object)")
    version = data.get("schema_version")
    if version != MANIFEST_SCHEMA_VERSION:
        raise InputError(f"{origin} has manifest schema {_PRINTABLE.sub('?', repr(version))[:40]}; this quantpipe "
                         f"reads {MANIFEST_SCHEMA_VERSION}: run `pipeline build` again to re-create it")
    try:
        # The config section is a BuildConfig: its own schema (lax for its enums' JSON values).
        return Manifest.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "<root>"
        problem = "unknown key" if first["type"] == "extra_forbidden" else first["msg"]
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise InputError(_PRINTABLE.sub("?", f"{origin} is not a valid manifest: {where}: {problem}{more}")[:400]) from None
