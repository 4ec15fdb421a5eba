"""FP16 for TensorRT 11: weights and compute in FP16, the numerically sensitive ops kept in FP32.

TensorRT 11 networks are strongly typed, so FP16 must be written into the graph. The
conversion is ONNX Runtime's float16 converter (onnxruntime.transformers.float16); it
clamps constants into FP16's range (the attention mask's float32-minimum becomes -65504
instead of -inf, so 0 * mask stays 0) and puts Casts around blocked ops. Blocked: LayerNorm
(its mean/variance overflow in FP16, a known TensorRT failure on BERT-like models), Softmax,
Pow and ReduceMean (LayerNorm's and RMSNorm's statistics when exported decomposed). Graph inputs
and outputs keep their types, so the FP16 graph is a drop-in replacement.

The converter casts every blocked node's output to FP16 even when the next node is blocked too;
such FP32 -> FP16 -> FP32 round trips are removed, so a chain of blocked ops stays FP32 throughout:
RMSNorm's x^2 between Pow and ReduceMean exceeds FP16's 65504 on an LLM's outlier activations
(SmolLM2: |x| > 1000), and the round trip turned it into inf.
"""

from __future__ import annotations

from typing import Sequence

import onnx

FP32_OPS = ("LayerNormalization", "SkipLayerNormalization", "Softmax", "Pow", "ReduceMean")


def topological_sort(graph: onnx.GraphProto) -> None:
    """Order nodes so each comes after the producers of its inputs (the converter appends its Casts)."""
    available = {value.name for value in graph.input} | {tensor.name for tensor in graph.initializer} | {""}
    remaining = list(graph.node)
    ordered: list[onnx.NodeProto] = []
    while remaining:
        ready = [node for node in remaining if all(name in available for name in node.input)]
        if not ready:
            missing = sorted({n for node in remaining for n in node.input if n not in available})[:3]
            raise ValueError(f"graph has a cycle or dangling inputs: {missing}")
        for node in ready:
            available.update(node.output)
        ordered.extend(ready)
        ready_ids = {id(node) for node in ready}
        remaining = [node for node in remaining if id(node) not in ready_ids]
    del graph.node[:]
    graph.node.extend(ordered)


def convert_to_fp16(
    model: onnx.ModelProto, keep_fp32_ops: Sequence[str] = FP32_OPS, keep_fp32_nodes: Sequence[str] = ()
) -> onnx.ModelProto:
    from onnxruntime.transformers.float16 import convert_float_to_float16

    converted = convert_float_to_float16(
        model, keep_io_types=True, op_block_list=list(keep_fp32_ops), node_block_list=list(keep_fp32_nodes),
    )
    drop_fp16_round_trips(converted.graph)
    topological_sort(converted.graph)
    return converted


def _cast_to(node: onnx.NodeProto) -> int:
    return next((attribute.i for attribute in node.attribute if attribute.name == "to"), -1)


def drop_fp16_round_trips(graph: onnx.GraphProto) -> int:
    """Readers of Cast(FLOAT)(Cast(FLOAT16)(x)) with x FP32 read x itself; unused Casts go. Returns readers rewired."""
    fp32 = {value.name for value in [*graph.value_info, *graph.input]
            if value.type.tensor_type.elem_type == onnx.TensorProto.FLOAT}
    producers = {name: node for node in graph.node for name in node.output}
    rewired = 0
    for node in graph.node:
        for index, name in enumerate(node.input):
            back = producers.get(name)
            down = producers.get(back.input[0]) if back is not None and back.op_type == "Cast" else None
            if (down is not None and down.op_type == "Cast" and _cast_to(back) == onnx.TensorProto.FLOAT
                    and _cast_to(down) == onnx.TensorProto.FLOAT16 and down.input[0] in fp32):
                node.input[index] = down.input[0]
                rewired += 1
    while True:  # remove Casts nobody reads any more (the FP16 copy may still feed FP16 nodes: then it stays)
        read = {name for node in graph.node for name in node.input} | {value.name for value in graph.output}
        unused = [i for i, node in enumerate(graph.node) if node.op_type == "Cast" and not set(node.output) & read]
        if not unused:
            return rewired
        for index in reversed(unused):
            del graph.node[index]
