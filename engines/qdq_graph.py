"""Graphs that already carry QuantizeLinear/DequantizeLinear (a QAT export): what their Q/DQ hold, the
float graph under them, and whether a graph built from one kept its scales bit for bit.

A Q/DQ node's scale (input 1) and zero point (input 2) are its learned quantization; they must be constant
initializers (a scale computed at run time is not a learned one, and nothing here could keep it).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
# ONNX Runtime's integer kernels (what its QDQ fusions turn Q/DQ pairs into on the CPU): inputs that are
# scales or zero points, by position.
INTEGER_OPS: dict[str, tuple[int, ...]] = {
    "QLinearMatMul": (1, 2, 4, 5, 6, 7),
    "QLinearConv": (1, 2, 4, 5, 6, 7),
    "MatMulIntegerToFloat": (2, 3, 4, 5),
    "QLinearAdd": (1, 2, 4, 5, 6, 7),
    "QLinearMul": (1, 2, 4, 5, 6, 7),
    "QGemm": (1, 2, 4, 5, 7, 8),
    "QLinearSoftmax": (1, 2, 3, 4),
    "QLinearSigmoid": (1, 2, 3, 4),
    "QLinearLeakyRelu": (1, 2, 3, 4),
    "QLinearConcat": (),  # variadic (scale, zero point, tensor) triples: compared by initializer name below
    "QLinearAveragePool": (1, 2, 3, 4),
    "QLinearGlobalAveragePool": (1, 2, 3, 4),
    "QLinearReduceMean": (1, 2, 3, 4),
    "QuantizeLinear": (1, 2),
    "DequantizeLinear": (1, 2),
}


@dataclass(frozen=True)
class QdqSummary:
    quantize: int  # QuantizeLinear nodes
    dequantize: int  # DequantizeLinear nodes
    weights: int  # DequantizeLinear nodes of a stored (integer) weight
    scales: int  # distinct scale initializers

    def to_dict(self) -> dict[str, int]:
        return {"quantize_linear": self.quantize, "dequantize_linear": self.dequantize,
                "quantized_weights": self.weights, "scales": self.scales}


def _initializers(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {tensor.name: tensor for tensor in model.graph.initializer}


def summarize(model: onnx.ModelProto) -> QdqSummary:
    initializers = _initializers(model)
    qdq = [node for node in model.graph.node if node.op_type in QDQ_OPS]
    weights = sum(1 for node in qdq if node.op_type == "DequantizeLinear" and node.input[0] in initializers)
    scales = {node.input[1] for node in qdq}
    return QdqSummary(sum(1 for node in qdq if node.op_type == "QuantizeLinear"),
                      sum(1 for node in qdq if node.op_type == "DequantizeLinear"), weights, len(scales))


def scale_problems(model: onnx.ModelProto) -> list[str]:
    """Why the graph's Q/DQ are not learned constants a build can keep: a scale or zero point that is not an
    initializer (computed at run time, or a Constant node), or a scale that is not finite and positive."""
    initializers = _initializers(model)
    problems = []
    for node in model.graph.node:
        if node.op_type not in QDQ_OPS:
            continue
        for position in (1, 2):
            if position < len(node.input) and node.input[position] and node.input[position] not in initializers:
                what = "scale" if position == 1 else "zero point"
                problems.append(f"{node.op_type} {node.name or node.output[0]}: its {what} {node.input[position]!r} "
                                "is not an initializer")
        if node.input[1] in initializers:
            scale = numpy_helper.to_array(initializers[node.input[1]]).astype(np.float64)
            if scale.size == 0 or not np.all(np.isfinite(scale)) or not np.all(scale > 0):
                problems.append(f"{node.op_type} {node.name or node.output[0]}: scale {node.input[1]!r} is not "
                                "finite and positive")
    return problems


def _dequantized(node: onnx.NodeProto, initializers: dict[str, onnx.TensorProto]) -> np.ndarray:
    values = numpy_helper.to_array(initializers[node.input[0]]).astype(np.float32)
    scale = numpy_helper.to_array(initializers[node.input[1]]).astype(np.float32)
    zero = (numpy_helper.to_array(initializers[node.input[2]]).astype(np.float32)
            if len(node.input) > 2 and node.input[2] else np.zeros_like(scale))
    if scale.ndim == 1 and values.ndim > 1:  # per-axis
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        shape = [1] * values.ndim
        shape[axis] = -1
        scale, zero = scale.reshape(shape), zero.reshape(shape)
    return (values - zero) * scale


def strip_qdq(model: onnx.ModelProto) -> onnx.ModelProto:
    """The float graph under the Q/DQ: a stored weight's DequantizeLinear becomes its de-quantized float
    initializer ((q - z) * s, exact), an activation's Q -> DQ pair is bypassed (no rounding, no clipping)."""
    model = copy.deepcopy(model)
    graph = model.graph
    initializers = _initializers(model)
    producers = {output: node for node in graph.node for output in node.output}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    graph_outputs = {value.name for value in graph.output}
    renamed: dict[str, str] = {}
    kept: list[onnx.NodeProto] = []
    added: list[onnx.TensorProto] = []
    for node in graph.node:
        source = producers.get(node.input[0]) if node.op_type == "DequantizeLinear" else None
        if node.op_type == "DequantizeLinear" and node.input[0] in initializers:
            added.append(numpy_helper.from_array(_dequantized(node, initializers), node.output[0]))
        elif source is not None and source.op_type == "QuantizeLinear":
            renamed[node.output[0]] = source.input[0]
        elif node.op_type == "QuantizeLinear" and node.output[0] not in graph_outputs and all(
                reader.op_type == "DequantizeLinear" for reader in readers.get(node.output[0], [])):
            continue  # read only by the DequantizeLinear nodes bypassed above
        else:
            kept.append(node)
    for node in kept:
        for index, name in enumerate(node.input):
            while name in renamed:
                name = renamed[name]
            node.input[index] = name
    for value in graph.output:
        if value.name in renamed:  # a graph output behind a Q/DQ pair: keep its name through an Identity
            kept.append(onnx.helper.make_node("Identity", [renamed[value.name]], [value.name]))
    read = {name for node in kept for name in node.input}
    initializer_list = [t for t in graph.initializer if t.name in read] + [t for t in added if t.name in read]
    del graph.initializer[:]
    graph.initializer.extend(initializer_list)
    del graph.node[:]
    graph.node.extend(_topological(kept, {t.name for t in initializer_list} | {v.name for v in graph.input}))
    return model


