"""The TensorRT target for decoder LLMs on the real SmolLM2-135M (no GPU: the KV-cache graph carrying its precision,
parity simulated in ONNX Runtime on the CPU, the bundle with prefill and decode profiles, no engine).

The builds start from the session's export (tests/conftest.py); few held-out chunks and greedy prompts keep
them fast (the default build decodes 20 prompts).
"""

from __future__ import annotations

import json
import shlex

import numpy as np
import onnx
import pytest

from pipeline.build.plan import plan_build
from pipeline.config import load_config
from tests.helpers import assert_one_line_error, run_cli, seed_stage_cache, tensor_types

pytest.importorskip("gguf")

LAYERS, KV_HEADS, HEAD_DIM = 30, 3, 64
MATMULS = LAYERS * 9 + 1  # q, k, v, o, gate, up, down, two attention MatMuls per layer; the lm_head
GREEDY_PROMPTS = 2
CALIBRATION = {"samples": 16, "heldout_samples": 24}  # 4 calibration and 5 held-out chunks of 128 tokens
PERPLEXITY_GATE = 0.08  # the CPU LLM path's default gate
# The real SmolLM2 TensorRT builds (about 4 minutes on an AVX2 EPYC) run with `make test-slow` (CI runs it too);
# the default suite builds every decoder family's tiny model for TensorRT instead (test_decoder_families.py).
SMOLLM2_TRT = pytest.mark.slow


@pytest.fixture(scope="module")
def trt_llm_build(llm_base_stages, tmp_path_factory: pytest.TempPathFactory):
    """`trt_llm_build(precision)`: the real `--task text-generation --target trt` build, once per precision.

    fp16 runs every stage; int8 stops after precision with one fallback step (its simulated decode is slow
    in ONNX Runtime, and its parity is measured in the README): Q/DQ placement and the ranking are tested.
    """
    from pipeline.build.runner import run_build
    from pipeline.core.progress import Progress

    results = {}

    def build(precision: str):
        if precision not in results:
            build_dir = tmp_path_factory.mktemp(f"trt-llm-{precision}")
            seed_stage_cache(build_dir, llm_base_stages, ("export",))
            trt = {"precision": precision} if precision == "fp16" else {"precision": precision, "max_fallback_nodes": 1}
            config = load_config(None, {
                "target": "trt", "output_dir": str(build_dir), "model": {"task": "text-generation"},
                "calibration": CALIBRATION, "trt": trt, "verify": {"greedy_prompts": GREEDY_PROMPTS},
            })
            stop = None if precision == "fp16" else "precision"
            results[precision] = run_build(config, Progress(quiet=True), stop_after=stop)
        return results[precision]

    return build


def test_trt_target_takes_decoder_llms() -> None:
    """The refusal is gone: a decoder LLM gets the TensorRT stages, with the KV-cache export and LLM parity."""
    stages = plan_build(load_config(None, {"target": "trt", "model": {"task": "text-generation"}})).stages
    assert [stage.name for stage in stages] == ["export", "calibrate", "precision", "verify", "bundle"]
    assert [type(stage).__name__ for stage in stages] == [
        "LlmExportStage", "LlmCalibrateStage", "PrecisionStage", "LlmVerifyStage", "BundleStage"]


@SMOLLM2_TRT
def test_fp16_graph_keeps_norm_statistics_and_softmax_in_fp32(trt_llm_build) -> None:
    model = onnx.load(str(trt_llm_build("fp16").outputs["precision"].path("model.onnx")))
    types = tensor_types(model)
    sensitive = [node for node in model.graph.node if node.op_type in ("Pow", "ReduceMean", "Softmax")]
    assert len([n for n in sensitive if n.op_type == "Softmax"]) == LAYERS
    assert len([n for n in sensitive if n.op_type == "Pow"]) == 2 * LAYERS + 1  # RMSNorms (2 per layer, final)
    for node in sensitive:  # (ReduceMean's axes input is INT64)
        floats = {types[name] for name in [*node.input, *node.output] if name} - {onnx.TensorProto.INT64}
        assert floats == {onnx.TensorProto.FLOAT}, node.name
    matmuls = [node for node in model.graph.node if node.op_type == "MatMul"]
    assert len(matmuls) == MATMULS
    assert all(types[node.output[0]] == onnx.TensorProto.FLOAT16 for node in matmuls)
    # A drop-in replacement: the KV cache and the logits keep their FP32 types.
    assert {types[v.name] for v in [*model.graph.input, *model.graph.output] if v.name != "input_ids"
            and v.name not in ("attention_mask", "position_ids")} == {onnx.TensorProto.FLOAT}


