"""MATRIX.yaml: build-file fragments combined by a product (and zip) syntax into named jobs.

    base:                      # merged into every build (optional)
      calibration: {samples: 32}
    product:                   # every combination of these axes, in this order
      model:
        bert: {model: {path: ./bert}}
        llama: {model: {path: ./llama, task: text-generation}}
      target:
        cpu: {target: cpu}
        trt: {target: trt}
    zip:                       # value i of every zip axis together: one more axis of the product
      recipe:   {fast: {calibration: {samples: 16}}, full: {calibration: {samples: 256}}}
      strength: {low: {verify: {min_cosine: 0.95}}, high: {verify: {min_cosine: 0.99}}}
    exclude:                   # combinations left out, by label
      - {model: llama, target: trt}
    num_cpus: 1                # CPUs a job declares to Ray
    retries: 2                 # re-runs of a job whose worker died (never of a job that failed)

A job is named by its labels joined with '-' (bert-cpu-fast-low) and builds into OUTPUT/<name>.
Fragments are merged in axis order after `base`, later keys winning; relative paths are relative
to the matrix file's folder. Every job's configuration is validated before any job starts.
"""

from __future__ import annotations

import copy
import itertools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipeline.config import BuildConfig, _format_validation_error, _merge, _resolve_relative_paths, read_build_file
from pipeline.core.errors import ConfigError

LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.]*$")  # no '-': it joins labels into job names
Axis = dict[str, dict[str, Any]]  # label -> build-file fragment


class MatrixFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    base: dict[str, Any] = Field(default_factory=dict, description="Build-file fragment merged into every job.")
    product: dict[str, Axis] = Field(default_factory=dict, description="Axes combined in every combination.")
    zip: dict[str, Axis] = Field(default_factory=dict, description="Axes of equal length taken value by value.")
    exclude: list[dict[str, str]] = Field(default_factory=list, description="Label combinations to leave out.")
    num_cpus: float = Field(1.0, gt=0, description="CPUs each job declares to Ray.")
    retries: int = Field(2, ge=0, le=10, description="Re-runs of a job whose worker died.")

    @model_validator(mode="after")
    def _axes_are_sound(self) -> "MatrixFile":
        axes = {**self.product, **self.zip}
        if set(self.product) & set(self.zip):
            raise ValueError(f"axis names in both product and zip: {sorted(set(self.product) & set(self.zip))}")
        if not axes:
            raise ValueError("no axes: give `product` (and/or `zip`) with at least one axis")
        for axis, values in axes.items():
            if not values:
                raise ValueError(f"axis '{axis}' has no values")
            for label in values:
                if not LABEL.match(label):
                    raise ValueError(f"axis '{axis}': label {label!r} must be letters, digits, '_' or '.' "
                                     "(it names the job's folder)")
        if len({len(values) for values in self.zip.values()}) > 1:
            lengths = {axis: len(values) for axis, values in self.zip.items()}
            raise ValueError(f"zip axes must have the same number of values: {lengths}")
        for rule in self.exclude:
            for axis, label in rule.items():
                if axis not in axes or label not in axes[axis]:
                    raise ValueError(f"exclude {rule}: no axis '{axis}' with a value '{label}'")
        return self


@dataclass(frozen=True)
class Job:
    name: str
    labels: dict[str, str]
    config: dict[str, Any]  # the job's build file, validated (output_dir set)


@dataclass(frozen=True)
class Matrix:
    path: Path
    jobs: list[Job]
    num_cpus: float
    retries: int


def _fragment(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{where} must be a mapping of build-file keys")
    if "output_dir" in value:
        raise ConfigError(f"{where} sets output_dir: the matrix places every build in OUTPUT/<job name>")
    return value


def combinations(spec: MatrixFile) -> list[dict[str, str]]:
    """Axis -> label for every job, in a stable order: the product's axes in file order, then the zip."""
    names = list(spec.product)
    choices: list[list[tuple[str, ...]]] = [[(label,) for label in spec.product[axis]] for axis in names]
    if spec.zip:
        zipped = list(spec.zip)
        names += zipped
        choices.append(list(zip(*(list(spec.zip[axis]) for axis in zipped))))
    jobs = []
    for combination in itertools.product(*choices):
        labels = dict(zip(names, itertools.chain.from_iterable(combination)))
        if not any(all(labels[axis] == label for axis, label in rule.items()) for rule in spec.exclude):
            jobs.append(labels)
    return jobs


def load_matrix(path: Path, output: Path) -> Matrix:
    """Read and validate MATRIX.yaml: every job's build configuration is checked here, before any runs."""
    data = read_build_file(path)  # YAML or TOML, one-line errors
    try:
        spec = MatrixFile.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, f"matrix {path}")) from None
    axes = {**spec.product, **spec.zip}
    jobs = []
    for labels in combinations(spec):
        name = "-".join(labels.values())
        merged = _fragment(spec.base, "base")
        for axis, label in labels.items():
            merged = _merge(merged, _fragment(axes[axis][label], f"{axis}.{label}"))
        merged = copy.deepcopy(merged)  # path resolution below must not touch the spec
        _resolve_relative_paths(merged, path.parent.resolve())
        merged["output_dir"] = str((output / name).resolve())
        try:
            BuildConfig.model_validate(merged)
        except ValidationError as exc:
            raise ConfigError(_format_validation_error(exc, f"matrix {path}, job {name}")) from None
        jobs.append(Job(name, labels, merged))  # as written: defaults the plan resolves stay unset
    if not jobs:
        raise ConfigError(f"matrix {path}: every combination is excluded; nothing to build")
    return Matrix(path, jobs, spec.num_cpus, spec.retries)
