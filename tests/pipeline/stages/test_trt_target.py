"""The TensorRT target end to end on the real default model (no GPU: simulated parity, bundle, no engine)."""

from __future__ import annotations

import ast
import json
import math
import shlex

import onnx
import pytest

from engines.trt.builder import tensorrt_missing_reason
from pipeline.build.plan import plan_build
from pipeline.config import load_config
from pipeline.core.errors import ConfigError, ExitCode
from tests.helpers import assert_one_line_error, run_cli
from tests.independent import discrepancies, recompute, sha256

GATES = {"int8": 0.99, "fp8": 0.98, "fp16": 0.999}


@pytest.mark.parametrize("precision", ["int8", "fp8", "fp16"])
def test_simulated_parity_meets_the_precision_gate(trt_build, precision: str) -> None:
    result = trt_build(precision)
    report = json.loads(result.outputs["verify"].path("parity.json").read_text())
    assert report["status"] == "pass"
    # Recomputed without the pipeline: plain ONNX Runtime sessions (Q/DQ as exact fake quantization) of the
    # exported FP32 graph and the TensorRT graph on the held-out batches, metrics in numpy.
    recomputed = recompute(result.outputs["export"].path("model.onnx"), result.outputs["precision"].path("model.onnx"),
                           result.outputs["calibrate"].path("heldout.safetensors"), list(report["outputs"]),
                           simulate_tensorrt=True)
    # Not the p99 of relative error: float summation order flips a few Q/DQ roundings between two sessions,
    # which moves that quantile of near-zero references (measured 7.402 reported, 7.446 recomputed, int8).
    for metrics in recomputed.values():
        metrics.pop("p99_rel")
    assert discrepancies(report, recomputed) == []
    assert report["candidate"]["sha256"] == sha256(result.outputs["precision"].path("model.onnx"))
    embedding = recomputed["sentence_embedding"]
    assert embedding["rows"] >= 200
    assert embedding["cosine_mean"] >= GATES[precision]
    assert embedding["max_abs"] > 0, "the candidate is a different graph, not the reference itself"
    gate = next(c for c in report["checks"] if c["metric"] == "cosine_mean")
    assert gate["threshold"] == GATES[precision]
    assert report["reference"]["description"] == "FP32 ONNX (exported)"
    assert report["reference"]["sha256"] == result.outputs["export"].files["model.onnx"]
    assert report["target"] == "trt" and report["family"] == "encoder" and report["schema_version"] == 3


def test_trt_graph_has_only_standard_onnx_ops(trt_build) -> None:
    """TensorRT's parser knows no ONNX Runtime contrib ops: the trt path skips the optimize stage."""
    result = trt_build("int8")
    assert "optimize" not in result.outputs and "quantize" not in result.outputs
    model = onnx.load(str(result.outputs["precision"].path("model.onnx")))
    assert {node.domain for node in model.graph.node} <= {"", "ai.onnx"}


def test_int8_keeps_only_the_measured_sensitive_matmuls(trt_build) -> None:
    summary = json.loads(trt_build("int8").outputs["precision"].path("precision.json").read_text())
    kept = summary["kept_higher_precision"]
    assert 0 < len(kept) <= 12 and summary["quantizable_nodes"] == 48
    ranked = [name for name, _ in summary["sensitivity_top"]]
    assert kept == ranked[: len(kept)], "kept in ranked order, worst first"
    assert summary["calibration_cosine"] >= summary["target_cosine"]
    assert len(summary["activation_amax"]) == 48


