"""A Q/DQ-carrying ONNX model (a QAT export) as the model: its learned scales are kept on both targets.

The graphs are made in code (tests/tiny_qat.py): the tiny BERT, ONNX Runtime's QDQ quantize_static, every
scale then scaled by 1.10-1.30 so that no re-calibration could produce it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from engines.cpu.qdq_integer import integer_graph
from engines.ort_session import OrtRunner
from engines.qdq_graph import INTEGER_OPS, QDQ_OPS, scale_differences, strip_qdq
from engines.trt.qdq import placement
from pipeline.core.errors import EngineError
from tests.helpers import assert_one_line_error, run_cli
from tests.tiny_encoders import write_folder
from tests.tiny_qat import SCALE_FACTORS, scale_initializers, write_qat_folder

CHEAP = {"calibration": {"samples": 16, "heldout_samples": 32, "max_length": 64}}


@pytest.fixture(scope="module")
def qat(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("qat")
    encoder = write_folder(root / "bert", "bert", "feature-extraction")
    return {"encoder": encoder, "cpu": write_qat_folder(root / "qat_cpu", encoder),
            "trt": write_qat_folder(root / "qat_trt", encoder, symmetric=True)}


def _build(model: Path, out: Path, *flags: str):
    config = out.parent / f"{out.name}.yaml"
    config.write_text(json.dumps(CHEAP))
    return run_cli("build", "--config", str(config), "--model", str(model), "-o", str(out), *flags)


def _stage(build_dir: Path, name: str) -> dict:
    manifest = json.loads((build_dir / "manifest.json").read_text())
    return next(stage for stage in manifest["stages"] if stage["stage"] == name)


def test_the_scales_are_learned_not_calibrated(qat) -> None:
    """The test's premise: the input's scales are not what ONNX Runtime's calibration of this model gives."""
    given = scale_initializers(qat["cpu"] / "model.onnx")
    calibrated = scale_initializers(qat["cpu"].parent / "qat_cpu.calibrated.onnx")
    scales = [name for name, value in given.items() if value.dtype == np.float32]
    assert scales and set(given) == set(calibrated)
    ratios = np.concatenate([(given[name] / calibrated[name]).ravel() for name in scales])
    assert ratios.min() >= SCALE_FACTORS[0] - 1e-6 and ratios.max() <= SCALE_FACTORS[1] + 1e-6


def test_cpu_build_fuses_the_graphs_own_scales_into_integer_kernels(qat, tmp_path: Path) -> None:
    result = _build(qat["cpu"], tmp_path / "build")
    assert result.returncode == 0, result.stderr[-2000:]
    build = tmp_path / "build"
    manifest = json.loads((build / "manifest.json").read_text())
    assert manifest["status"] == "passed" and manifest["model"]["origin"]["kind"] == "onnx-qdq"
    assert [stage["stage"] for stage in manifest["stages"]] == ["export", "calibrate", "quantize", "verify"]
    quantize = _stage(build, "quantize")["metrics"]
    assert quantize["integer_nodes"] == {"QLinearMatMul": 16} and quantize["float_nodes"] == []
    assert "from the input graph" in quantize["scales"]
    # Independently of the stage's own check: every scale and zero point the integer kernels read is the input's.
    given = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(qat["cpu"] / "model.onnx")).graph.initializer}
    built = onnx.load(str(build / "model.onnx"))
    values = {t.name: numpy_helper.to_array(t) for t in built.graph.initializer}
    read = [node.input[i] for node in built.graph.node if node.op_type == "QLinearMatMul" for i in (1, 2, 4, 5, 6, 7)]
    assert len(set(read)) == quantize["scales_checked"]
    for name in read:
        assert values[name].dtype == given[name].dtype and values[name].tobytes() == given[name].tobytes(), name
    assert not any(node.op_type == "MatMul" for node in built.graph.node), "every MatMul is an integer kernel"
    # No calibration: the calibrate stage wrote the held-out set only, and no stage read a range cache.
    assert "calibration.cache" not in _stage(build, "calibrate")["outputs"]
    assert _stage(build, "quantize")["inputs"].keys() == {"stage:export"}
    # Parity: against the QAT graph's own fake-quantized forward (tight), and the float graph under it (looser).
    verify = _stage(build, "verify")["metrics"]
    parity = json.loads((build / "parity.json").read_text())
    assert "fake-quantized forward" in parity["reference"]["description"]
    assert {(g["output"], g["metric"]): g["threshold"] for g in parity["thresholds"]} == {
        ("sentence_embedding", "cosine_mean"): 0.999}
    assert verify["primary"]["cosine_mean"] > 0.9999  # measured 0.99999995: integer requantization flips a few LSBs
    assert 0 < verify["primary"]["max_abs"]  # the integer graph is not the fake-quantized one run again
    loose = verify["float_reference"]
    assert loose["gates"] == {"sentence_embedding.cosine_mean": 0.99} and loose["failures"] == []
    assert 0.99 < loose["primary"]["cosine_mean"] < verify["primary"]["cosine_mean"]  # measured 0.9984
    # model.fp32.onnx is the float graph under the Q/DQ, not the Q/DQ graph
    fp32 = onnx.load(str(build / "model.fp32.onnx"))
    assert not any(node.op_type in QDQ_OPS for node in fp32.graph.node)
    # `pipeline verify BUILD_DIR` re-checks CPU encoder builds from their optimize stage: refused, saying why
    assert_one_line_error(run_cli("verify", str(build)), 2, "is a Q/DQ ONNX (QAT) build")


