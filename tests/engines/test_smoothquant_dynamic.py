"""SmoothQuant before dynamic INT8: recorded, keyed on the calibration samples, and on activations with an outlier
channel (as BERT's carry) closer to FP32 than plain dynamic INT8, measured in plain sessions (tests/independent.py)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from tests.independent import heldout_batches, row_cosines, run_graph
from tests.tiny_encoders import write_sentences, write_tiny_bert

CALIBRATION = {"samples": 16, "heldout_samples": 32, "max_length": 32}
OUTLIER_CHANNEL = 5


@pytest.fixture(scope="module")
def outlier_builds(tmp_path_factory):
    """(plain dynamic with no outlier move, dynamic + SmoothQuant 0.65) builds of one tiny BERT."""
    import pipeline

    root = tmp_path_factory.mktemp("smoothquant-dynamic")
    folder = write_tiny_bert(root / "bert", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                             intermediate_size=128)
    calibration = {**CALIBRATION, "source": str(write_sentences(root / "sentences.txt"))}
    builds = {}
    for label, smooth in (("plain", {"outlier_threshold": 0}), ("smooth", {"smoothquant": True, "smoothquant_alpha": 0.65})):
        builds[label] = pipeline.build(model=str(folder), output=root / label, calibration=calibration,
                                       quantization={"mode": "dynamic", **smooth}, verify={"localize": "never"})
    return builds


def test_smoothquant_dynamic_is_recorded_and_reads_the_calibration_samples(outlier_builds):
    smooth = outlier_builds["smooth"]
    manifest = json.loads((smooth.build_dir / "manifest.json").read_text())
    quantize = next(stage for stage in manifest["stages"] if stage["stage"] == "quantize")
    assert quantize["metrics"]["mode"] == "dynamic" and quantize["metrics"]["smoothquant_alpha"] == 0.65
    assert "stage:calibrate" in quantize["inputs"]
    plain = next(s for s in json.loads((outlier_builds["plain"].build_dir / "manifest.json").read_text())["stages"]
                 if s["stage"] == "quantize")
    assert "stage:calibrate" not in plain["inputs"] and plain["metrics"]["smoothquant_alpha"] is None


def test_smoothing_moves_the_outlier_into_the_weights(outlier_builds):
    graph = onnx.load(str(outlier_builds["smooth"].build_dir / "model.onnx"))
    plain = onnx.load(str(outlier_builds["plain"].build_dir / "model.onnx"))
    smooth_muls = [n for n in graph.graph.node if n.op_type == "Mul" and "smooth" in n.name]
    assert smooth_muls, "no SmoothQuant scale in the graph"
    assert not [n for n in plain.graph.node if "smooth" in n.name]


def _outlier_graph(path, rng) -> None:
    """x [batch, seq, 64] -> MatMul -> Relu -> MatMul -> y: the shape of a transformer's FFN."""
    from onnx import TensorProto, helper, numpy_helper

    w1 = numpy_helper.from_array(rng.normal(0, 0.2, (64, 128)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.normal(0, 0.2, (128, 32)).astype(np.float32), "w2")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"), helper.make_node("Relu", ["h"], ["a"], name="act"),
         helper.make_node("MatMul", ["a", "w2"], ["y"], name="fc2")], "ffn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", 32])], [w1, w2])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def test_smoothed_dynamic_int8_is_closer_to_fp32_than_plain_dynamic(tmp_path):
    """The engine itself on an FFN whose input has one channel 50x the others (BERT's LayerNorm outliers)."""
    from engines.cpu.neural_compressor import quantize
    from pipeline.config import QuantizationConfig

    rng = np.random.default_rng(0)
    _outlier_graph(tmp_path / "fp32.onnx", rng)

    def batch() -> dict[str, np.ndarray]:
        x = rng.normal(0, 1, (4, 16, 64)).astype(np.float32)
        x[..., OUTLIER_CHANNEL] *= 50
        return {"x": x}

    calibration, heldout = [batch() for _ in range(4)], [batch() for _ in range(4)]
    fp32 = run_graph(tmp_path / "fp32.onnx", heldout, ["y"])["y"]
    cosines = {}
    for label, smooth in (("plain", False), ("smooth", True)):
        settings = QuantizationConfig(mode="dynamic", smoothquant=smooth, smoothquant_alpha=0.65, outlier_threshold=0)
        summary = quantize(tmp_path / "fp32.onnx", tmp_path / f"{label}.onnx", settings, calibration=calibration)
        assert summary["smoothquant_alpha"] == (0.65 if smooth else None)
        int8 = run_graph(tmp_path / f"{label}.onnx", heldout, ["y"])["y"]
        cosines[label] = float(row_cosines(fp32, int8).mean())
    # Per-tensor activation scales: the 50x channel costs the others their resolution, unless smoothed.
    assert cosines["plain"] < 0.999 and cosines["smooth"] > cosines["plain"] + 0.002, cosines
