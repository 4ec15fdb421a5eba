"""Range computation on tiny graphs built in code: exact values, padding excluded, cache bytes."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from onnxruntime.quantization.calibrate import HistogramCollector

from calibration.ranges import HISTOGRAM_BINS, QUANTIZED_BINS, RangeCache, compute_ranges

HIDDEN = 4


def _graph(path: Path) -> Path:
    """hidden = Gather(table, input_ids) * 2 -> Relu: per-token tensors of shape [batch, seq, 4]."""
    table = np.arange(-20, 20, dtype=np.float32).reshape(10, HIDDEN)
    nodes = [
        helper.make_node("Gather", ["table", "input_ids"], ["embedded"]),
        helper.make_node("Mul", ["embedded", "two"], ["scaled"]),
        helper.make_node("Relu", ["scaled"], ["output"]),
    ]
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["b", "s"])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["b", "s", HIDDEN])],
        [onnx.numpy_helper.from_array(table, "table"), onnx.numpy_helper.from_array(np.float32(2.0), "two")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(path))
    return path


def _batch(ids: list[list[int]], lengths: list[int]) -> dict[str, np.ndarray]:
    mask = np.array([[1] * n + [0] * (len(ids[0]) - n) for n in lengths], dtype=np.int64)
    return {"input_ids": np.array(ids, dtype=np.int64), "attention_mask": mask}


def test_minmax_counts_real_tokens_only(tmp_path: Path) -> None:
    model = _graph(tmp_path / "tiny.onnx")
    # Row 9 of the table holds the largest values (16..19); it appears only as padding here.
    batches = [_batch([[1, 2, 9]], [2]), _batch([[3, 4, 5, 9, 9]], [3])]
    ranges = compute_ranges(model, batches, ["embedded", "scaled", "input_ids"], "minmax")
    assert ranges["embedded"] == (-16.0, 3.0)  # rows 1..5 of the table: -16 .. 3
    assert ranges["scaled"] == (-32.0, 6.0)
    assert ranges["input_ids"] == (1.0, 5.0), "integer tensors get their plain min-max"


def test_percentile_and_entropy_clip_outliers(tmp_path: Path) -> None:
    model = _graph(tmp_path / "tiny.onnx")
    rng = np.random.default_rng(0)
    # Mostly rows 4..5 (small values), once row 9 (the outliers); batches of different lengths.
    batches = [_batch([rng.integers(4, 6, size=length).tolist()], [length]) for length in (40, 64, 17, 90)]
    batches.append(_batch([[9] + [4] * 30], [31]))
    minmax = compute_ranges(model, batches, ["scaled"], "minmax")["scaled"]
    percentile = compute_ranges(model, batches, ["scaled"], "percentile", percentile=99.0)["scaled"]
    entropy = compute_ranges(model, batches, ["scaled"], "entropy")["scaled"]
    assert minmax == (-8.0, 38.0)
    # References on the real tokens' values computed here in numpy (the table row times 2, padding dropped):
    table = np.arange(-20, 20, dtype=np.float32).reshape(10, HIDDEN)
    real = [(table[b["input_ids"]] * 2)[b["attention_mask"].astype(bool)].ravel() for b in batches]
    # percentile 99: numpy's 0.5th and 99.5th percentiles, within one of the 2048 histogram bins
    bin_width = (minmax[1] - minmax[0]) / HISTOGRAM_BINS
    expected = np.percentile(np.concatenate(real), [0.5, 99.5], method="inverted_cdf")
    np.testing.assert_allclose(percentile, expected, atol=bin_width)
    assert percentile[1] < 7, "the outlier row (32..38) is clipped"
    # entropy: ONNX Runtime's own histogram collector and KL search, fed the same batches one by one
    collector = HistogramCollector("entropy", False, HISTOGRAM_BINS, QUANTIZED_BINS, 99.999, "same")
    with contextlib.redirect_stdout(io.StringIO()):
        for values in real:
            collector.collect({"scaled": values})
        reference = collector.compute_collection_result()["scaled"]
    assert entropy == (float(reference[0]), float(reference[1])) and entropy[1] < 38.0, (entropy, reference)


def test_cache_is_deterministic_json(tmp_path: Path) -> None:
    model = _graph(tmp_path / "tiny.onnx")
    batches = [_batch([[1, 2, 3, 0]], [4])]
    first = RangeCache("minmax", None, compute_ranges(model, batches, ["scaled", "embedded"]), {"model": "m", "data": "d"})
    second = RangeCache("minmax", None, compute_ranges(model, batches, ["embedded", "scaled"]), {"data": "d", "model": "m"})
    first.save(tmp_path / "a.json")
    second.save(tmp_path / "b.json")
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    loaded = RangeCache.load(tmp_path / "a.json")
    assert loaded.ranges == first.ranges and loaded.fingerprint == {"data": "d", "model": "m"}
    assert not list(tmp_path.glob(".*.tmp")), "written through a temporary file"


def test_unknown_cache_schema_is_refused(tmp_path: Path) -> None:
    (tmp_path / "cache.json").write_text('{"schema_version": 99}')
    with pytest.raises(ValueError, match="schema 99 is not supported"):
        RangeCache.load(tmp_path / "cache.json")
