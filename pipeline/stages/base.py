"""A stage is a small checked pass: requires() -> run() -> ensures().

Stages hand each other files, never in-memory graphs. A stage declares which
upstream stages it reads, the slice of the configuration that affects its
output, and fingerprints of anything outside the build it reads (a model
folder, a data file); the runner keys its output by all three.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Optional, TypeVar

from pipeline.config import BuildConfig
from pipeline.core import signing
from pipeline.core.durable import write_bytes_durable
from pipeline.core.errors import StageError
from pipeline.core.hashing import canonical_json
from pipeline.core.progress import Progress
from pipeline.models.registry import ModelInfo
from pipeline.stages.facts import FACTS_VERSION, Facts, NoFacts

STAGE_RECORD = "stage.json"
F = TypeVar("F", bound=Facts)


@dataclass
class StageOutput:
    """A finished stage's directory and what it recorded."""

    stage: str
    key: str
    directory: Path
    files: dict[str, str]  # relative path -> sha256
    metrics: dict[str, Any]
    wall_time_s: float
    reused: bool = False
    facts: dict[str, Any] = field(default_factory=dict)  # the stage's declared facts (see facts.py)

    def path(self, name: str) -> Path:
        return self.directory / name

    @property
    def content_hash(self) -> str:
        from pipeline.core.hashing import combined_hash

        return combined_hash(self.files)

    @classmethod
    def read(cls, directory: Path, signed: bool = True) -> "StageOutput":
        """A stage record; signed=True (the runner's reuse): only one this user's Quantpipe signed
        (pipeline.core.signing). `pipeline verify` reads unsigned ones and checks them against the manifest."""
        record = json.loads((directory / STAGE_RECORD).read_text(encoding="utf-8"))
        if not isinstance(record, dict):
            raise ValueError("the stage record is not a JSON object")
        if signed and not signing.verify(_signed_payload(record), record.get("signature")):
            raise ValueError("the stage record was not signed by this user's Quantpipe (edited, or built elsewhere)")
        if record.get("facts_version") != FACTS_VERSION:
            raise ValueError(f"facts version {record.get('facts_version')!r}, not {FACTS_VERSION}")
        return cls(
            stage=record["stage"],
            key=record["key"],
            directory=directory,
            files=record["files"],
            metrics=record["metrics"],
            wall_time_s=record["wall_time_s"],
            facts=record["facts"],
        )

    def write_record(self, config: Any, inputs: dict[str, str], config_read: Optional[list[str]] = None) -> None:
        record = {
            "stage": self.stage,
            "key": self.key,
            "config": config,
            "config_read": config_read or [],  # the settings run() read (see config_reads.py)
            "inputs": inputs,
            "files": self.files,
            "metrics": self.metrics,
            "facts": self.facts,
            "facts_version": FACTS_VERSION,
            "wall_time_s": self.wall_time_s,
        }
        signature = signing.sign(_signed_payload(record))
        if signature is not None:
            record["signature"] = signature
        data = json.dumps(record, indent=2, sort_keys=True).encode("utf-8")
        write_bytes_durable(self.directory / STAGE_RECORD, data)


def _signed_payload(record: dict[str, Any]) -> bytes:
    return canonical_json({key: value for key, value in record.items() if key != "signature"}).encode("utf-8")


@dataclass
class StageContext:
    config: BuildConfig
    model: ModelInfo
    progress: Progress
    inputs: dict[str, StageOutput] = field(default_factory=dict)

    def input(self, stage: str) -> StageOutput:
        return self.inputs[stage]

    def facts(self, stage: str, kind: type[F]) -> F:
        """The typed facts an upstream stage recorded (what other stages may read of it)."""
        return kind.model_validate(self.inputs[stage].facts)


class Stage(ABC):
    name: ClassVar[str]
    # Bump when a code change alters the stage's output, so old cache entries are not reused.
    version: ClassVar[int] = 1
    outputs: ClassVar[tuple[str, ...]] = ()
    # What later stages may read of this one (a typed subset of run()'s metrics, checked when it finishes).
    facts: ClassVar[type[Facts]] = NoFacts

    def depends_on(self, config: BuildConfig) -> tuple[str, ...]:
        return ()

    def config_slice(self, config: BuildConfig, model: ModelInfo) -> dict[str, Any]:
        return {}

    def external_inputs(self, config: BuildConfig, model: ModelInfo) -> dict[str, str]:
        """Fingerprints of files outside the build directory that the stage reads."""
        return {}

    def requires(self, context: StageContext) -> None:
        for stage in self.depends_on(context.config):
            if stage not in context.inputs:
                raise StageError(self.name, f"needs the output of stage '{stage}'")

    @abstractmethod
    def run(self, context: StageContext, out: Path) -> dict[str, Any]:
        """Write the outputs into `out` and return the key metrics."""

    def record_facts(self, metrics: dict[str, Any]) -> dict[str, Any]:
        from pydantic import ValidationError

        try:
            return self.facts.model_validate(metrics).model_dump(mode="json")
        except ValidationError as exc:
            problem = exc.errors()[0]
            where = ".".join(str(part) for part in problem["loc"])
            raise StageError(self.name, f"did not record its {self.facts.__name__} ({where}: {problem['msg']})") from None

    def ensures(self, out: Path) -> None:
        missing = [name for name in self.outputs if not (out / name).exists()]
        if missing:
            raise StageError(self.name, f"did not write {', '.join(missing)}")
        check_graphs(self.name, out, self.outputs)


def check_graphs(stage: str, out: Path, outputs: tuple[str, ...]) -> None:
    """Every ONNX graph a stage writes passes the ONNX checker and loads in ONNX Runtime before it is cached:
    an invalid graph fails the stage that made it, not a later one."""
    from engines.onnx_io import check_graph
    from pipeline.core.errors import EngineError

    for name in outputs:
        if name.endswith(".onnx") and (out / name).is_file():
            try:
                check_graph(out / name)
            except EngineError as exc:
                raise StageError(stage, exc.message) from None