@SMOLLM2_TRT
def test_int8_qdq_sits_on_matmul_inputs_only(trt_llm_build) -> None:
    result = trt_llm_build("int8")
    model = onnx.load(str(result.outputs["precision"].path("model.onnx")))
    summary = json.loads(result.outputs["precision"].path("precision.json").read_text())
    initializers = {t.name: t for t in model.graph.initializer}
    producers = {out: node for node in model.graph.node for out in node.output}
    kept = set(summary["kept_higher_precision"])
    assert summary["quantizable_nodes"] == MATMULS and summary["quantized_nodes"] == MATMULS - len(kept)
    assert len(kept) <= 12
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            for name in node.input[1:]:  # symmetric: zero points 0
                if initializers[name].data_type == onnx.TensorProto.INT8:
                    assert not onnx.numpy_helper.to_array(initializers[name]).any()
        if node.op_type != "MatMul":
            continue
        sources = [producers.get(name) for name in node.input]
        if node.name in kept:
            assert all(s is None or s.op_type != "DequantizeLinear" for s in sources), node.name
            continue
        assert all(s is not None and s.op_type == "DequantizeLinear" for s in sources), node.name
        for source in sources:
            quantized = source.input[0]
            if quantized in initializers:  # a weight: INT8, one scale per output channel (last axis)
                weight = initializers[quantized]
                assert weight.data_type == onnx.TensorProto.INT8
                assert list(initializers[source.input[1]].dims) == [weight.dims[-1]]
            else:  # an activation: Q -> DQ with one per-tensor scale
                assert producers[quantized].op_type == "QuantizeLinear"
                assert list(initializers[source.input[1]].dims) == []
    readers = {name for node in model.graph.node if node.op_type == "DequantizeLinear" for name in node.output}
    for node in model.graph.node:
        if readers & set(node.input):
            assert node.op_type == "MatMul", node.name
    assert {node.domain for node in model.graph.node} <= {"", "ai.onnx"}


@SMOLLM2_TRT
def test_simulated_fp16_parity_meets_the_llm_gates(trt_llm_build) -> None:
    result = trt_llm_build("fp16")
    report = json.loads(result.outputs["verify"].path("parity.json").read_text())
    logits = report["outputs"]["logits"]
    assert report["status"] == "pass", report["failures"]
    assert report["reference"]["sha256"] == result.outputs["export"].files["model.onnx"]
    assert report["candidate"]["sha256"] == result.outputs["precision"].files["model.onnx"]
    assert report["candidate"]["description"] == "TensorRT FP16 ONNX, simulated in ONNX Runtime (CPU)"
    gate = next(c for c in report["checks"] if c["metric"] == "perplexity_increase")
    assert gate["threshold"] == PERPLEXITY_GATE and gate["passed"]
    assert logits["perplexity_candidate"] != logits["perplexity_reference"], "a different graph, not the reference"
    # Measured +0.01%: the norm statistics stay FP32. The same on every x86 host: the simulation runs FP16 MatMuls
    # as FP32 kernels on FP16-rounded values, no ISA-dependent arithmetic (test_trt_fp16.py::*_every_x86_host).
    assert abs(logits["perplexity_increase"]) < 0.01
    assert logits["cosine_mean"] > 0.999 and logits["greedy_token_agreement"] >= 0.95
    assert logits["greedy_prompts"] == GREEDY_PROMPTS and logits["greedy_new_tokens"] == 32
    assert logits["rows"] == 4 * 128  # logits statistics over every token of the first held-out chunks
    assert 0.45 < report["size"]["ratio"] < 0.55
    from pipeline.parity.report import ParityReport

    assert ParityReport.model_validate(report).family == "decoder" and report["target"] == "trt"


@SMOLLM2_TRT
def test_int8_fallback_ranks_the_outlier_matmuls_first(trt_llm_build) -> None:
    """271 MatMuls are too many to probe one by one: nodes are ranked by their own quantization error, which puts
    the down_proj MatMuls fed by SmolLM2's massive activations (|x| ~ 3000 against a p99.9 of ~1.4) first."""
    summary = json.loads(trt_llm_build("int8").outputs["precision"].path("precision.json").read_text())
    assert summary["sensitivity_ranked_by"] == "local quantization error"
    ranked = [name for name, _ in summary["sensitivity_top"]]
    assert all("/mlp/down_proj/" in name for name in ranked[:5]), ranked[:5]
    assert {"/model/model/layers.11/mlp/down_proj/MatMul", "/model/model/layers.28/mlp/down_proj/MatMul"} <= set(ranked[:3])
    assert summary["kept_higher_precision"] == ranked[:1]
    assert 0.0 < summary["calibration_perplexity_ratio"] < 1.0 and summary["target_perplexity_ratio"] == round(1 / 1.07, 6)


