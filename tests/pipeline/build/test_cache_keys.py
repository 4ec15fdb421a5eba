"""Every setting a stage reads is in its cache key: directly, or through an upstream stage it depends on.

Each stage's run() sees the configuration through a view that records what it reads (stage.json:
`config_read`). Here, for real builds of every (target, family) of the plan, each recorded setting is
changed in turn and the stage keys recomputed: the stage's own key, or that of an upstream stage it
depends on, must change. A setting that changed an output but not a key would reuse a stale output.
"""

from __future__ import annotations

import json
import types
import typing
from pathlib import Path
from typing import Any, Optional

from pydantic import BaseModel

from pipeline.build.plan import plan_build
from pipeline.build.runner import BuildResult, run_build, stage_cache_key
from pipeline.config import BuildConfig, load_config
from pipeline.core.errors import QuantpipeError
from pipeline.core.progress import Progress


def _field(config: BaseModel, path: str) -> tuple[BaseModel, str]:
    *parents, leaf = path.split(".")
    for name in parents:
        config = getattr(config, name)
    return config, leaf


def _other_values(annotation: Any, value: Any, scratch: Path) -> list[Any]:
    """Values of the field's type that differ from `value` (validators are not run: keys only read values)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        inner = [arg for arg in args if arg is not type(None)]
        return [_sample(inner[0], scratch)] if value is None else [None]
    if origin is typing.Literal:
        return [arg for arg in args if arg != value]
    if annotation is bool:
        return [not value]
    if annotation is int:
        return [value + 1]
    if annotation is float:
        return [value * 0.97 + 0.001]
    if annotation is str:
        return [str(_sample(str, scratch))]
    if origin is list:
        return [[*value, "qp-perturbed"]]
    if origin is tuple:
        return [tuple(v + 1 for v in value)]
    raise AssertionError(f"no perturbation for {annotation}")


def _sample(annotation: Any, scratch: Path) -> Any:
    """Some value for an Optional field that is None."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return args[0]
    if origin is tuple:
        return (1, 2, 300)
    if annotation is str:  # a path-like option (source, eval file): a real, different file
        other = scratch / "other.txt"
        other.write_text("a different calibration text\nwith two lines\n", encoding="utf-8")
        return str(other)
    return {int: 3, float: 0.5}[annotation]


def perturbed(config: BuildConfig, path: str, scratch: Path) -> list[BuildConfig]:
    """The configuration with `path` changed, once per other value of its type."""
    section, leaf = _field(config, path)
    variants = []
    for value in _other_values(type(section).model_fields[leaf].annotation, getattr(section, leaf), scratch):
        copy = config.model_copy(deep=True)
        object.__setattr__(_field(copy, path)[0], leaf, value)
        variants.append(copy)
    return variants


def leaves(model: type[BaseModel], prefix: str = "") -> list[str]:
    names = []
    for name, info in model.model_fields.items():
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            names += leaves(annotation, f"{prefix}{name}.")
        else:
            names.append(f"{prefix}{name}")
    return names


def keys_of(result: BuildResult, config: BuildConfig) -> dict[str, str]:
    """Every stage's key recomputed for `config`, upstream content hashes as recorded in the build."""
    plan = plan_build(config)
    keys = {}
    for stage in plan.stages:
        if stage.name not in result.outputs:
            break
        upstream = {name: result.outputs[name].content_hash for name in stage.depends_on(plan.config)}
        keys[stage.name] = stage_cache_key(stage, plan.config, plan.model, upstream)[0]
    return keys