def test_bundle_contents(trt_build) -> None:
    result = trt_build("int8")
    bundle = result.outputs["bundle"].directory
    for name in ("model.onnx", "build_config.json", "trtexec.sh", "build_engine.py", "parity.json", "parity.md",
                 "precision.json"):
        assert (bundle / name).is_file(), name
    assert (bundle / "model.onnx").read_bytes() == result.outputs["precision"].path("model.onnx").read_bytes()
    command = (bundle / "trtexec.sh").read_text().strip().splitlines()[-1]
    words = shlex.split(command.split("&&", 1)[1])
    assert words[0] == "trtexec" and "--onnx=model.onnx" in words
    assert not {"--int8", "--fp16", "--best", "--fp8"} & {w.split("=")[0] for w in words}
    ast.parse((bundle / "build_engine.py").read_text())
    config = json.loads((bundle / "build_config.json").read_text())
    assert config["precision"] == "int8" and config["workspace_bytes"] == 4096 * 1024 * 1024
    assert config["builder_optimization_level"] == 3 and config["timing_cache"] == "timing.cache"
    assert set(config["profile"]) == {"input_ids", "attention_mask", "token_type_ids"}
    assert not (bundle / "model.plan").exists(), "no engine without TensorRT"
    assert result.outputs["bundle"].metrics["engine"].startswith("not built")


def test_profile_is_derived_from_calibration_lengths(trt_build) -> None:
    result = trt_build("int8")
    lengths = result.outputs["calibrate"].metrics["calibration_tokens"]
    config = json.loads(result.outputs["bundle"].path("build_config.json").read_text())
    ranges = config["profile_ranges"]
    assert ranges["derived_from_calibration"] is True
    assert ranges["sequence"] == [lengths["min"], math.ceil(lengths["p50"] / 8) * 8, 128]
    assert ranges["batch"] == [1, 8, 32]
    assert config["profile"]["input_ids"] == {
        "min": f"1x{lengths['min']}", "opt": f"8x{math.ceil(lengths['p50'] / 8) * 8}", "max": "32x128"}


def test_published_build_and_manifest(trt_build) -> None:
    build_dir = trt_build("fp16").build_dir  # the last build into the shared directory published its bundle
    manifest = json.loads((build_dir / "manifest.json").read_text())
    result = trt_build(manifest["config"]["trt"]["precision"])
    assert manifest["status"] == "passed"
    assert [stage["stage"] for stage in manifest["stages"]] == ["export", "calibrate", "precision", "verify", "bundle"]
    assert "trt/" in manifest["artifacts"]
    assert (build_dir / "trt" / "build_config.json").is_file() and not (build_dir / "trt" / "stage.json").exists()
    assert (build_dir / "model.onnx").read_bytes() == result.outputs["precision"].path("model.onnx").read_bytes()


def test_cli_says_plainly_that_no_engine_was_built(trt_build) -> None:
    result = trt_build("fp16")
    cli = run_cli("build", "--target", "trt", "--precision", "fp16", "-o", str(result.build_dir))
    assert cli.returncode == 0, cli.stderr
    assert "reused 5/5 stages" in cli.stdout
    assert "TensorRT engine not built" in cli.stdout and "bundle is ready" in cli.stdout


@pytest.mark.skipif(tensorrt_missing_reason() is None, reason="TensorRT is installed on this host")
def test_require_engine_without_tensorrt_is_one_line_exit_5(tmp_path) -> None:
    result = run_cli("build", "--target", "trt", "--require-engine", "-o", str(tmp_path / "b"))
    assert_one_line_error(result, ExitCode.MISSING_DEPENDENCY, "--require-engine", "TensorRT")
    assert not (tmp_path / "b" / ".stages").exists() or not any((tmp_path / "b" / ".stages").iterdir()), \
        "refused before any stage ran"


def test_stage_list_per_target() -> None:
    cpu = plan_build(load_config(None, {})).stage_names
    trt = plan_build(load_config(None, {"target": "trt"})).stage_names
    assert cpu == ["export", "optimize", "calibrate", "quantize", "verify"]
    assert trt == ["export", "calibrate", "precision", "verify", "bundle"]


