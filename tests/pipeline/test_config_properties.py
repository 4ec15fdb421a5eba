"""Property-based tests of the configuration schema: whatever a build file or the Python API hands
it, the result is a valid BuildConfig or a one-line ConfigError, never another exception."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.config import BuildConfig, CalibrationConfig, ModelConfig, QuantizationConfig, VerifyConfig, load_config
from pipeline.core.errors import ConfigError

SECTIONS = {"model": ModelConfig, "calibration": CalibrationConfig, "quantization": QuantizationConfig,
            "verify": VerifyConfig}
SCALARS = (st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
           | st.sampled_from(["cpu", "trt", "static", "dynamic", "label", "auto", "jsonl", "../x", "~/m", "", "a\x00b"]))
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                                              max_size=3), max_leaves=8)


def _section(model: type) -> st.SearchStrategy[dict[Any, Any]]:
    keys = st.sampled_from(sorted(model.model_fields)) | st.text(max_size=8)
    return st.dictionaries(keys, VALUES, max_size=6)


CONFIGS = st.fixed_dictionaries({}, optional={
    "target": VALUES,
    "output_dir": VALUES,
    **{name: _section(model) | VALUES for name, model in SECTIONS.items()},
}) | st.dictionaries(st.text(max_size=8) | st.integers(), VALUES, max_size=4)


def _valid_or_config_error(load: Any) -> None:
    try:
        config = load()
    except ConfigError as exc:
        assert exc.message and "\n" not in exc.message, exc.message
        return
    assert isinstance(config, BuildConfig)
    document = config.to_dict()
    json.dumps(document, allow_nan=False)  # the manifest records it as strict JSON
    assert BuildConfig.model_validate(document) == config


@given(CONFIGS)
@settings(max_examples=400, deadline=None)
def test_any_mapping_is_a_config_or_a_config_error(data: dict[Any, Any]) -> None:
    _valid_or_config_error(lambda: load_config(None, data))


@given(st.binary(max_size=400) | st.text(max_size=400).map(str.encode), st.sampled_from([".yaml", ".toml", ".yml"]))
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_any_build_file_is_a_config_or_a_config_error(content: bytes, suffix: str) -> None:
    with tempfile.TemporaryDirectory() as folder:
        build_file = Path(folder) / f"build{suffix}"
        build_file.write_bytes(content)
        _valid_or_config_error(lambda: load_config(build_file, {}))


@given(CONFIGS)
@settings(max_examples=150, deadline=None)
def test_any_mapping_written_as_yaml_is_a_config_or_a_config_error(data: dict[Any, Any]) -> None:
    import yaml

    with tempfile.TemporaryDirectory() as folder:
        build_file = Path(folder) / "build.yaml"
        build_file.write_text(yaml.safe_dump(data), encoding="utf-8")
        _valid_or_config_error(lambda: load_config(build_file, {}))


def test_relative_paths_resolve_against_the_build_file_through_dotdot_and_symlinks(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "link").symlink_to(tmp_path / "data")
    build_file = tmp_path / "configs" / "build.yaml"
    build_file.write_text("calibration:\n  source: ../data/x.txt\nverify:\n  eval_file: link/eval.tsv\n")
    config = load_config(build_file, {})
    assert config.calibration.source == str((tmp_path / "data" / "x.txt").resolve())
    assert config.verify.eval_file == str((tmp_path / "data" / "eval.tsv").resolve()), "symlinks resolved"


def test_nul_byte_in_a_path_is_a_config_error(tmp_path: Path) -> None:
    build_file = tmp_path / "build.yaml"
    build_file.write_text('model:\n  path: "a\\0b"\n')
    try:
        load_config(build_file, {})
    except ConfigError as exc:
        assert "model.path" in exc.message
    else:
        raise AssertionError("a NUL byte in a path was accepted")
