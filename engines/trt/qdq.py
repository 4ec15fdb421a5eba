"""Explicit quantization for TensorRT 11: QuantizeLinear/DequantizeLinear pairs written into the ONNX graph.

TensorRT 11 has no implicit INT8 or FP8 mode; it runs a layer in INT8/FP8 exactly where the graph
says so. The placement follows what TensorRT fuses: Q/DQ only on the inputs of MatMul, Gemm and
Conv. Weights: stored quantized (INT8 or FLOAT8E4M3FN initializers) with a per-output-channel
DequantizeLinear; activations: a per-tensor QuantizeLinear -> DequantizeLinear pair. All scales are
symmetric: every zero point is 0. A tensor read by several quantized nodes (Q, K and V read one
LayerNorm output) gets one shared pair.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

QUANTIZABLE_OPS = ("MatMul", "Gemm", "Conv")
FP8_MIN_OPSET = 19  # QuantizeLinear/DequantizeLinear with FLOAT8E4M3FN
TYPE_MAX = {"int8": 127.0, "fp8": 448.0}
ELEMENT_TYPE = {"int8": TensorProto.INT8, "fp8": TensorProto.FLOAT8E4M3FN}


@dataclass(frozen=True)
class QuantizableNode:
    name: str
    op_type: str
    activations: tuple[str, ...]  # inputs computed at run time
    weight: str | None  # the constant (initializer) input, if any
    weight_axis: int | None  # its output-channel axis

    @property
    def has_weight(self) -> bool:
        return self.weight is not None


def _weight_axis(node: onnx.NodeProto, rank: int) -> int:
    if node.op_type == "Conv":
        return 0
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return 0 if trans_b else 1
    return rank - 1  # MatMul: [..., K, N], output channels last


def quantizable_nodes(model: onnx.ModelProto, op_types: Sequence[str] = QUANTIZABLE_OPS,
                      weights_only: bool = False) -> list[QuantizableNode]:
    """Every node of `op_types` (MatMul/Gemm/Conv) with float inputs, with which of its inputs is a weight.

    weights_only: only nodes with a constant weight (attention's activation x activation MatMuls stay unquantized)."""
    initializers = {tensor.name: tensor for tensor in model.graph.initializer}
    found = []
    for node in model.graph.node:
        if node.op_type not in op_types:
            continue
        data_inputs = list(node.input[:2])  # input 2 of Gemm/Conv is the bias: never quantized
        weight = next((name for name in data_inputs[1:] if name in initializers), None)
        if weights_only and weight is None:
            continue
        if weight is not None and initializers[weight].data_type != TensorProto.FLOAT:
            continue
        axis = _weight_axis(node, len(initializers[weight].dims)) if weight else None
        activations = tuple(name for name in data_inputs if name and name != weight and name not in initializers)
        found.append(QuantizableNode(node.name, node.op_type, activations, weight, axis))
    return found


def ensure_opset(model: onnx.ModelProto, minimum: int) -> onnx.ModelProto:
    current = next(op.version for op in model.opset_import if op.domain in ("", "ai.onnx"))
    if current >= minimum:
        return model
    return onnx.version_converter.convert_version(model, minimum)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.]+", "_", name).strip("_")


def _quantized_initializer(name: str, values: np.ndarray, precision: str) -> TensorProto:
    if precision == "fp8":
        import ml_dtypes

        return numpy_helper.from_array(values.astype(ml_dtypes.float8_e4m3fn), name)
    return numpy_helper.from_array(np.clip(np.round(values), -127, 127).astype(np.int8), name)


def _zero_point(name: str, precision: str, shape: Sequence[int]) -> TensorProto:
    return _quantized_initializer(name, np.zeros(shape, np.float32), precision)


