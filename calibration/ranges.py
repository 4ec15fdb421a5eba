"""Per-tensor activation ranges: computed once by running the FP32 graph, cached, reused.

ONNX Runtime's own calibrators keep every intermediate output of every batch and
stack them, which needs one shape for all batches (its histogram collector fails
with "inhomogeneous shape" on length-bucketed batches) and counts padding as data.
Here each batch streams through: the exposed tensors are reduced to their real
tokens (padding dropped) and folded into running min/max or ONNX Runtime's own
histogram collector, whose percentile and entropy (KL) searches we reuse.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Literal, Optional, Sequence

import numpy as np
import onnx

from calibration.batches import Batch
from pipeline.core.host import session_threads

Method = Literal["minmax", "percentile", "entropy"]
CACHE_SCHEMA_VERSION = 1
HISTOGRAM_BINS = 2048  # TensorRT's entropy calibration uses 2048 bins over 128 quantized levels
QUANTIZED_BINS = 128


@dataclass
class RangeCache:
    """tensor name -> (min, max), with what produced it. Written deterministically."""

    method: str
    percentile: Optional[float]
    ranges: dict[str, tuple[float, float]]
    fingerprint: dict[str, str] = field(default_factory=dict)  # "data", "model": sha256

    def to_json(self) -> str:
        document = {
            "schema_version": CACHE_SCHEMA_VERSION,
            "method": self.method,
            "percentile": self.percentile,
            "fingerprint": dict(sorted(self.fingerprint.items())),
            "tensors": {name: [low, high] for name, (low, high) in sorted(self.ranges.items())},
        }
        return json.dumps(document, indent=1) + "\n"

    def save(self, path: Path) -> None:
        temporary = path.with_name(f".{path.name}.tmp")
        temporary.write_text(self.to_json(), encoding="utf-8")
        os.replace(temporary, path)

    @classmethod
    def load(cls, path: Path) -> "RangeCache":
        document = json.loads(path.read_text(encoding="utf-8"))
        if document.get("schema_version") != CACHE_SCHEMA_VERSION:
            raise ValueError(f"{path}: calibration cache schema {document.get('schema_version')} is not supported")
        return cls(
            method=document["method"],
            percentile=document["percentile"],
            ranges={name: (float(low), float(high)) for name, (low, high) in document["tensors"].items()},
            fingerprint=document["fingerprint"],
        )


def _real_values(array: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The values of real (unpadded) tokens, flattened; tensors not laid out per token are kept whole."""
    batch, length = mask.shape
    if array.ndim >= 2 and array.shape[:2] == (batch, length):
        return array[mask.astype(bool)].ravel()
    if array.ndim >= 1 and array.shape[0] == batch * length and length > 1:
        return array[mask.reshape(-1).astype(bool)].ravel()
    return array.ravel()


def _exposed_session(model_path: Path, tensors: Sequence[str], threads: int):
    import onnxruntime as ort

    model = onnx.load(str(model_path))
    outputs = {output.name for output in model.graph.output}
    for name in tensors:
        if name not in outputs:
            model.graph.output.append(onnx.ValueInfoProto(name=name))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads, spin = session_threads(threads)
    if not spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    with tempfile.TemporaryDirectory(prefix="quantpipe-ranges-") as scratch:
        # Through a file, with external data, so graphs above protobuf's 2 GB limit work too.
        exposed = Path(scratch) / "exposed.onnx"
        onnx.save_model(model, str(exposed), save_as_external_data=True, location="exposed.onnx_data")
        return ort.InferenceSession(str(exposed), options, providers=["CPUExecutionProvider"])


def compute_ranges(
    model_path: Path,
    batches: Iterable[Batch],
    tensors: Sequence[str],
    method: Method = "minmax",
    percentile: float = 99.999,
    threads: int = 0,
    on_batch: Optional[Callable[[int], None]] = None,
) -> dict[str, tuple[float, float]]:
    """Run the FP32 graph over the batches and reduce each tensor's real-token values to a range.

    Deterministic for a given graph and batches.
    """
    from onnxruntime.quantization.calibrate import HistogramCollector

    session = _exposed_session(model_path, tensors, threads)
    input_names = [item.name for item in session.get_inputs()]
    names = list(tensors)
    low: dict[str, float] = {}
    high: dict[str, float] = {}
    collector = None
    if method != "minmax":
        collector = HistogramCollector(method, False, HISTOGRAM_BINS, QUANTIZED_BINS, percentile, "same")
    for index, batch in enumerate(batches, start=1):
        values = session.run(names, {name: batch[name] for name in input_names})
        mask = batch.get("attention_mask")
        if mask is None:  # a graph without a mask input: every token is real
            mask = np.ones_like(batch["input_ids"])
        real = {name: _real_values(array, mask) for name, array in zip(names, values) if array.size}
        floats = {name: flat for name, flat in real.items() if flat.dtype in (np.float32, np.float16)}
        # Integer tensors (shapes, indices) are never quantized; their plain min-max is recorded
        # because the quantizer expects a range for every tensor it inspects.
        plain = real if collector is None else {name: flat for name, flat in real.items() if name not in floats}
        for name, flat in plain.items():
            if flat.dtype == np.bool_:
                continue
            finite = flat[np.isfinite(flat)] if name in floats else flat
            if finite.size:
                low[name] = min(low.get(name, np.inf), float(finite.min()))
                high[name] = max(high.get(name, -np.inf), float(finite.max()))
        if collector is not None and floats:
            with contextlib.redirect_stdout(io.StringIO()):  # the collector prints on every call
                collector.collect(floats)
        if on_batch is not None:
            on_batch(index)
    ranges = {name: (low[name], high[name]) for name in low}
    if collector is not None and collector.histogram_dict:
        with contextlib.redirect_stdout(io.StringIO()):
            thresholds = collector.compute_collection_result()
        ranges.update({name: (float(values[0]), float(values[1])) for name, values in thresholds.items()})
    return dict(sorted(ranges.items()))
