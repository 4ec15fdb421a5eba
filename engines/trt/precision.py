"""The precision of a TensorRT graph, chosen by measurement: INT8/FP8 Q/DQ, FP16, or a per-layer mix.

int8/fp8: every MatMul/Gemm/Conv input gets Q/DQ. If the quantized graph misses the target
score on the calibration samples (the primary output's mean cosine; for decoder LLMs the
perplexity ratio), each node's sensitivity is measured (the score lost when only that node is
quantized) and the most sensitive nodes are left unquantized, one at a time, until the target is
met. A graph of more than PROBE_LIMIT nodes (an LLM: 271 MatMuls, ~5 s per probe) is ranked by
each node's own quantization error on the calibration samples instead. `best` does the same with
INT8 and puts the whole graph in FP16 (the unquantized nodes then run in FP16, the sensitive ops in FP32).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import onnx

from engines.fallback import greedy_search, order_ranking
from engines.onnx_io import save_model
from engines.parallel import parallel_map
from engines.ort_session import OrtRunner, create_session
from engines.trt.calibration import (
    TensorStats,
    activation_amax,
    collect_activation_stats,
    quantize_dequantize,
)
from engines.trt.fp16 import FP32_OPS, convert_to_fp16
from engines.trt.qdq import (
    FP8_MIN_OPSET,
    QUANTIZABLE_OPS,
    QuantizableNode,
    ensure_opset,
    insert_qdq,
    quantizable_nodes,
    weight_scales,
)

SENSITIVITY_BATCHES = 2  # calibration batches used to rank nodes (one session per node, so few)
TYPICAL_PERCENTILE = 99.0
PROBE_LIMIT = 96  # more quantizable nodes than this: rank by local quantization error, not one session per node
Log = Callable[[str], None]
Batch = dict[str, np.ndarray]


def mean_cosine(reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray]) -> float:
    """Mean cosine per row of the last axis: per sample for [batch, features], per token for [batch, seq, vocab]."""
    ref = np.concatenate([r.reshape(-1, r.shape[-1]) for r in reference]).astype(np.float64)
    cand = np.concatenate([c.reshape(-1, c.shape[-1]) for c in candidate]).astype(np.float64)
    norms = np.maximum(np.linalg.norm(ref, axis=1) * np.linalg.norm(cand, axis=1), 1e-12)
    return float(np.mean(np.sum(ref * cand, axis=1) / norms))


@dataclass(frozen=True)
class Score:
    """What the fallback search holds a candidate to on the calibration batches: higher is better."""

    name: str
    compute: Callable[[Sequence[np.ndarray], Sequence[np.ndarray], Sequence[Batch]], float]


COSINE = Score("cosine", lambda reference, candidate, batches: mean_cosine(reference, candidate))


def _centered(arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
    return [array - array.mean(axis=-1, keepdims=True) for array in arrays]


# Classifiers: logits are defined up to a constant per row (softmax does not see it), and a large common
# offset makes the plain cosine blind to the differences that decide the class: [5.00, 5.01, 4.99] against
# [5.01, 5.00, 4.99] has cosine 0.99999 and another top-1. Centered per row, the cosine sees them.
CENTERED_COSINE = Score("centered_cosine", lambda reference, candidate, batches: mean_cosine(
    _centered(reference), _centered(candidate)))


class _Evaluator:
    """Primary-output score of candidate graphs against the FP32 graph on fixed batches.

    Candidates differ from each other in a few tensors, so each weight is converted to an
    ONNX Runtime value once and handed to the session as an external initializer: a
    candidate is serialized without its 90 MB of weights.
    """

    SHARED_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.INT8)
    SHARED_MIN_BYTES = 1 << 16

    def __init__(self, fp32_path: Path, output: str, batches: Sequence[Batch], score: Score = COSINE) -> None:
        self.output, self.batches, self.score_spec = output, list(batches), score
        self.weights: dict[tuple[str, int, int, int], tuple[np.ndarray, object]] = {}
        with OrtRunner(fp32_path, output_names=[output]) as runner:
            self.reference = [runner.infer(batch)[output] for batch in self.batches]

    def __getstate__(self) -> dict[str, object]:  # a Ray task's copy: ONNX Runtime values are rebuilt there
        return {**self.__dict__, "weights": {}}

    def _strip_weights(self, model: onnx.ModelProto) -> tuple[list[str], list[object]]:
        import onnxruntime as ort

        names, values = [], []
        for tensor in model.graph.initializer:
            if tensor.data_type not in self.SHARED_TYPES or len(tensor.raw_data) < self.SHARED_MIN_BYTES:
                continue
            # crc32 of the bytes: a tensor that kept its name but changed (FP16 conversion) is another value
            key = (tensor.name, tensor.data_type, len(tensor.raw_data), zlib.crc32(tensor.raw_data))
            if key not in self.weights:
                array = onnx.numpy_helper.to_array(tensor).copy()
                self.weights[key] = (array, ort.OrtValue.ortvalue_from_numpy(array))  # the value shares the array
            tensor.ClearField("raw_data")
            tensor.data_location = onnx.TensorProto.EXTERNAL
            tensor.external_data.add(key="location", value="supplied-by-session-options")
            names.append(tensor.name)
            values.append(self.weights[key][1])
        return names, values

    def score(self, model: onnx.ModelProto, batches: Optional[int] = None) -> float:
        """Consumes `model` (its weights are moved out)."""
        chosen = self.batches[:batches] if batches else self.batches
        names, values = self._strip_weights(model)
        session = create_session(model.SerializeToString(), external_initializers=(names, values),
                                 simulate_tensorrt=True)
        inputs = [item.name for item in session.get_inputs()]
        candidate = [session.run([self.output], {name: batch[name] for name in inputs})[0] for batch in chosen]
        return self.score_spec.compute(self.reference[: len(chosen)], candidate, chosen)


def build_precision_graph(
    fp32_path: Path,
    output_path: Path,
    precision: str,
    batches: Sequence[dict[str, np.ndarray]],
    primary_output: str,
    target_cosine: float,
    method: str = "mse",
    percentile: float = 99.99,
    max_fallback_nodes: int = 12,
    log: Log = lambda message: None,
    score: Score = COSINE,
    qdq_ops: Sequence[str] = QUANTIZABLE_OPS,
    qdq_weights_only: bool = False,
) -> dict[str, object]:
    """Write the TensorRT-ready graph for `precision` and return what was done and measured."""
    base = onnx.load(str(fp32_path))
    if precision == "fp16":
        converted = convert_to_fp16(base)
        save_model(converted, output_path)
        return {"precision": "fp16", "fp32_ops": list(FP32_OPS)}
    quant = "fp8" if precision == "fp8" else "int8"
    nodes = quantizable_nodes(base, qdq_ops, qdq_weights_only)
    activations = sorted({name for node in nodes for name in node.activations})
    log(f"measuring {len(activations)} activation ranges on {len(batches)} calibration batches ({method})")
    stats = collect_activation_stats(fp32_path, activations, batches)
    amax = {name: activation_amax(stats[name], method, percentile, fp8=quant == "fp8") for name in activations}
    # Opset 19: FLOAT8E4M3FN Q/DQ, and FP16 scales for `best`; the same opset for every precision keeps one path.
    base = ensure_opset(base, FP8_MIN_OPSET)

    counts: dict[str, int] = {}

    def compose(kept: set[str]) -> onnx.ModelProto:
        model = onnx.ModelProto()
        model.CopyFrom(base)
        counts.update(insert_qdq(model, [node for node in nodes if node.name not in kept], amax, quant))
        return convert_to_fp16(model) if precision == "best" else model

    evaluator = _Evaluator(fp32_path, primary_output, batches, score)
    cosine = evaluator.score(compose(set()))
    log(f"all {len(nodes)} nodes quantized: calibration {score.name} {cosine:.5f} (target {target_cosine:.4f})")
    ranking: list[tuple[str, float]] = []
    ranked_by = None
    if cosine < target_cosine and max_fallback_nodes > 0:
        if len(nodes) > PROBE_LIMIT:
            ranked_by = "local quantization error"
            ranking = _local_errors(base, nodes, stats, amax, quant, log)
        else:
            ranked_by = f"{score.name} lost when only that node is quantized"
            ranking = _sensitivity(base, nodes, amax, quant, evaluator, log)
    kept_precision = "FP16" if precision == "best" else "FP32"
    outcome = greedy_search(
        ranking, lambda chosen: evaluator.score(compose(set(chosen))), target_cosine, max_fallback_nodes, cosine,
        lambda chosen, value: log(f"keeping {chosen[-1]} in {kept_precision}: calibration {score.name} {value:.5f}"),
    )
    kept, cosine = outcome.chosen, outcome.metric
    final = compose(set(kept))
    save_model(final, output_path)
    return {
        "precision": precision,
        "quantized_type": quant.upper(),
        "calibration_method": method,
        "quantizable_nodes": len(nodes),
        **counts,
        "kept_higher_precision": kept,
        "kept_precision": "FP16" if precision == "best" else "FP32",
        f"calibration_{score.name}": round(cosine, 6),
        f"target_{score.name}": target_cosine,
        "sensitivity_ranked_by": ranked_by,
        "sensitivity_top": [[name, round(loss, 6)] for name, loss in ranking[:12]],
        "activation_amax": {name: round(value, 6) for name, value in amax.items()},
    }


def _sensitivity(base: onnx.ModelProto, nodes: Sequence[QuantizableNode], amax: dict[str, float], quant: str,
                 evaluator: _Evaluator, log: Log) -> list[tuple[str, float]]:
    """Nodes by the cosine lost when only that node is quantized, worst first."""
    log(f"ranking {len(nodes)} nodes by sensitivity on {SENSITIVITY_BATCHES} calibration batches")

    def quantize_one(node: QuantizableNode) -> float:
        model = onnx.ModelProto()
        model.CopyFrom(base)
        insert_qdq(model, [node], amax, quant)
        return 1.0 - evaluator.score(model, SENSITIVITY_BATCHES)

    losses = parallel_map(quantize_one, nodes)
    return order_ranking([(node.name, loss) for node, loss in zip(nodes, losses)])


def _relative_error(values: np.ndarray, scale: np.ndarray, quant: str) -> float:
    """Noise-to-signal power of quantize-dequantize (per-tensor or broadcast per-channel scale)."""
    noise = (quantize_dequantize(values, scale, quant == "fp8") - values).astype(np.float64) ** 2
    return float(np.sum(noise) / max(float(np.sum(values.astype(np.float64) ** 2)), 1e-30))


def _local_errors(base: onnx.ModelProto, nodes: Sequence[QuantizableNode], stats: dict[str, TensorStats],
                  amax: dict[str, float], quant: str, log: Log) -> list[tuple[str, float]]:
    """Nodes by the summed noise-to-signal ratio of their own quantized inputs, worst first.

    Activations: the error of the typical values (up to the 99th percentile of the calibration sample) plus
    that of the exact maximum, each relative to itself: a range stretched by an outlier (SmolLM2's |x| ~ 3000
    against a p99.9 of 1.4) rounds every typical value to 0, a clipped outlier is lost; power over the whole
    sample would hide both behind the outliers' own power. Weights: per-channel, noise over signal power.
    """
    log(f"ranking {len(nodes)} nodes by the quantization error of their inputs on the calibration samples")
    initializers = {tensor.name: tensor for tensor in base.graph.initializer}
    top = 448.0 if quant == "fp8" else 127.0
    activation_error = {}
    for name in {a for node in nodes for a in node.activations}:
        scale = np.float32(max(amax[name], 1e-12) / top)
        sample = stats[name].sample()
        typical = sample[sample <= np.percentile(sample, TYPICAL_PERCENTILE)]
        peak = np.array([stats[name].absmax], np.float32)
        activation_error[name] = _relative_error(typical, scale, quant) + _relative_error(peak, scale, quant)
    errors = []
    for node in nodes:
        error = sum(activation_error[name] for name in node.activations)
        if node.weight is not None:
            weight = onnx.numpy_helper.to_array(initializers[node.weight]).astype(np.float32)
            shape = [1] * weight.ndim
            shape[node.weight_axis] = -1
            error += _relative_error(weight, weight_scales(weight, node.weight_axis, quant).reshape(shape), quant)
        errors.append((node.name, error))
    return order_ranking(errors)