def weight_scales(weight: np.ndarray, axis: int, precision: str) -> np.ndarray:
    """Per-output-channel symmetric scales: max |w| of the channel over the type's largest value."""
    reduce_axes = tuple(i for i in range(weight.ndim) if i != axis)
    amax = np.max(np.abs(weight), axis=reduce_axes)
    return (np.maximum(amax, 1e-12) / TYPE_MAX[precision]).astype(np.float32)


def insert_qdq(
    model: onnx.ModelProto,
    nodes: Iterable[QuantizableNode],
    activation_amax: Mapping[str, float],
    precision: str,
) -> dict[str, int]:
    """Quantize the given nodes' inputs in place; returns counts of what was inserted."""
    if precision not in TYPE_MAX:
        raise ValueError(f"precision must be int8 or fp8, got '{precision}'")
    graph = model.graph
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    by_name = {node.name: node for node in graph.node}
    weight_nodes: list[onnx.NodeProto] = []
    activation_pairs: dict[str, tuple[str, list[onnx.NodeProto]]] = {}
    quantized_weights: dict[str, str] = {}
    for spec in nodes:
        node = by_name[spec.name]
        if spec.weight is not None:
            if spec.weight not in quantized_weights:
                quantized_weights[spec.weight] = _quantize_weight(
                    graph, initializers[spec.weight], spec.weight_axis, precision, weight_nodes
                )
            _replace_input(node, spec.weight, quantized_weights[spec.weight])
        for tensor in spec.activations:
            if tensor not in activation_pairs:
                activation_pairs[tensor] = _activation_pair(graph, tensor, activation_amax[tensor], precision)
            _replace_input(node, tensor, activation_pairs[tensor][0])
    _place_nodes(graph, weight_nodes, activation_pairs)
    _drop_unused_initializers(graph)
    return {
        "quantized_nodes": len({spec.name for spec in nodes}),
        "quantized_weights": len(quantized_weights),
        "quantized_activations": len(activation_pairs),
    }


def _names_read(graph: onnx.GraphProto) -> set[str]:
    names = set()
    for node in graph.node:
        names.update(node.input)
        for attribute in node.attribute:  # If/Loop/Scan bodies may read outer initializers
            for subgraph in [attribute.g, *attribute.graphs] if attribute.type in (5, 10) else []:
                names |= _names_read(subgraph)
    return names


def _drop_unused_initializers(graph: onnx.GraphProto) -> None:
    """The FP32 originals of quantized weights: keeping them would keep the file at FP32 size."""
    used = _names_read(graph) | {output.name for output in graph.output}
    unused = [index for index, tensor in enumerate(graph.initializer) if tensor.name not in used]
    for index in reversed(unused):  # delete in place: rebuilding the list would copy every weight
        del graph.initializer[index]


def _replace_input(node: onnx.NodeProto, old: str, new: str) -> None:
    for index, name in enumerate(node.input):
        if name == old:
            node.input[index] = new


def _quantize_weight(graph: onnx.GraphProto, tensor: TensorProto, axis: int, precision: str,
                     created: list[onnx.NodeProto]) -> str:
    weight = numpy_helper.to_array(tensor).astype(np.float32)
    scales = weight_scales(weight, axis, precision)
    shape = [1] * weight.ndim
    shape[axis] = -1
    base = _safe(tensor.name)
    graph.initializer.extend([
        _quantized_initializer(f"{base}_quantized", weight / scales.reshape(shape), precision),
        numpy_helper.from_array(scales, f"{base}_scale"),
        _zero_point(f"{base}_zero_point", precision, scales.shape),
    ])
    output = f"{base}_dequantized"
    created.append(helper.make_node(
        "DequantizeLinear", [f"{base}_quantized", f"{base}_scale", f"{base}_zero_point"], [output],
        name=f"{base}_DequantizeLinear", axis=axis,
    ))
    return output


