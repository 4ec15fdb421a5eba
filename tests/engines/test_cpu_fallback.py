"""Accuracy-driven fallback and SmoothQuant on the real default model."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest

from calibration.batches import load_batches
from calibration.ranges import RangeCache
from engines import fallback as cpu_fallback
from engines.cpu import neural_compressor
from engines.ort_session import OrtRunner
from pipeline.build.runner import run_build
from pipeline.config import QuantizationConfig, load_config
from pipeline.core.progress import Progress
from pipeline.models.registry import TASKS
from pipeline.stages.calibrate import CACHE_FILE
from pipeline.stages.quantize import tuning_metric

FFN_OUTPUT = "/model/encoder/layer.{}/output/dense/MatMul"


@pytest.fixture(scope="module")
def static_int8(default_build, tmp_path_factory: pytest.TempPathFactory) -> Path:
    ranges = RangeCache.load(default_build.outputs["calibrate"].path(CACHE_FILE)).ranges
    path = tmp_path_factory.mktemp("static") / "static.onnx"
    neural_compressor.quantize(
        default_build.outputs["optimize"].path("model.onnx"), path, QuantizationConfig(mode="static"), ranges=ranges
    )
    return path


def _weights(path: Path) -> dict[str, bytes]:
    return {t.name: onnx.numpy_helper.to_array(t).tobytes() for t in onnx.load(str(path)).graph.initializer}


def _codes(path: Path) -> dict[str, np.ndarray]:
    """Every quantized weight's codes relative to its zero point (uint8 codes - 128), by the int8 tensor's name."""
    codes = {}
    for tensor in onnx.load(str(path)).graph.initializer:
        if tensor.name.endswith("_quantized") and tensor.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8):
            values = onnx.numpy_helper.to_array(tensor).astype(np.int16)
            codes[tensor.name] = values - 128 if tensor.data_type == onnx.TensorProto.UINT8 else values
    return codes


@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_avx2_graphs_hold_the_vnni_codes_as_uint8(default_build, mode: str, tmp_path) -> None:
    """Both --cpu-isa choices, made on any host: the AVX2 graph holds the VNNI graph's weights at the same 8-bit
    resolution as uint8 with zero point 128 (ONNX Runtime then runs its exact u8u8 kernels, see the next test):
    its scales are 127/127.5 of the int8 ones (symmetric uint8 spans 255 steps around 128) and each code is
    within one step of the int8 code + 128. The quantize record says which."""
    optimized = default_build.outputs["optimize"].path("model.onnx")
    ranges = RangeCache.load(default_build.outputs["calibrate"].path(CACHE_FILE)).ranges if mode == "static" else None
    graphs, summaries = {}, {}
    for isa in ("avx512-vnni", "avx2"):
        graphs[isa] = tmp_path / f"{isa}.onnx"
        summaries[isa] = neural_compressor.quantize(optimized, graphs[isa], QuantizationConfig(mode=mode, cpu_isa=isa, outlier_threshold=0),
                                                    ranges=ranges)
    assert summaries["avx512-vnni"]["weight_type"] == "int8" and summaries["avx2"]["weight_type"] == "uint8"
    assert summaries["avx512-vnni"]["weight_codes"] == [-127, 127] and summaries["avx2"]["weight_codes"] == [-128, 127]
    vnni, avx2 = _codes(graphs["avx512-vnni"]), _codes(graphs["avx2"])
    assert len(vnni) >= 18 and vnni.keys() == avx2.keys()
    for name in vnni:
        assert np.abs(vnni[name] - avx2[name]).max() <= 1, name
    scales = {isa: {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer
                    if t.name.endswith("_scale") and t.name.replace("_scale", "_quantized") in vnni}
              for isa, path in graphs.items()}
    assert scales["avx2"].keys() == scales["avx512-vnni"].keys() and scales["avx2"]
    for name, scale in scales["avx2"].items():
        np.testing.assert_allclose(scale, scales["avx512-vnni"][name] * 127 / 127.5, rtol=1e-6, err_msg=name)


def _matmul_integer(weight_type: int, weight: int, zero_point: int) -> int:
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["a", "b", "a_zero", "b_zero"], ["y"])], "dot",
        [helper.make_tensor_value_info("a", TensorProto.UINT8, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [1, 1])],
        [helper.make_tensor("b", weight_type, [64, 1], [weight] * 64),
         helper.make_tensor("a_zero", TensorProto.UINT8, [], [0]),
         helper.make_tensor("b_zero", weight_type, [], [zero_point])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return int(session.run(None, {"a": np.full((1, 64), 255, np.uint8)})[0][0, 0])


def test_uint8_weights_are_exact_where_int8_weights_saturate() -> None:
    """Why AVX2 graphs hold uint8 weights: a dot product of 64 activations of 255 with weights of +127. The u8u8
    kernels give the exact 2,072,640 on every host; the u8 x s8 kernels give it with VNNI (32-bit accumulation)
    and 1,048,544 on AVX2 (VPMADDUBSW saturates each pair's sum at 32,767): measured on an AVX2 EPYC."""
    exact = 255 * 127 * 64
    assert _matmul_integer(onnx.TensorProto.UINT8, 255, 128) == exact
    from pipeline.core.host import host_isa

    expected = exact if host_isa() != "avx2" else 32_767 * 32
    assert _matmul_integer(onnx.TensorProto.INT8, 127, 0) == expected


def _evaluate(default_build, batches: int = 4):
    """The product's tuning metric: candidates run on ONNX Runtime's integer kernels, which differ per ISA."""
    calibration = load_batches(default_build.outputs["calibrate"].path("calibration.safetensors"))
    fp32 = default_build.outputs["optimize"].path("model.onnx")
    return tuning_metric(TASKS["feature-extraction"], fp32, calibration[:batches])


def _evaluate_exact(default_build, batches: int = 4):
    """Mean cosine of the sentence embeddings to FP32 (numpy), the candidate's Q/DQ run as exact fake quantization
    (the QDQ fusions off, as the TensorRT simulation runs): no integer kernel of this host's ISA takes part, so
    the numbers are those of every host (measured here: within 4e-5 of the integer kernels on AVX-512 VNNI)."""
    calibration = load_batches(default_build.outputs["calibrate"].path("calibration.safetensors"))[:batches]
    output = TASKS["feature-extraction"].primary_output
    with OrtRunner(default_build.outputs["optimize"].path("model.onnx"), output_names=[output]) as reference:
        expected = [reference.infer(batch)[output] for batch in calibration]

    def evaluate(candidate_path: Path) -> float:
        with OrtRunner(candidate_path, output_names=[output], simulate_tensorrt=True) as candidate:
            actual = [candidate.infer(batch)[output] for batch in calibration]
        a, b = np.concatenate(expected), np.concatenate(actual)
        return float(np.mean(np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))))

    return evaluate


