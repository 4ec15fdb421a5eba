"""Layer localization: where the candidate first departs from the FP32 graph.

Every float tensor a node of the FP32 graph produces is exposed as an output
(Polygraphy's `ModifyOutputs`) on both graphs, matched by name: quantizers keep
the names of the tensors they replace (Neural Compressor's dynamic INT8 writes a
MatMulInteger -> Cast -> Mul chain whose last output carries the MatMul's output
name; QAttention keeps the Attention's output), and a DequantizeLinear fed by a
QuantizeLinear stands for the tensor that QuantizeLinear read. Per matched
tensor: relative L2 error, SNR, cosine and max abs error over real tokens of the
first held-out batches. Layers are ranked by the error they *introduce*: their
own relative error minus the worst relative error among their inputs, so a
layer that only passes on upstream error does not outrank the one that caused it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import onnx

from pipeline.parity.engine import Batch, stream_pair

TOP_LAYERS = 10
_Q, _DQ = "QuantizeLinear", "DequantizeLinear"


@dataclass
class LayerError:
    order: int  # position of the producing node in the FP32 graph (topological)
    node: str
    op_type: str
    tensor: str
    candidate_tensor: str
    relative_l2: float
    introduced: float
    snr_db: float
    cosine: float
    max_abs: float


def _producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {output: node for node in model.graph.node for output in node.output if output}


def _through_qdq(tensor: str, producers: dict[str, onnx.NodeProto]) -> str:
    """The tensor a DequantizeLinear(QuantizeLinear(x)) chain stands for: x."""
    seen = 0
    while seen < 8:  # Q/DQ chains are short; the bound guards against malformed cycles
        node = producers.get(tensor)
        if node is None or node.op_type != _DQ:
            return tensor
        quantize = producers.get(node.input[0])
        if quantize is None or quantize.op_type != _Q:
            return tensor
        tensor, seen = quantize.input[0], seen + 1
    return tensor


def match_tensors(reference: onnx.ModelProto, candidate: onnx.ModelProto) -> dict[str, str]:
    """FP32 node outputs -> the candidate tensor holding the same value (exact name first, then through Q/DQ)."""
    candidate_producers = _producers(candidate)
    aliases: dict[str, str] = {}
    for tensor in candidate_producers:
        original = _through_qdq(tensor, candidate_producers)
        if original != tensor:
            aliases.setdefault(original, tensor)
    matches = {}
    for node in reference.graph.node:
        if node.op_type == "Constant":
            continue
        for tensor in node.output:
            if not tensor:
                continue
            if tensor in candidate_producers:
                matches[tensor] = tensor
            elif tensor in aliases:
                matches[tensor] = aliases[tensor]
    return matches


def _marked(path: Path, outputs: Sequence[str]):
    from polygraphy.backend.onnx import BytesFromOnnx, ModifyOutputs, OnnxFromPath

    return BytesFromOnnx(ModifyOutputs(OnnxFromPath(str(path)), outputs=list(outputs)))


def _real_rows(array: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Per-token tensors [batch, sequence, ...] keep real tokens only, as the output metrics do."""
    if array.ndim >= 3 and array.shape[:2] == mask.shape:
        return array[mask.astype(bool)]
    return array


class _Accumulator:
    def __init__(self) -> None:
        self.diff2 = self.ref2 = self.cand2 = self.dot = self.max_abs = 0.0

    def add(self, ref: np.ndarray, cand: np.ndarray) -> None:
        ref, cand = ref.astype(np.float64).ravel(), cand.astype(np.float64).ravel()
        diff = cand - ref
        self.diff2 += float(diff @ diff)
        self.ref2 += float(ref @ ref)
        self.cand2 += float(cand @ cand)
        self.dot += float(ref @ cand)
        self.max_abs = max(self.max_abs, float(np.max(np.abs(diff))) if diff.size else 0.0)

    def relative_l2(self) -> float:
        return math.sqrt(self.diff2 / self.ref2) if self.ref2 > 0 else (0.0 if self.diff2 == 0 else math.inf)

    def snr_db(self) -> float:
        if self.diff2 == 0:
            return math.inf
        return 10 * math.log10(self.ref2 / self.diff2) if self.ref2 > 0 else -math.inf

    def cosine(self) -> float:
        norms = math.sqrt(self.ref2 * self.cand2)
        return self.dot / norms if norms > 0 else (1.0 if self.ref2 == self.cand2 == 0 else 0.0)


