"""Outlier activation channels moved into the weights before dynamic INT8 (a sparse SmoothQuant).

Dynamic INT8 quantizes each activation tensor with one scale, and in BERT-family encoders one or two channels
of it carry values 4-15x the others' (all-MiniLM-L6-v2, layer 0: the GELU output's largest channel reaches 24.7
where the next reaches 6.2, on one token per sentence; the LayerNorm outputs 28.5 against 11.3), so every other
channel gets a fraction of the 8 bits. Each such channel c of a GEMM input x is divided by s_c and the weight's
row c multiplied by it (x @ W = (x / s) @ (diag(s) W), exact in FP32), with s_c = max(1, absmax_c / (threshold x
the median channel's absmax)) from the calibration samples: only the few channels past the threshold move, so
the weights, quantized per output column, keep their resolution (SmoothQuant's alpha rule scales every channel).

The division is a Mul before the GEMMs that read x, except where x is a fused Attention's output: there it is
folded into V's weight columns and bias (the attention output is softmax-weighted sums of V, linear in them).
Measured on all-MiniLM-L6-v2 (1,000 out-of-domain sentences, AMD EPYC AVX2): embedding cosine 0.9893 -> 0.9956
at threshold 2; the Muls take 3% of the kernel time at 8 x 128 (docs/encoder-speed.md).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from engines.onnx_io import consumer_counts, save_model
from engines.ort_session import create_session

Batch = dict[str, np.ndarray]


@dataclass(frozen=True)
class Gemm:
    """A node whose input 0 multiplies a constant weight with the activation's channels along the weight's rows."""

    node: onnx.NodeProto
    weight: str


def _gemms(model: onnx.ModelProto) -> list[Gemm]:
    constants = {tensor.name: tensor for tensor in model.graph.initializer}
    found = []
    for node in model.graph.node:
        weight = constants.get(node.input[1]) if len(node.input) > 1 else None
        if weight is None or len(weight.dims) != 2 or weight.data_type != onnx.TensorProto.FLOAT:
            continue
        if (node.op_type == "MatMul" and node.domain in ("", "ai.onnx")) or (
                node.op_type == "Attention" and node.domain == "com.microsoft"):
            found.append(Gemm(node, weight.name))
    return found


def channel_maxima(model: onnx.ModelProto, tensors: Sequence[str], batches: Sequence[Batch],
                   on_batch: Optional[Callable[[int, int], None]] = None) -> dict[str, np.ndarray]:
    """Per-channel (last axis) absolute maximum of each named tensor over the batches, FP32 graph in ONNX Runtime."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    present = {output.name for output in probe.graph.output}
    probe.graph.output.extend(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
                              for name in tensors if name not in present)
    maxima: dict[str, np.ndarray] = {}
    with tempfile.TemporaryDirectory(prefix="quantpipe-outliers-") as scratch:
        path = Path(scratch) / "probe.onnx"
        save_model(probe, path)
        session = create_session(path, optimization="basic")
        inputs = {value.name for value in session.get_inputs()}
        for index, batch in enumerate(batches):
            values = session.run(list(tensors), {name: array for name, array in batch.items() if name in inputs})
            for name, value in zip(tensors, values):
                channels = np.abs(value).reshape(-1, value.shape[-1]).max(axis=0)
                maxima[name] = channels if name not in maxima else np.maximum(maxima[name], channels)
            if on_batch is not None:
                on_batch(index + 1, len(batches))
    return maxima


def outlier_scales(maxima: np.ndarray, threshold: float) -> np.ndarray:
    """s_c = max(1, absmax_c / (threshold x median absmax)): 1 for every channel within the threshold."""
    limit = threshold * float(np.median(maxima))
    if limit <= 0:
        return np.ones_like(maxima, dtype=np.float32)
    return np.maximum(1.0, maxima / limit).astype(np.float32)