def _with_outputs(model: onnx.ModelProto, names: list[str]) -> bytes:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    del copy.graph.output[:]
    copy.graph.output.extend(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None) for name in names)
    return copy.SerializeToString()


def _step_error(init: dict[str, np.ndarray], quantize: onnx.NodeProto, values: np.ndarray) -> np.ndarray:
    """|DQ(Q(v)) - v| can be at most half a step, plus what the Q node's range clips."""
    zero_point = init[quantize.input[2]] if len(quantize.input) > 2 else np.uint8(0)
    scale, zero, info = float(init[quantize.input[1]]), float(zero_point), np.iinfo(zero_point.dtype)
    return scale / 2 + np.abs(values - np.clip(values, (info.min - zero) * scale, (info.max - zero) * scale))


def _matmul_step_bound(init: dict[str, np.ndarray], producers: dict[str, onnx.NodeProto], matmul: onnx.NodeProto,
                       x: np.ndarray) -> np.ndarray:
    """Worst-case |x'W' - xW| (x: rows x K) of a Q/DQ MatMul from its quantization parameters, whatever the
    kernel: x' = DQ(Q(x)) is off by _step_error, W' = DQ(W_q) by half its channel's step, so per output channel
    n: sum_k e_k |W'_kn| + s_w[n] / 2 * sum_k |x_k|."""
    activation_dq, weight_dq = (producers[name] for name in matmul.input)
    error = _step_error(init, producers[activation_dq.input[0]], x)
    codes, weight_scale = init[weight_dq.input[0]].astype(np.float64), init[weight_dq.input[1]].astype(np.float64)
    weight_zero = init[weight_dq.input[2]].astype(np.float64) if len(weight_dq.input) > 2 else 0.0
    weight = (codes - weight_zero) * weight_scale
    return error @ np.abs(weight) + np.abs(x) @ np.broadcast_to(weight_scale / 2, weight.shape)