def check_reads_are_keyed(result: BuildResult, scratch: Path, config: Optional[BuildConfig] = None) -> list[str]:
    """config: what the build ran with (default: its manifest's; a shared build folder holds the last build's)."""
    config = plan_build(config or recorded_config(result)).config
    original = keys_of(result, config)
    plan = plan_build(config)
    upstream_of = {stage.name: set(stage.depends_on(plan.config)) for stage in plan.stages}
    holes = []
    for name, output in result.outputs.items():
        reads = json.loads((output.directory / "stage.json").read_text())["config_read"]
        assert "*" not in reads, f"{name} read the whole configuration; it must read settings"
        paths = [leaf for read in reads for leaf in leaves(BuildConfig) if leaf == read or leaf.startswith(read + ".")]
        for path in paths:
            for variant in perturbed(config, path, scratch):
                try:
                    changed = keys_of(result, variant)
                except QuantpipeError:  # a value this model or target refuses: it cannot build a stale output
                    continue
                if not any(changed.get(stage) != original[stage] for stage in {name} | upstream_of[name]):
                    holes.append(f"{name} reads {path}, which is in neither its key nor an upstream stage's")
                    break
    return holes


def recorded_config(result: BuildResult) -> BuildConfig:
    return BuildConfig.model_validate(json.loads((result.build_dir / "manifest.json").read_text())["config"])


def assert_keys_recomputed(result: BuildResult, config: Optional[BuildConfig] = None) -> None:
    """The check recomputes the runner's own keys (else it would vouch for another computation)."""
    recomputed = keys_of(result, plan_build(config or recorded_config(result)).config)
    assert recomputed == {name: output.key for name, output in result.outputs.items()}


def test_cpu_encoder_stages_key_what_they_read(default_build, tmp_path: Path) -> None:
    assert_keys_recomputed(default_build)
    assert check_reads_are_keyed(default_build, tmp_path) == []


def test_trt_encoder_stages_key_what_they_read(trt_build, tmp_path: Path) -> None:
    # trt_build's precisions share one folder, whose manifest is the last one built: give the config.
    config = load_config(None, {"target": "trt", "trt": {"precision": "int8"}})
    assert_keys_recomputed(trt_build("int8"), config)
    assert check_reads_are_keyed(trt_build("int8"), tmp_path, config) == []


def test_cpu_decoder_stages_key_what_they_read(tiny_llama_folder: Path, tiny_llama_cli_build, tmp_path: Path) -> None:
    """The session's `pipeline build --model <tiny Llama>` (CPU, defaults), re-opened: every stage reused."""
    completed, build_dir = tiny_llama_cli_build
    assert completed.returncode == 0, completed.stderr
    config = load_config(None, {"model": {"path": str(tiny_llama_folder)}, "output_dir": str(build_dir)})
    result = run_build(config, Progress(quiet=True))
    assert all(output.reused for output in result.outputs.values()), "the same configuration as the CLI's"
    assert_keys_recomputed(result)
    assert check_reads_are_keyed(result, tmp_path) == []


def test_trt_decoder_stages_key_what_they_read(tiny_llama_folder: Path, tmp_path: Path) -> None:
    overrides: dict[str, Any] = {"target": "trt", "model": {"path": str(tiny_llama_folder)},
                                 "output_dir": str(tmp_path / "build"),
                                 "calibration": {"samples": 16, "heldout_samples": 64},
                                 "verify": {"greedy_prompts": 2}, "trt": {"precision": "fp16"}}
    result = run_build(load_config(None, overrides), Progress(quiet=True))
    assert_keys_recomputed(result)
    assert check_reads_are_keyed(result, tmp_path) == []


def test_the_check_finds_a_setting_missing_from_a_key(default_build, tmp_path: Path, monkeypatch) -> None:
    """The check can fail: with the sample count dropped from the calibrate stage's key, it is reported."""
    from pipeline.stages.calibrate import CalibrateStage

    original = CalibrateStage.config_slice

    def without_samples(self, config, model):
        slice_ = original(self, config, model)
        slice_["calibration"].pop("samples")
        return slice_

    monkeypatch.setattr(CalibrateStage, "config_slice", without_samples)
    holes = check_reads_are_keyed(default_build, tmp_path)
    assert holes == ["calibrate reads calibration.samples, which is in neither its key nor an upstream stage's"]