@SMOLLM2_TRT
def test_bundle_profiles_cover_batch_sequence_and_past_axes(trt_llm_build) -> None:
    from engines.ort_session import create_session
    from tests.engines.trt_api_checker import load_api

    result = trt_llm_build("fp16")
    bundle = result.outputs["bundle"].directory
    config = json.loads((bundle / "build_config.json").read_text())
    assert [p["name"] for p in config["profiles"]] == ["prefill", "decode"] and "profile" not in config
    session = create_session(bundle / "model.onnx")
    graph_inputs = {item.name: item.shape for item in session.get_inputs()}
    del session
    assert len(graph_inputs) == 3 + 2 * LAYERS
    context = config["profile_ranges"]["context"]
    for profile in config["profiles"]:
        assert set(profile["shapes"]) == set(graph_inputs), profile["name"]
        dims = {name: {kind: [int(d) for d in text.split("x")] for kind, text in shapes.items()}
                for name, shapes in profile["shapes"].items()}
        for name, by_kind in dims.items():
            assert all(len(shape) == len(graph_inputs[name]) for shape in by_kind.values()), name
            for axis in range(len(graph_inputs[name])):
                assert by_kind["min"][axis] <= by_kind["opt"][axis] <= by_kind["max"][axis], (name, axis)
        for kind in ("min", "opt", "max"):
            batch, sequence = dims["input_ids"][kind]
            past = dims["past_key_values.0.key"][kind]
            assert past[0] == batch and past[1] == KV_HEADS and past[3] == HEAD_DIM
            assert dims["attention_mask"][kind] == [batch, past[2] + sequence]  # past + new tokens
            assert dims["position_ids"][kind] == [batch, sequence]
            assert all(dims[f"past_key_values.{i}.value"][kind] == past for i in range(LAYERS))
        if profile["name"] == "prefill":
            assert {dims["past_key_values.0.key"][k][2] for k in ("min", "max")} == {0}
            assert dims["input_ids"]["min"][1] == 1 and dims["input_ids"]["max"][1] == context
        else:
            assert {dims["input_ids"][k][1] for k in ("min", "opt", "max")} == {1}
            assert dims["past_key_values.0.key"]["min"][2] == 1
            assert dims["past_key_values.0.key"]["max"][2] == context - 1
    command = (bundle / "trtexec.sh").read_text().strip().splitlines()[-1]
    words = shlex.split(command.split("&&", 1)[1])
    flags = [w.split("=")[0] for w in words[1:]]
    assert words.count("--profile=0") == 1 and words.count("--profile=1") == 1
    assert flags.count("--minShapes") == 2 and set(flags) <= set(load_api()["trtexec_options"])
    assert not {"--int8", "--fp16", "--best", "--fp8"} & set(flags)
    assert not (bundle / "model.plan").exists() and result.outputs["bundle"].metrics["engine"].startswith("not built")


@SMOLLM2_TRT
def test_published_build_holds_the_bundle(trt_llm_build) -> None:
    result = trt_llm_build("fp16")
    manifest = json.loads((result.build_dir / "manifest.json").read_text())
    assert manifest["status"] == "passed"
    assert [stage["stage"] for stage in manifest["stages"]] == ["export", "calibrate", "precision", "verify", "bundle"]
    assert (result.build_dir / "trt" / "build_config.json").is_file()
    assert (result.build_dir / "model.fp32.onnx").stat().st_size == result.outputs["export"].path("model.onnx").stat().st_size
    # `pipeline verify` re-checks CPU encoder builds only: it says so in one line instead of failing half-way
    assert_one_line_error(run_cli("verify", str(result.build_dir)), 2, "is a TensorRT build")


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_engine_build_and_polygraphy_parity_on_a_gpu_host(trt_llm_build) -> None:
    """With TensorRT 11 and a GPU the bundle stage builds the two-profile engine and gates its prefill logits."""
    bundle = trt_llm_build("fp16").outputs["bundle"]
    assert bundle.metrics["engine"] == "built"
    from pipeline.parity.report import ParityReport

    report = ParityReport.model_validate_json((bundle.directory / "engine_parity.json").read_text())
    assert report.status == "pass" and report.family == "decoder" and np.isfinite(report.outputs["logits"].cosine_mean)
    assert [check.metric for check in report.checks] == ["perplexity_increase"]


def test_explicit_profile_and_gate_shape_the_decoder_profiles() -> None:
    from pipeline.models.kv_cache import CacheLayout
    from pipeline.stages.llm_trt import decoder_profiles, fallback_target

    config = load_config(None, {"target": "trt", "model": {"task": "text-generation"},
                                "trt": {"batch": [1, 2, 4], "sequence": [4, 64, 256]},
                                "verify": {"max_perplexity_increase": 0.05}})
    profiles = decoder_profiles(config, CacheLayout(layers=2, kv_heads=3, head_dim=64), [10, 20, 30])
    prefill, decode = (p["shapes"] for p in profiles["profiles"])
    assert prefill["input_ids"] == {"min": "1x4", "opt": "2x64", "max": "4x256"}
    assert prefill["past_key_values.1.value"] == {"min": "1x3x0x64", "opt": "2x3x0x64", "max": "4x3x0x64"}
    assert decode["attention_mask"] == {"min": "1x2", "opt": "2x129", "max": "4x256"}
    assert decode["past_key_values.0.key"]["max"] == "4x3x255x64" and profiles["derived_from_prompts"] is False
    assert fallback_target(config) == round(1 / 1.04, 6)