def test_transplanting_one_quantized_node_costs_only_that_node(default_build, static_int8, tmp_path) -> None:
    import onnxruntime

    fp32_path = default_build.outputs["optimize"].path("model.onnx")
    fp32, int8 = onnx.load(str(fp32_path)), onnx.load(str(static_int8))
    boundary = {out for node in fp32.graph.node for out in node.output} | {i.name for i in fp32.graph.input}
    mixed = cpu_fallback.transplant(fp32, int8, FFN_OUTPUT.format(0), boundary)
    onnx.save(mixed, str(tmp_path / "mixed.onnx"))
    ops = Counter(node.op_type for node in mixed.graph.node)
    assert ops["DequantizeLinear"] >= 2 and ops["QuantizeLinear"] >= 1, "Q/DQ on the activation and the weight"
    assert ops["MatMul"] == Counter(n.op_type for n in fp32.graph.node)["MatMul"], "the node itself is kept"
    # The node's input is FP32's; its MatMul and its output's Q/DQ are off by no more than their steps allow.
    node = next(n for n in fp32.graph.node if n.name == FFN_OUTPUT.format(0))
    init = {t.name: onnx.numpy_helper.to_array(t) for t in mixed.graph.initializer}
    producers = {out: n for n in mixed.graph.node for out in n.output}
    output_quantize = producers[producers[node.output[0]].input[0]]
    matmul = producers[output_quantize.input[0]]
    assert (matmul.op_type, output_quantize.op_type) == ("MatMul", "QuantizeLinear")
    batch = load_batches(default_build.outputs["calibrate"].path("calibration.safetensors"))[0]
    feed = {i.name: batch[i.name] for i in fp32.graph.input}
    exact = onnxruntime.SessionOptions()
    exact.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL  # Q/DQ as float ops
    x, y = onnxruntime.InferenceSession(_with_outputs(fp32, [node.input[0], node.output[0]]), exact,
                                        providers=["CPUExecutionProvider"]).run(None, feed)
    x_mixed, y_matmul, y_mixed = onnxruntime.InferenceSession(
        _with_outputs(mixed, [node.input[0], matmul.output[0], node.output[0]]), exact,
        providers=["CPUExecutionProvider"]).run(None, feed)
    np.testing.assert_array_equal(x_mixed, x)
    rows = x.reshape(-1, x.shape[-1]).astype(np.float64)
    bound = _matmul_step_bound(init, producers, matmul, rows)
    error = np.abs(y_matmul - y).reshape(bound.shape)
    assert 0 < error.max() and np.all(error <= bound * (1 + 1e-4) + 1e-5), float((error - bound).max())
    assert np.all(np.abs(y_mixed - y_matmul) <= _step_error(init, output_quantize, y_matmul) * (1 + 1e-4) + 1e-6)
    # Through the rest of the model, with the Q/DQ exact (the same on every host): one node costs less than all.
    evaluate = _evaluate_exact(default_build)
    assert evaluate(fp32_path) == pytest.approx(1.0, abs=1e-6)
    assert 0.9 < evaluate(tmp_path / "mixed.onnx") < 0.9999  # measured 0.9814
    assert evaluate(static_int8) < evaluate(tmp_path / "mixed.onnx"), "one node costs less than all of them"
    # The product's metric, on this host's integer kernels: the same order (their values depend on the ISA).
    host = _evaluate(default_build)
    assert host(static_int8) < host(tmp_path / "mixed.onnx") < host(fp32_path) == pytest.approx(1.0, abs=1e-6)


def test_sensitivity_ranking_finds_the_post_gelu_matmuls(default_build, static_int8, tmp_path) -> None:
    """The ranking's own metric with exact Q/DQ (_evaluate_exact): the order every host's search starts from."""
    ranking = cpu_fallback.rank_sensitivity(
        default_build.outputs["optimize"].path("model.onnx"), static_int8, _evaluate_exact(default_build, 2), tmp_path
    )
    assert len(ranking) >= 18
    top = [name for name, _ in ranking[:4]]
    # FACTS.md: the FFN-output MatMuls read post-GELU activations with outliers.
    assert sum(name in {FFN_OUTPUT.format(i) for i in range(6)} for name in top) >= 3, ranking[:6]
    assert ranking[0][1] > 10 * ranking[-1][1]


def _build_copy(default_build, build_dir: Path, quantization: dict[str, object], samples: int):
    """A build of the default model in a copy of the default build's folder (its stage cache reused)."""
    import shutil

    shutil.copytree(default_build.build_dir, build_dir)
    config = load_config(None, {"output_dir": str(build_dir), "quantization": quantization,
                                "calibration": {"samples": samples}, "verify": {"min_cosine": 0.9}})
    return run_build(config, Progress(quiet=True))


