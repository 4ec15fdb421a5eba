"""FP16 for TensorRT 11: weights and compute in FP16, the numerically sensitive ops kept in FP32.

TensorRT 11 networks are strongly typed, so FP16 must be written into the graph. The
conversion is ONNX Runtime's float16 converter (onnxruntime.transformers.float16); it
clamps constants into FP16's range (the attention mask's float32-minimum becomes -65504
instead of -inf, so 0 * mask stays 0) and puts Casts around blocked ops. Blocked: LayerNorm
(its mean/variance overflow in FP16, a known TensorRT failure on BERT-like models), Softmax,
Pow and ReduceMean (LayerNorm's statistics when it is exported decomposed). Graph inputs
and outputs keep their types, so the FP16 graph is a drop-in replacement.
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
    topological_sort(converted.graph)
    return converted