def _v_columns(node: onnx.NodeProto, hidden: int, width: int) -> Optional[slice]:
    """Columns of a fused Attention's [K, q + k + v] weight that make its output's channels, when they line up."""
    sizes = next((list(a.ints) for a in node.attribute if a.name == "qkv_hidden_sizes"), [])
    q, k, v = sizes if len(sizes) == 3 else (width // 3,) * 3
    if q + k + v != width or v != hidden:
        return None
    return slice(q + k, q + k + v)


def migrate(model: onnx.ModelProto, batches: Sequence[Batch], threshold: float,
            on_batch: Optional[Callable[[int, int], None]] = None) -> dict[str, object]:
    """Rewrite `model` in place; returns what moved: inputs touched, channels scaled, largest scale, Muls added,
    divisions folded into an Attention's V."""
    gemms = _gemms(model)
    readers: dict[str, list[Gemm]] = {}
    for gemm in gemms:
        readers.setdefault(gemm.node.input[0], []).append(gemm)
    consumers = consumer_counts(model)
    weight_uses = {gemm.weight: consumers.get(gemm.weight, 0) for gemm in gemms}
    maxima = channel_maxima(model, sorted(readers), batches, on_batch)
    producers = {output: node for node in model.graph.node for output in node.output}
    constants = {tensor.name: tensor for tensor in model.graph.initializer}
    inputs = channels = folded = 0
    largest = 1.0
    muls: dict[str, onnx.NodeProto] = {}
    for activation, users in readers.items():
        scales = outlier_scales(maxima[activation], threshold)
        moved = scales > 1
        if not moved.any() or any(weight_uses[user.weight] != 1 for user in users) or any(
                constants[user.weight].dims[0] != scales.size for user in users):
            continue
        for user in users:
            tensor = constants[user.weight]
            tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor) * scales[:, None], tensor.name))
        producer = producers.get(activation)
        if _fold_into_attention(producer, activation, scales, consumers, constants, len(users)):
            folded += 1
        else:
            inverse = numpy_helper.from_array((1.0 / scales).astype(np.float32), f"{activation}_outlier_scale")
            model.graph.initializer.append(inverse)
            muls[activation] = helper.make_node("Mul", [activation, inverse.name], [f"{activation}_outliers_moved"],
                                                name=f"{activation}_OutliersMoved")
            for user in users:
                user.node.input[0] = muls[activation].output[0]
        inputs += 1
        channels += int(moved.sum())
        largest = max(largest, float(scales.max()))
    if muls:  # each Mul goes right after the node that makes its input (graph inputs: first)
        ordered: list[onnx.NodeProto] = [mul for name, mul in muls.items() if name not in producers]
        for node in model.graph.node:
            ordered.append(node)
            ordered.extend(muls[output] for output in node.output if output in muls)
        del model.graph.node[:]
        model.graph.node.extend(ordered)
    return {"threshold": threshold, "inputs": inputs, "channels": channels, "largest_scale": round(largest, 3),
            "muls": len(muls), "folded": folded}


def _fold_into_attention(producer: Optional[onnx.NodeProto], activation: str, scales: np.ndarray,
                         consumers: dict[str, int], constants: dict[str, onnx.TensorProto], readers: int) -> bool:
    """Divide V's weight columns and bias by the scales when `activation` is a fused Attention's output that only
    the GEMMs read (and V's weight and bias are its own)."""
    if (producer is None or producer.op_type != "Attention" or producer.domain != "com.microsoft"
            or producer.output[0] != activation or consumers.get(activation, 0) != readers
            or len(producer.input) < 3 or producer.input[1] not in constants or producer.input[2] not in constants
            or consumers.get(producer.input[1], 0) != 1 or consumers.get(producer.input[2], 0) != 1):
        return False
    weight, bias = constants[producer.input[1]], constants[producer.input[2]]
    columns = _v_columns(producer, scales.size, int(weight.dims[1]))
    if columns is None or list(bias.dims) != [weight.dims[1]]:
        return False
    values, offsets = numpy_helper.to_array(weight).copy(), numpy_helper.to_array(bias).copy()
    values[:, columns] /= scales
    offsets[columns] /= scales
    weight.CopyFrom(numpy_helper.from_array(values, weight.name))
    bias.CopyFrom(numpy_helper.from_array(offsets, bias.name))
    return True


def migrated(fp32_path: Path, out: Path, calibration: Sequence[Batch], threshold: float,
             on_batch: Optional[Callable[[int, int], None]] = None) -> tuple[Path, dict[str, object]]:
    """The FP32 graph at `fp32_path` with its outlier channels moved, saved to `out`."""
    model = onnx.load(str(fp32_path))
    summary = migrate(model, calibration, threshold, on_batch)
    save_model(model, out)
    return out, summary