def _topological(nodes: list[onnx.NodeProto], available: set[str]) -> list[onnx.NodeProto]:
    ordered, pending, known = [], list(nodes), set(available) | {""}
    while pending:
        ready = [node for node in pending if all(name in known for name in node.input)]
        if not ready:
            stuck = pending[0].name or pending[0].op_type
            raise ValueError(f"the graph has a cycle or reads undefined tensors ({stuck})")
        for node in ready:
            ordered.append(node)
            known.update(node.output)
        pending = [node for node in pending if node not in ready]
    return ordered


def _same(a: onnx.TensorProto, b: onnx.TensorProto) -> bool:
    left, right = numpy_helper.to_array(a), numpy_helper.to_array(b)
    return left.dtype == right.dtype and left.shape == right.shape and left.tobytes() == right.tobytes()


def scale_differences(source: onnx.ModelProto, built: onnx.ModelProto) -> tuple[int, list[str]]:
    """(scales and zero points checked, differences): every scale or zero point a quantized node of `built`
    reads (Q/DQ, ONNX Runtime's integer kernels) must be an initializer of `source` with the same name and
    the same bytes (dtype, shape, values), and every initializer both graphs name must be bit-identical."""
    mine, theirs = _initializers(built), _initializers(source)
    differences = [f"initializer {name!r} differs from the input's" for name in sorted(set(mine) & set(theirs))
                   if not _same(mine[name], theirs[name])]
    checked: set[str] = set()
    for node in built.graph.node:
        positions = INTEGER_OPS.get(node.op_type)
        if positions is None:
            continue
        if node.op_type == "QLinearConcat":
            positions = tuple(range(1, len(node.input)))  # y_scale, y_zp, then (tensor, scale, zp) triples
        for position in positions:
            if position >= len(node.input) or not node.input[position]:
                continue
            name = node.input[position]
            if name not in mine:
                if node.op_type == "QLinearConcat":
                    continue  # a tensor input of the concatenation, not a scale
                differences.append(f"{node.op_type} {node.name}: {name!r} is not a constant")
            elif name not in theirs:
                differences.append(f"{node.op_type} {node.name}: scale/zero point {name!r} is not the input's")
            else:
                checked.add(name)
    return len(checked), differences