def test_tensorrt_build_passes_the_qdq_through_bit_for_bit(qat, tmp_path: Path) -> None:
    result = _build(qat["trt"], tmp_path / "build", "--target", "trt")
    assert result.returncode == 0, result.stderr[-2000:]
    build = tmp_path / "build"
    assert (build / "model.onnx").read_bytes() == (qat["trt"] / "model.onnx").read_bytes()
    assert (build / "trt" / "model.onnx").read_bytes() == (qat["trt"] / "model.onnx").read_bytes()
    given, passed = scale_initializers(qat["trt"] / "model.onnx"), scale_initializers(build / "model.onnx")
    assert given.keys() == passed.keys() and all(given[k].tobytes() == passed[k].tobytes() for k in given)
    manifest = json.loads((build / "manifest.json").read_text())
    assert [stage["stage"] for stage in manifest["stages"]] == ["export", "calibrate", "precision", "verify", "bundle"]
    precision = _stage(build, "precision")["metrics"]
    assert precision["scales_checked"] == len(given)
    # The placement rules ran: quantize_static quantizes the MatMul outputs too, which TensorRT runs in float
    # (DQ -> Add); every MatMul reads all its inputs through a DQ.
    assert precision["float_after_dequantize"] and precision["partly_quantized"] == []
    assert precision["kept_higher_precision"] == []
    bundled = json.loads((build / "trt" / "build_config.json").read_text())
    assert bundled["precision"] == "the input's Q/DQ (passed through)"  # not --precision's default (int8)
    verify = _stage(build, "verify")["metrics"]
    assert verify["pass_through_identical"] and verify["primary"]["cosine_mean"] > 0.99
    report = json.loads((build / "parity.json").read_text())
    assert "Q/DQ stripped" in report["reference"]["description"]  # not the graph against itself


def test_a_changed_scale_is_caught(qat, tmp_path: Path) -> None:
    source = onnx.load(str(qat["cpu"] / "model.onnx"))
    integer_graph(qat["cpu"] / "model.onnx", tmp_path / "int.onnx")
    built = onnx.load(str(tmp_path / "int.onnx"))
    checked, differences = scale_differences(source, built)
    assert checked > 0 and differences == []
    # One ULP on one scale a QLinearMatMul reads
    node = next(n for n in built.graph.node if n.op_type == "QLinearMatMul")
    tensor = next(t for t in built.graph.initializer if t.name == node.input[4])
    nudged = np.nextafter(numpy_helper.to_array(tensor), np.float32(np.inf)).astype(np.float32)
    tensor.CopyFrom(numpy_helper.from_array(nudged, tensor.name))
    _, differences = scale_differences(source, built)
    assert differences == [f"initializer {node.input[4]!r} differs from the input's"]
    # A scale under a new name (a re-calibration writes its own)
    tensor.name = "recalibrated_scale"
    node.input[4] = "recalibrated_scale"
    _, differences = scale_differences(source, built)
    assert differences == [f"QLinearMatMul {node.name}: scale/zero point 'recalibrated_scale' is not the input's"]


def test_the_integer_graph_is_refused_when_a_fusion_changed_a_scale(qat, tmp_path: Path, monkeypatch) -> None:
    """integer_graph's own check (what the quantize stage runs): a fusion that re-rounded one scale fails it."""
    import engines.cpu.qdq_integer as qdq_integer

    real = qdq_integer.create_session

    def rerounding_session(source, threads, optimization, optimized_model_path):
        session = real(source, threads=threads, optimization=optimization, optimized_model_path=optimized_model_path)
        model = onnx.load(str(optimized_model_path))
        node = next(n for n in model.graph.node if n.op_type == "QLinearMatMul")
        tensor = next(t for t in model.graph.initializer if t.name == node.input[1])
        values = numpy_helper.to_array(tensor).astype(np.float16).astype(np.float32)  # an FP16 round trip
        tensor.CopyFrom(numpy_helper.from_array(values, tensor.name))
        onnx.save(model, str(optimized_model_path))
        return session

    monkeypatch.setattr(qdq_integer, "create_session", rerounding_session)
    with pytest.raises(EngineError, match="changed 1 scale"):
        integer_graph(qat["cpu"] / "model.onnx", tmp_path / "int.onnx")


