"""The build plan: one table decides the stages; the model's family is decided once and its defaults follow."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from pipeline.build.plan import PLAN, apply_family_defaults, plan_build
from pipeline.config import load_config
from pipeline.core.errors import ConfigError, InputError
from pipeline.models.registry import ARCHITECTURES, inspect_model
from tests.helpers import assert_one_line_error, run_cli

ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize(("overrides", "key"), [
    ({}, ("cpu", "encoder")),
    ({"target": "trt"}, ("trt", "encoder")),
    ({"model": {"task": "text-generation"}}, ("cpu", "decoder")),
    ({"quantization": {"mode": "rtn"}}, ("cpu", "decoder")),
    ({"target": "trt", "model": {"task": "text-generation"}}, ("trt", "decoder")),
])
def test_every_stage_list_comes_from_the_plan_table(overrides, key) -> None:
    pytest.importorskip("gguf")
    plan = plan_build(load_config(None, overrides))
    assert (plan.config.target, plan.model.architecture.family) == key
    expected = [factory() for factory in PLAN[key]]
    assert [type(stage) for stage in plan.stages] == [type(stage) for stage in expected]
    assert [stage.depends_on(plan.config) for stage in plan.stages] == [s.depends_on(plan.config) for s in expected]


def test_the_runner_runs_the_plan(default_build) -> None:
    plan = plan_build(load_config(None, {}))
    assert list(default_build.outputs) == plan.stage_names == ["export", "optimize", "calibrate", "quantize", "verify"]


def test_family_is_decided_only_in_the_model_registry() -> None:
    """No module outside pipeline/models/ reads a model's model_type or decides encoder vs decoder itself."""
    offenders = []
    for path in [*ROOT.joinpath("pipeline").rglob("*.py"), *ROOT.joinpath("engines").rglob("*.py")]:
        if path.parent.name == "models" and path.parent.parent.name == "pipeline":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and node.value in ("model_type", "architectures"):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
            if isinstance(node, ast.Attribute) and node.attr in ("DECODER_MODEL_TYPES", "FAMILIES"):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert offenders == []


def test_families_and_defaults_are_declared_with_the_architecture() -> None:
    assert {arch.family for arch in ARCHITECTURES.values()} == {"encoder", "decoder"}
    encoder = plan_build(load_config(None, {}))
    assert encoder.config.quantization.mode == "dynamic"
    decoder = plan_build(load_config(None, {"model": {"task": "text-generation"}}))
    assert decoder.config.quantization.mode == "rtn"
    assert decoder.model.task.name == "text-generation"


def test_quant_rtn_alone_and_print_config_agree_on_the_model() -> None:
    pytest.importorskip("gguf")
    plan = plan_build(load_config(None, {"quantization": {"mode": "rtn"}}))
    printed = run_cli("build", "--quant", "rtn", "--print-config")
    assert printed.returncode == 0, printed.stderr
    import yaml

    effective = yaml.safe_load(printed.stdout)
    assert effective["model"]["path"] == str(plan.model.path)
    assert Path(effective["model"]["path"]).suffix == ".gguf"
    assert effective["model"]["task"] == "text-generation"
    assert "stages: export -> calibrate -> quantize -> verify" in printed.stdout


def test_a_decoder_folder_is_a_decoder_and_refuses_encoder_schemes_and_tasks(tiny_llama_folder) -> None:
    model = inspect_model(str(tiny_llama_folder), None)
    assert model.is_decoder and model.task.name == "text-generation"
    with pytest.raises(ConfigError, match="--quant dynamic does not fit .* a decoder"):
        apply_family_defaults(load_config(None, {"quantization": {"mode": "dynamic"}}), model)
    with pytest.raises(InputError, match="--task feature-extraction does not fit 'llama', a decoder"):
        inspect_model(str(tiny_llama_folder), "feature-extraction")
    result = run_cli("build", "--model", str(tiny_llama_folder), "--quant", "static")
    assert_one_line_error(result, 2, "--quant static does not fit", "decoder")


def test_an_encoder_refuses_weight_only_schemes() -> None:
    model = inspect_model(None, None)
    with pytest.raises(ConfigError, match="--quant rtn does not fit all-MiniLM-L6-v2, an encoder"):
        apply_family_defaults(load_config(None, {"model": {"path": str(model.path)}, "quantization": {"mode": "rtn"}}),
                              model)


def test_a_tiny_llama_folder_builds_with_rtn_and_no_other_flag(tiny_llama_cli_build) -> None:
    """`pipeline build --model <Llama folder>`: the decoder default (4-bit RTN) and the LLM stages, parity passed."""
    result, out = tiny_llama_cli_build
    assert result.returncode == 0, result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["quantization"]["mode"] == "rtn"
    assert [entry["stage"] for entry in manifest["stages"]] == ["export", "calibrate", "quantize", "verify"]
    assert manifest["status"] == "passed"
    assert manifest["model"]["family"] == "decoder"
    report = json.loads((out / "parity.json").read_text())
    assert report["status"] == "pass" and not report["failures"]


def test_an_engine_error_is_reported_as_the_failing_stage(tmp_path: Path) -> None:
    """Engines do not know which stage called them: the runner names it (exit code 3, stage failed)."""
    from pipeline.build.runner import run_build
    from pipeline.core.errors import EngineError, ExitCode, StageError
    from pipeline.core.progress import Progress
    from pipeline.stages.base import Stage

    class Failing(Stage):
        name = "quantize"

        def run(self, context, out):
            raise EngineError("the quantized graph lost the producers of axes")

    with pytest.raises(StageError, match="stage 'quantize' failed: the quantized graph lost the producers of axes") as err:
        run_build(load_config(None, {"output_dir": str(tmp_path / "b")}), Progress(quiet=True), stages=[Failing()])
    assert err.value.exit_code == ExitCode.STAGE_FAILED


def test_llm_graph_auto_takes_the_fused_graph_only_where_it_is_declared_and_installed(monkeypatch) -> None:
    import dataclasses
    import importlib.util

    from pipeline.stages import llm_quantize

    model = inspect_model(None, "text-generation")  # the bundled SmolLM2 GGUF: llama
    assert ARCHITECTURES["llama"].genai_builder and not ARCHITECTURES["mistral"].genai_builder

    def chosen(model=model, **quantization) -> str:
        return llm_quantize.chosen_graph(load_config(None, {"quantization": quantization}), model)

    assert chosen(mode="rtn") == "genai"
    assert chosen(mode="gptq") == "export"  # GPTQ/AWQ read calibration feeds laid out for the export
    assert chosen(mode="rtn", llm_graph="export") == "export"
    assert chosen(mode="gptq", llm_graph="genai") == "genai"  # asked: taken as it is
    assert chosen(dataclasses.replace(model, architecture=ARCHITECTURES["mistral"]), mode="rtn") == "export"
    assert chosen(dataclasses.replace(model, origin={"adapter": "lora"}), mode="rtn") == "export"
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "onnxruntime_genai" else real_find_spec(name, *args))
    assert chosen(mode="rtn") == "export"