def localize(reference: Path, candidate: Path, batches: Sequence[Batch], top: int = TOP_LAYERS,
             simulate_tensorrt: bool = False) -> dict[str, object]:
    """Per-layer error of the candidate against the FP32 graph; the `localization` section of parity.json."""
    reference_model = onnx.load(str(reference), load_external_data=False)
    candidate_model = onnx.load(str(candidate), load_external_data=False)
    matches = match_tensors(reference_model, candidate_model)
    if not matches:
        return {"batches": 0, "matched_tensors": 0, "layers": [], "ranked": [], "first_divergent": None,
                "note": "no tensor of the FP32 graph could be matched by name in the candidate"}
    accumulators: dict[str, _Accumulator] = {}
    for batch, (ref_out, cand_out) in zip(batches, stream_pair(
        _marked(reference, list(matches)), _marked(candidate, list(dict.fromkeys(matches.values()))), batches, simulate_tensorrt
    )):
        mask = batch.get("attention_mask")
        for tensor, candidate_tensor in matches.items():
            ref, cand = ref_out.get(tensor), cand_out.get(candidate_tensor)
            if ref is None or cand is None or ref.shape != cand.shape:
                continue
            if not (np.issubdtype(ref.dtype, np.floating) and np.issubdtype(cand.dtype, np.floating)):
                continue
            if mask is not None:
                ref, cand = _real_rows(ref, mask), _real_rows(cand, mask)
            accumulators.setdefault(tensor, _Accumulator()).add(ref, cand)
    layers = _layer_errors(reference_model, matches, accumulators)
    ranked = sorted(layers, key=lambda layer: (-layer.introduced, layer.order))[:top]
    first = _first_divergent(layers)
    return {
        "batches": len(batches),
        "matched_tensors": len(layers),
        "layers": [asdict(layer) for layer in layers],
        "ranked": [asdict(layer) for layer in ranked],
        "first_divergent": asdict(first) if first else None,
    }


def _layer_errors(model: onnx.ModelProto, matches: dict[str, str],
                  accumulators: dict[str, _Accumulator]) -> list[LayerError]:
    relative = {tensor: acc.relative_l2() for tensor, acc in accumulators.items()}
    layers = []
    for order, node in enumerate(model.graph.node):
        for tensor in node.output:
            if tensor not in accumulators:
                continue
            upstream = max((relative[name] for name in node.input if name in relative), default=0.0)
            acc = accumulators[tensor]
            layers.append(LayerError(
                order=order, node=node.name or f"{node.op_type}_{order}", op_type=node.op_type, tensor=tensor,
                candidate_tensor=matches[tensor], relative_l2=_finite(relative[tensor]),
                introduced=_finite(max(relative[tensor] - upstream, 0.0)), snr_db=_finite(acc.snr_db()),
                cosine=_finite(acc.cosine()), max_abs=_finite(acc.max_abs),
            ))
    return layers


def _first_divergent(layers: list[LayerError]) -> Optional[LayerError]:
    """The earliest layer that introduces at least half of the largest error any layer introduces."""
    worst = max((layer.introduced for layer in layers), default=0.0)
    if worst <= 0:
        return None
    return next(layer for layer in layers if layer.introduced >= 0.5 * worst)


def _finite(value: float) -> float:
    """JSON has no infinity: clamp to a large finite number (an exact match has SNR 'inf')."""
    if math.isnan(value):
        return value
    return max(min(value, 1e300), -1e300)