@pytest.mark.parametrize("overrides, message", [
    ({"target": "trt", "trt": {"batch": [8, 1, 32]}}, "trt.batch must be min <= opt <= max"),
    ({"target": "trt", "trt": {"sequence": [8, 64, 64]}}, "below calibration.max_length"),
    ({"target": "cpu", "trt": {"require_engine": True}}, "--target trt only"),
    ({"target": "trt", "trt": {"precision": "int4"}}, "'trt.precision'"),
    ({"target": "trt", "trt": {"builder_optimization_level": 6}}, "'trt.builder_optimization_level'"),
])
def test_invalid_trt_configuration_is_refused(overrides, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_explicit_profile_is_used(tmp_path) -> None:
    from pipeline.models.registry import inspect_model
    from pipeline.stages.bundle import optimization_profile

    config = load_config(None, {"target": "trt", "trt": {"batch": [2, 4, 16], "sequence": [16, 64, 256]}})
    profile = optimization_profile(config, inspect_model(None, None), {"min": 5, "p50": 30.0, "p90": 60.0, "max": 128})
    assert profile["shapes"]["input_ids"] == {"min": "2x16", "opt": "4x64", "max": "16x256"}
    assert profile["derived_from_calibration"] is False


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_engine_build_and_polygraphy_parity_on_a_gpu_host(trt_build) -> None:
    """On a host with TensorRT 11 and a GPU the bundle stage builds the engine and checks it with TrtRunner."""
    bundle = trt_build("int8").outputs["bundle"]
    assert bundle.metrics["engine"] == "built"
    assert (bundle.directory / "model.plan").stat().st_size > 0
    assert (bundle.directory / "timing.cache").stat().st_size > 0
    from pipeline.parity.report import ParityReport

    report = ParityReport.model_validate_json((bundle.directory / "engine_parity.json").read_text())
    assert report.status == "pass" and report.target == "trt" and report.family == "encoder"
    assert report.candidate.description == "TensorRT engine (Polygraphy TrtRunner)"


@pytest.mark.skipif(tensorrt_missing_reason() is None, reason="TensorRT is installed on this host")
def test_bundle_build_script_runs_standalone_and_says_tensorrt_is_missing(trt_build) -> None:
    import subprocess
    import sys

    bundle = trt_build("int8").outputs["bundle"].directory
    result = subprocess.run([sys.executable, "-I", str(bundle / "build_engine.py")], capture_output=True, text=True,
                            cwd=bundle, timeout=60)
    assert_one_line_error(result, ExitCode.MISSING_DEPENDENCY, "TensorRT", "NVIDIA GPU")
    assert not (bundle / "model.plan").exists()


@pytest.mark.slow
def test_best_mixes_int8_and_fp16_by_measured_parity(trt_build) -> None:
    result = trt_build("best")
    summary = result.outputs["precision"].metrics
    assert summary["kept_precision"] == "FP16" and summary["kept_higher_precision"]
    report = json.loads(result.outputs["verify"].path("parity.json").read_text())
    assert report["status"] == "pass" and report["outputs"]["sentence_embedding"]["cosine_mean"] >= 0.99
    model = onnx.load(str(result.outputs["precision"].path("model.onnx")))
    initializers = {t.name: t.data_type for t in model.graph.initializer}
    kept = [node for node in model.graph.node if node.name in summary["kept_higher_precision"]]
    assert len(kept) == len(summary["kept_higher_precision"])
    for node in kept:  # FP16 weights straight into the MatMul, no Q/DQ
        assert initializers[node.input[1]] == onnx.TensorProto.FLOAT16, node.name
    dequantize = [node for node in model.graph.node if node.op_type == "DequantizeLinear"]
    assert dequantize and all(initializers[node.input[1]] == onnx.TensorProto.FLOAT16 for node in dequantize), \
        "FP16 scales: the dequantized tensors feed FP16 MatMuls"


def test_stop_after_a_stage_the_target_lacks_is_refused(tmp_path) -> None:
    result = run_cli("build", "--target", "trt", "--stop-after", "quantize", "-o", str(tmp_path / "b"))
    assert_one_line_error(result, ExitCode.BAD_INPUT, "--stop-after quantize", "precision")
