"""Activation ranges for explicit (Q/DQ) quantization, measured by running the FP32 graph in ONNX Runtime.

ONNX Runtime's own calibrators crash on batches of different sequence lengths with
percentile or entropy methods (FACTS.md), so this collects its own statistics: the
graph is run with the tensors of interest exposed as outputs, and per tensor it keeps
the exact absolute maximum and a seeded random sample of absolute values, from
which a percentile or a mean-squared-error-optimal clipping range is computed.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import onnx

from engines.onnx_io import save_model
from engines.ort_session import create_session

SAMPLES_PER_BATCH = 32_768  # absolute values kept per tensor and batch, for percentiles and MSE search
MSE_SAMPLE = 131_072  # values the MSE search scores each candidate range on
MSE_CANDIDATES = 64
INT8_MAX = 127.0
FP8_E4M3_MAX = 448.0


@dataclass
class TensorStats:
    absmax: float = 0.0
    samples: list[np.ndarray] = field(default_factory=list)

    def add(self, values: np.ndarray, rng: np.random.Generator) -> None:
        flat = np.abs(values.astype(np.float32, copy=False).ravel())
        self.absmax = max(self.absmax, float(flat.max(initial=0.0)))
        if flat.size > SAMPLES_PER_BATCH:
            flat = flat[rng.integers(0, flat.size, SAMPLES_PER_BATCH)]
        self.samples.append(flat)

    def sample(self) -> np.ndarray:
        return np.concatenate(self.samples) if self.samples else np.zeros(1, np.float32)


def _real_tokens(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Rows of real tokens for [batch, sequence, ...] tensors; padding would skew the ranges."""
    if values.ndim >= 3 and values.shape[:2] == mask.shape:
        return values[mask.astype(bool)]
    return values


def collect_activation_stats(
    model_path: Path,
    tensor_names: Sequence[str],
    batches: Sequence[dict[str, np.ndarray]],
    seed: int = 0,
    on_batch: Optional[Callable[[int, int], None]] = None,
) -> dict[str, TensorStats]:
    """Run the FP32 graph over the batches and collect statistics of the named intermediate tensors."""
    model = onnx.load(str(model_path))
    present = {output.name for output in model.graph.output}
    for name in tensor_names:
        if name not in present:
            model.graph.output.append(onnx.ValueInfoProto(name=name))
    rng = np.random.default_rng(seed)
    stats = {name: TensorStats() for name in tensor_names}
    with tempfile.TemporaryDirectory(prefix="quantpipe-calib-") as scratch:
        exposed = Path(scratch) / "exposed.onnx"
        save_model(model, exposed)
        # No graph optimization: fusions could remove the very tensors being measured.
        session = create_session(exposed, optimization="disable")
        inputs = [item.name for item in session.get_inputs()]
        for index, batch in enumerate(batches, start=1):
            values = session.run(list(tensor_names), {name: batch[name] for name in inputs})
            for name, value in zip(tensor_names, values):
                stats[name].add(_real_tokens(value, batch["attention_mask"]), rng)
            if on_batch is not None:
                on_batch(index, len(batches))
        del session
    return stats


def quantize_dequantize(values: np.ndarray, scale: float, fp8: bool) -> np.ndarray:
    if fp8:
        import ml_dtypes

        clipped = np.clip(values / scale, -FP8_E4M3_MAX, FP8_E4M3_MAX)
        return clipped.astype(ml_dtypes.float8_e4m3fn).astype(np.float32) * scale
    return np.clip(np.round(values / scale), -INT8_MAX, INT8_MAX) * scale


def activation_amax(stats: TensorStats, method: str, percentile: float = 99.99, fp8: bool = False) -> float:
    """The clipping range of one activation: `max`, `percentile`, or `mse` (the range with least error)."""
    if stats.absmax == 0.0:
        return 1.0
    if method == "max":
        return stats.absmax
    sample = stats.sample()
    if method == "percentile":
        return float(max(np.percentile(sample, percentile), 1e-8))
    if method == "mse":
        top = INT8_MAX if not fp8 else FP8_E4M3_MAX
        if sample.size > MSE_SAMPLE:
            sample = sample[np.random.default_rng(0).integers(0, sample.size, MSE_SAMPLE)]
        candidates = stats.absmax * np.linspace(1.0 / MSE_CANDIDATES, 1.0, MSE_CANDIDATES)
        errors = [float(np.mean((quantize_dequantize(sample, c / top, fp8) - sample) ** 2)) for c in candidates]
        return float(candidates[int(np.argmin(errors))])
    raise ValueError(f"unknown calibration method '{method}' (max, percentile, mse)")
