"""Every TensorRT call the code makes exists in the TensorRT 11 Python API (recorded in engines/trt/tensorrt_api_11.json).

The record was extracted from NVIDIA/TensorRT's pybind11 bindings and headers at the 11.1 release
commit and cross-checked against the names in the tensorrt-cu12-bindings 11.4 binary
(engines/trt/extract_api.py); see its "provenance".
"""

from __future__ import annotations

import ast
import inspect
import shlex
from pathlib import Path

import pytest

from engines.trt import builder as trt_engine
from pipeline.stages.bundle import trtexec_command
from tests.engines.trt_api_checker import check_source, load_api

ROOT = Path(__file__).resolve().parents[2]
ENGINE_SOURCE = Path(trt_engine.__file__).read_text(encoding="utf-8")
# What engines/trt/builder.py must do to build a TensorRT 11 engine (the list), as API names.
REQUIRED_CALLS = {
    "Builder", "Builder.create_network", "OnnxParser", "OnnxParser.parse_from_file",
    "Builder.create_builder_config", "IBuilderConfig.set_memory_pool_limit", "MemoryPoolType.WORKSPACE",
    "Builder.create_optimization_profile", "IOptimizationProfile.set_shape", "IBuilderConfig.add_optimization_profile",
    "IBuilderConfig.create_timing_cache", "IBuilderConfig.set_timing_cache", "IBuilderConfig.get_timing_cache",
    "ITimingCache.serialize", "IBuilderConfig.builder_optimization_level", "Builder.build_serialized_network",
}


def test_api_record_names_its_source_and_was_checked_against_a_binary() -> None:
    api = load_api()
    provenance = api["provenance"]
    assert provenance["version"].startswith("11.") and len(provenance["commit"]) == 40
    assert provenance["binary_check"]["package"].startswith("tensorrt-cu12-bindings 11.")
    assert provenance["binary_check"]["names_not_found_in_binary"] == []
    assert provenance["binary_check"]["removed_classes_found_in_binary"] == []
    assert "STRONGLY_TYPED" in api["enums"]["NetworkDefinitionCreationFlag"]["values"]
    assert "EXPLICIT_BATCH" not in api["enums"]["NetworkDefinitionCreationFlag"]["values"]
    assert not {"INT8", "FP16", "FP8", "BF16"} & set(api["enums"]["BuilderFlag"]["values"])
    assert "IInt8Calibrator" not in api["classes"] and "IInt8EntropyCalibrator2" not in api["classes"]


def test_every_tensorrt_call_of_the_engine_module_exists_in_tensorrt_11() -> None:
    report = check_source(ENGINE_SOURCE)
    assert report.errors == []
    missing = REQUIRED_CALLS - set(report.checked)
    assert not missing, f"the engine build no longer makes (or the checker no longer follows) {missing}"


def test_engine_module_uses_no_removed_api() -> None:
    api = load_api()
    tree = ast.parse(ENGINE_SOURCE)
    attributes = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
    removed_members = {name.split(".")[-1] for name in api["removed"]}
    assert not attributes & removed_members
    create_network = [node for node in ast.walk(tree) if isinstance(node, ast.Call)
                      and isinstance(node.func, ast.Attribute) and node.func.attr == "create_network"]
    assert [ast.literal_eval(call.args[0]) for call in create_network] == [0], "strongly typed: create_network(0)"


@pytest.mark.parametrize("snippet, problem", [
    ("config.set_flag(trt.BuilderFlag.INT8)", "BuilderFlag.INT8"),
    ("config.set_flag(trt.BuilderFlag.FP16)", "BuilderFlag.FP16"),
    ("builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH))", "EXPLICIT_BATCH"),
    ("config.int8_calibrator = None", "int8_calibrator"),
    ("calibrator = trt.IInt8EntropyCalibrator2()", "IInt8EntropyCalibrator2"),
    ("engine = builder.build_engine(network, config)", "build_engine"),
    ("config.max_workspace_size = 1 << 30", "max_workspace_size"),
    ("config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE)", "set_memory_pool_limit"),
    ("profile = builder.create_optimization_profile(); profile.set_shape('x', (1,), (1,))", "set_shape"),
    ("parser.parse_from_file(path, strict=True)", "parse_from_file"),
])
def test_checker_rejects_removed_or_misused_api(snippet: str, problem: str) -> None:
    """The contract test can fail: TensorRT 10-era code and wrong signatures are caught."""
    source = (
        "def build(path):\n    import tensorrt as trt\n    logger = trt.Logger(trt.Logger.WARNING)\n"
        "    builder = trt.Builder(logger)\n    network = builder.create_network(0)\n"
        "    parser = trt.OnnxParser(network, logger)\n    config = builder.create_builder_config()\n"
        + "".join(f"    {line.strip()}\n" for line in snippet.split(";"))
    )
    report = check_source(source)
    assert any(problem in error for error in report.errors), report.errors


def test_tensorrt_is_imported_only_lazily_in_the_engine_module() -> None:
    offenders = []
    for path in [*ROOT.glob("pipeline/**/*.py"), *ROOT.glob("engines/**/*.py"), *ROOT.glob("calibration/**/*.py")]:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) else []
            if any(name and name.split(".")[0] == "tensorrt" for name in names):
                offenders.append((str(path.relative_to(ROOT)), node in tree.body))
    assert offenders and all(path == "engines/trt/builder.py" and not top for path, top in offenders), offenders


def test_trtexec_flags_exist_in_trtexec_11_and_set_no_precision() -> None:
    config = {"onnx": "model.onnx", "engine": "model.plan", "timing_cache": "timing.cache",
              "workspace_bytes": 1 << 30, "builder_optimization_level": 3,
              "profile": {"input_ids": {"min": "1x8", "opt": "8x32", "max": "32x128"}}}
    command = trtexec_command(config)
    flags = {part.split("=")[0] for part in command[1:]}
    assert flags <= set(load_api()["trtexec_options"])
    assert not flags & {"--int8", "--fp16", "--best", "--fp8"}
    assert shlex.split(shlex.join(command)) == command


def test_polygraphy_calls_fit_the_installed_polygraphy() -> None:
    """engines/trt/parity.py against Polygraphy 0.53's real signatures (Polygraphy installs here)."""
    from polygraphy.backend.common import BytesFromPath
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner

    inspect.signature(BytesFromPath).bind("model.plan")
    inspect.signature(EngineFromBytes).bind(BytesFromPath("model.plan"))
    inspect.signature(TrtRunner).bind(EngineFromBytes(BytesFromPath("model.plan")))
    inspect.signature(TrtRunner.infer).bind(None, feed_dict={})
    source = (ROOT / "engines" / "trt" / "parity.py").read_text(encoding="utf-8")
    assert "TrtRunner(EngineFromBytes(BytesFromPath(" in source and "runner.infer(feed_dict=" in source


def test_build_script_is_standalone() -> None:
    """The bundle's build_engine.py is this module: it must import nothing from Quantpipe."""
    tree = ast.parse(ENGINE_SOURCE)
    modules = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    modules |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert modules <= {"__future__", "argparse", "json", "sys", "time", "pathlib", "typing", "tensorrt"}


@pytest.mark.tensorrt
def test_installed_tensorrt_matches_the_recorded_api() -> None:
    import tensorrt as trt

    api = load_api()
    assert trt.__version__.startswith("11.")
    for name in REQUIRED_CALLS:
        owner, _, member = name.partition(".")
        target = getattr(trt, owner)
        if member:
            assert hasattr(target, member) or member in api["enums"].get(owner, {}).get("values", []), name