def test_strip_qdq_gives_the_float_graph(qat, tmp_path: Path) -> None:
    model = onnx.load(str(qat["trt"] / "model.onnx"))
    stripped = strip_qdq(model)
    assert not any(node.op_type in QDQ_OPS or node.op_type in INTEGER_OPS for node in stripped.graph.node)
    onnx.checker.check_model(stripped, full_check=True)
    onnx.save(stripped, str(tmp_path / "float.onnx"))
    feed = {"input_ids": np.array([[101, 2023, 2003, 102]], np.int64), "attention_mask": np.ones((1, 4), np.int64),
            "token_type_ids": np.zeros((1, 4), np.int64)}
    with OrtRunner(tmp_path / "float.onnx") as floated, \
            OrtRunner(qat["trt"] / "model.onnx", simulate_tensorrt=True) as fake_quant:
        ours, qdq = floated.infer(feed), fake_quant.infer(feed)
    # The same weights as the QAT forward uses ((q - z) * s, exact); only the activations' rounding is gone.
    a, b = ours["sentence_embedding"].ravel(), qdq["sentence_embedding"].ravel()
    # One 4-token sentence: measured 0.978 (the held-out mean is in the build tests: 0.9984 CPU, 0.9998 TensorRT).
    assert 0.95 < float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)) < 1.0


def test_placement_refuses_what_tensorrt_cannot_take(qat) -> None:
    asymmetric = placement(onnx.load(str(qat["cpu"] / "model.onnx")))
    assert asymmetric.refusals and "zero point" in asymmetric.refusals[0]
    assert placement(onnx.load(str(qat["trt"] / "model.onnx"))).refusals == []


def _with_scale(source: Path, target: Path, value: float) -> Path:
    model = onnx.load(str(source / "model.onnx"))
    node = next(n for n in model.graph.node if n.op_type == "QuantizeLinear")
    tensor = next(t for t in model.graph.initializer if t.name == node.input[1])
    tensor.CopyFrom(numpy_helper.from_array(np.float32(value), tensor.name))
    target.mkdir()
    for file in source.iterdir():
        if file.name != "model.onnx":
            (target / file.name).write_bytes(file.read_bytes())
    onnx.save(model, str(target / "qat.onnx"))  # a bare .onnx file: config and tokenizer beside it
    return target / "qat.onnx"


def test_bad_qat_inputs_are_refused_with_one_line(qat, tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    float_only = tmp_path / "float"
    float_only.mkdir()
    for file in qat["cpu"].iterdir():
        (float_only / file.name).write_bytes(file.read_bytes())
    (float_only / "model.onnx").write_bytes((qat["cpu"].parent / "qat_cpu.fp32.onnx").read_bytes())
    assert_one_line_error(run_cli("build", "--model", str(float_only), "-o", out), 2,
                          "carries no QuantizeLinear/DequantizeLinear")
    assert_one_line_error(run_cli("build", "--model", str(_with_scale(qat["cpu"], tmp_path / "zero", 0.0)), "-o", out),
                          2, "is not finite and positive")
    assert_one_line_error(run_cli("build", "--model", str(qat["cpu"]), "--target", "trt", "-o", out), 2,
                          "TensorRT cannot build its Q/DQ as they are", "zero point")
    assert_one_line_error(run_cli("build", "--model", str(qat["cpu"]), "--quant", "static", "-o", out), 2,
                          "quantization.mode does not apply", "keeps its own scales")
    assert_one_line_error(run_cli("build", "--model", str(qat["trt"]), "--target", "trt", "--precision", "fp8",
                                  "-o", out), 2, "trt.precision does not apply")
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    for file in qat["cpu"].iterdir():
        (garbage / file.name).write_bytes(b"not onnx" if file.name == "model.onnx" else file.read_bytes())
    assert_one_line_error(run_cli("build", "--model", str(garbage / "model.onnx"), "-o", out), 2, "is not an ONNX model")


def test_both_parity_lines_gate(qat, tmp_path: Path) -> None:
    """--min-cosine 1.0: the integer graph is not bit-equal to the fake-quantized forward (first line), nor
    to the float graph (second line): exit 4, both failures named."""
    result = _build(qat["cpu"], tmp_path / "build", "--min-cosine", "1.0")
    assert result.returncode == 4, result.stderr[-2000:]
    failures = _stage(tmp_path / "build", "verify")["metrics"]["failures"]
    assert len(failures) == 2 and failures[1].startswith("against the float graph: "), failures


def test_a_graph_without_the_tasks_outputs_is_refused(qat, tmp_path: Path) -> None:
    model = onnx.load(str(qat["cpu"] / "model.onnx"))
    kept = [value for value in model.graph.output if value.name != "last_hidden_state"]
    del model.graph.output[:]
    model.graph.output.extend(kept)
    folder = tmp_path / "one-output"
    folder.mkdir()
    for file in qat["cpu"].iterdir():
        if file.name != "model.onnx":
            (folder / file.name).write_bytes(file.read_bytes())
    onnx.save(model, str(folder / "model.onnx"))
    assert_one_line_error(run_cli("build", "--model", str(folder), "-o", str(tmp_path / "out")), 2,
                          "has no output last_hidden_state", "--task feature-extraction")