@pytest.mark.slow  # a static build with the whole search on the real model (~1 min on an AVX2 EPYC)
def test_fallback_build_records_its_choice(default_build, tmp_path) -> None:
    build_dir = tmp_path / "build"
    # 32 calibration samples: the search tunes on half of them (16) and ranks every quantizable node with them
    result = _build_copy(default_build, build_dir, {"mode": "static", "fallback": "auto", "max_fallback_nodes": 2,
                                                    "tolerable_loss": 0.001}, samples=32)
    fallback = result.outputs["quantize"].metrics["fallback"]
    assert len(fallback["excluded_nodes"]) == 2 and not fallback["met"]
    metrics = [trial["metric"] for trial in fallback["trials"]]
    assert metrics[0] < metrics[1] < metrics[2], "each node kept in FP32 helps"
    model = onnx.load(str(result.outputs["quantize"].path("model.onnx")))
    kept = {node.name for node in model.graph.node if node.op_type == "MatMul"}
    assert set(fallback["excluded_nodes"]) <= kept
    report = json.loads((build_dir / "parity.json").read_text())
    assert report["candidate"]["fp32_nodes"] == fallback["excluded_nodes"]
    assert "2 node(s) kept in FP32 by the fallback search" in report["candidate"]["description"]
    manifest = json.loads((build_dir / "manifest.json").read_text())
    stage = next(s for s in manifest["stages"] if s["stage"] == "quantize")
    assert stage["metrics"]["fallback"]["excluded_nodes"] == fallback["excluded_nodes"]


@pytest.mark.slow  # a dynamic build with the whole search on the real model (~1 min on an AVX2 EPYC)
def test_dynamic_fallback_moves_outlier_channels_once(default_build, tmp_path, monkeypatch) -> None:
    """The default dynamic build with --fallback auto: the outlier channels are moved once, before the search (each
    move runs the FP32 graph over the calibration samples), not once per quantizer run of the search."""
    from engines.cpu import outlier_channels

    moves = []
    real_migrated = outlier_channels.migrated

    def counted(*args, **kwargs):
        moves.append(args[0])
        return real_migrated(*args, **kwargs)

    monkeypatch.setattr(outlier_channels, "migrated", counted)
    # target 1.0: the search ranks every node and tries one
    result = _build_copy(default_build, tmp_path / "build", {"mode": "dynamic", "fallback": "auto",
                                                             "max_fallback_nodes": 1, "tolerable_loss": 0.0}, samples=16)
    metrics = result.outputs["quantize"].metrics
    assert len(moves) == 1, moves
    assert metrics["outlier_channels"]["muls"] > 0 and len(metrics["fallback"]["trials"]) == 2
    assert len(metrics["fallback"]["ranking"]) >= 18


def test_smoothquant_works_on_our_bert_export(default_build, tmp_path) -> None:
    fp32 = default_build.outputs["optimize"].path("model.onnx")
    calibration = load_batches(default_build.outputs["calibrate"].path("calibration.safetensors"))[:4]
    assert len({batch["input_ids"].shape[1] for batch in calibration}) > 1, "uneven lengths: the library bug"
    weights = {}
    for alpha in (0.5, 0.9):
        settings = QuantizationConfig(mode="static", smoothquant=True, smoothquant_alpha=alpha)
        path = tmp_path / f"sq{alpha}.onnx"
        summary = neural_compressor.quantize(fp32, path, settings, calibration=calibration)
        assert summary["smoothquant_alpha"] == alpha
        model = onnx.load(str(path))
        assert any(node.name.endswith("_smooth_mul") for node in model.graph.node)
        weights[alpha] = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer if "smooth" in i.name}
    shared = sorted(set(weights[0.5]) & set(weights[0.9]))
    assert shared and any(not np.allclose(weights[0.5][n], weights[0.9][n]) for n in shared), "alpha is honoured"
    heldout = load_batches(default_build.outputs["calibrate"].path("heldout.safetensors"))[:4]
    # Q/DQ exact (simulate_tensorrt: no integer kernel of this host's ISA), so the bound holds on every host.
    with OrtRunner(fp32) as reference, OrtRunner(tmp_path / "sq0.5.onnx", simulate_tensorrt=True) as candidate:
        for batch in heldout:
            a, b = reference.infer(batch)["sentence_embedding"], candidate.infer(batch)["sentence_embedding"]
            assert np.mean(np.sum(a * b, axis=1)) > 0.85


def test_greedy_search_breaks_ties_by_name_and_stops_at_target() -> None:
    from engines.fallback import greedy_search

    gains = {"a": 0.02, "b": 0.01, "c": 0.02}  # a real score per kept set: the sum of the kept nodes' gains
    outcome = greedy_search([("c", 0.5), ("b", 0.1), ("a", 0.5)],
                            lambda chosen: 0.96 + sum(gains[n] for n in chosen), 0.995, 3, 0.96)
    assert outcome.chosen == ["a", "c"] and outcome.met  # a before c: equal scores, then by name
    assert [t.excluded for t in outcome.trials] == [[], ["a"], ["a", "c"]]
    missed = greedy_search([("b", 0.1)], lambda chosen: 0.97, 0.995, 5, 0.96)
    assert missed.chosen == ["b"] and not missed.met
    assert greedy_search([("a", 1.0)], lambda chosen: 0.0, 0.9, 3, 0.95).chosen == []  # met before any trial