def _activation_pair(graph: onnx.GraphProto, tensor: str, amax: float, precision: str
                     ) -> tuple[str, list[onnx.NodeProto]]:
    base = _safe(tensor)
    scale = np.array(max(amax, 1e-12) / TYPE_MAX[precision], dtype=np.float32)
    graph.initializer.extend([
        numpy_helper.from_array(scale, f"{base}_scale"),
        _zero_point(f"{base}_zero_point", precision, ()),
    ])
    quantized, output = f"{base}_quantized", f"{base}_dequantized"
    pair = [
        helper.make_node("QuantizeLinear", [tensor, f"{base}_scale", f"{base}_zero_point"], [quantized],
                         name=f"{base}_QuantizeLinear"),
        helper.make_node("DequantizeLinear", [quantized, f"{base}_scale", f"{base}_zero_point"], [output],
                         name=f"{base}_DequantizeLinear"),
    ]
    return output, pair


def _place_nodes(graph: onnx.GraphProto, weight_nodes: list[onnx.NodeProto],
                 activation_pairs: dict[str, tuple[str, list[onnx.NodeProto]]]) -> None:
    """Weight DQs first; each activation pair right before the first node that reads it (keeps topological order)."""
    pending = {output: pair for output, pair in activation_pairs.values()}
    ordered = list(weight_nodes)
    for node in graph.node:
        for name in node.input:
            if name in pending:
                ordered.extend(pending.pop(name))
        ordered.append(node)
    del graph.node[:]
    graph.node.extend(ordered)


# Element types TensorRT 11 takes in explicit quantization (INT8, FP8 E4M3, INT4 weight-only).
TRT_QDQ_TYPES = (TensorProto.INT8, TensorProto.FLOAT8E4M3FN, TensorProto.INT4)


@dataclass(frozen=True)
class Placement:
    """A Q/DQ graph read against TensorRT's explicit-quantization rules (the rules `insert_qdq` writes by)."""

    refusals: list[str]  # TensorRT cannot build the graph as it is (asymmetric, per-channel activations, uint8)
    float_ops: list[str]  # DequantizeLinear outputs read by ops TensorRT does not fuse with them: run in float
    partly_quantized: list[str]  # MatMul/Gemm/Conv with some float inputs through a DQ and some not


def placement(model: onnx.ModelProto, op_types: Sequence[str] = QUANTIZABLE_OPS) -> Placement:
    """TensorRT's rules: zero points 0 (symmetric only), INT8/FP8/INT4 types, activations per-tensor;
    a DQ feeds the ops TensorRT fuses into quantized kernels, and such an op reads all its data inputs
    through DQ (the rest is legal but runs in float)."""
    initializers = {tensor.name: tensor for tensor in model.graph.initializer}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    refusals, float_ops = [], []
    dq_outputs = set()
    for node in model.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        label = f"{node.op_type} {node.name or node.output[0]}"
        zero = initializers.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if zero is not None and zero.data_type not in TRT_QDQ_TYPES:
            refusals.append(f"{label}: zero point type {TensorProto.DataType.Name(zero.data_type)} "
                            "(TensorRT takes INT8, FP8 E4M3 or INT4)")
        elif zero is not None and np.any(numpy_helper.to_array(zero).astype(np.float32)):
            refusals.append(f"{label}: zero point not 0 (TensorRT quantizes symmetrically)")
        scale = initializers.get(node.input[1])
        if node.input[0] not in initializers and scale is not None and numpy_helper.to_array(scale).size != 1:
            refusals.append(f"{label}: activation scale of shape {list(scale.dims)} (TensorRT: per-tensor)")
        if node.op_type == "DequantizeLinear":
            dq_outputs.add(node.output[0])
            outside = sorted({r.op_type for r in readers.get(node.output[0], []) if r.op_type not in op_types})
            if outside:
                float_ops.append(f"{label} -> {', '.join(outside)}")
    partly = []
    for node in model.graph.node:
        if node.op_type in op_types:
            through = [name in dq_outputs for name in node.input[:2] if name]
            if any(through) and not all(through):
                partly.append(node.name or node.output[0])
    return Placement(refusals, float_ops, partly)
