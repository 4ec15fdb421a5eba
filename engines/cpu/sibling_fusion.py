"""MatMulNBits that read the same input (gate and up, or q, k and v of an unfused graph) as one node and a Split.

MatMulNBits computes every output column from the same quantized activation blocks, so stacking the weights of
siblings along N gives bit-identical outputs; one larger node costs less than several in a decode step, where
per-node overhead and the split of work over threads weigh more than the arithmetic. Measured on SmolLM2's default
graph (gate/up stacked, AVX-512 VNNI, 2 threads): logits identical, decode 1.04-1.06x in A/B scripts and 0.99-1.02x
in `pipeline bench-peers-llm` (README): a few percent at most.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx
from onnx import helper, numpy_helper

from engines.onnx_io import replace_nodes

# Attributes that must match for two MatMulNBits to share one kernel (N is what stacking adds up).
_SHARED_ATTRIBUTES = ("K", "bits", "block_size", "accuracy_level")


def _attributes(node: onnx.NodeProto) -> dict[str, int]:
    return {attribute.name: int(helper.get_attribute_value(attribute)) for attribute in node.attribute}


def _signature(node: onnx.NodeProto, constants: dict[str, onnx.TensorProto]) -> tuple | None:
    """What siblings must share: the input, the kernel attributes and which constant inputs they carry
    (weights, scales, optional zero points; no g_idx or bias). None when the node cannot be stacked."""
    if node.op_type != "MatMulNBits" or len(node.input) > 4:
        return None
    if not all(name in constants for name in node.input[1:] if name):
        return None
    attributes = _attributes(node)
    if any(name not in attributes for name in ("K", "N", "bits", "block_size")):
        return None
    shared = tuple(attributes.get(name, 0) for name in _SHARED_ATTRIBUTES)
    with_zero_points = len(node.input) == 4 and bool(node.input[3])
    return (node.input[0], shared, with_zero_points)


def fuse_sibling_matmulnbits(model: onnx.ModelProto) -> int:
    """Stack MatMulNBits siblings (same input, same kernel attributes) into one node followed by a Split.
    Returns the nodes removed."""
    graph = model.graph
    constants = {tensor.name: tensor for tensor in graph.initializer}
    groups: dict[tuple, list[onnx.NodeProto]] = defaultdict(list)
    for node in graph.node:
        signature = _signature(node, constants)
        if signature is not None:
            groups[signature].append(node)
    stacked: dict[int, list[onnx.NodeProto]] = {}  # id of a group's first node -> the stacked node and its Split
    dropped: set[int] = set()  # ids of the other siblings
    for (_, _, with_zero_points), siblings in groups.items():
        if len(siblings) < 2:
            continue
        first = siblings[0]
        widths = [_attributes(node)["N"] for node in siblings]
        stacked_inputs = [first.input[0]]
        for slot in range(1, 4 if with_zero_points else 3):
            parts = [numpy_helper.to_array(constants[node.input[slot]]) for node in siblings]
            # Weights [N, blocks, bytes], scales and zero points [N * x] or [N, x]: rows stack along N.
            rows = np.concatenate([part.reshape(width, -1) for part, width in zip(parts, widths)], axis=0)
            name = f"{first.name}_siblings_{slot}"
            graph.initializer.append(numpy_helper.from_array(rows.reshape(-1, *parts[0].shape[1:]), name))
            stacked_inputs.append(name)
        fused_output = f"{first.name}_siblings_output"
        sizes = f"{first.name}_siblings_sizes"
        graph.initializer.append(numpy_helper.from_array(np.array(widths, np.int64), sizes))
        stacked[id(first)] = [
            helper.make_node("MatMulNBits", stacked_inputs, [fused_output], name=f"{first.name}_siblings",
                             domain=first.domain, **{**_attributes(first), "N": sum(widths)}),
            helper.make_node("Split", [fused_output, sizes], [node.output[0] for node in siblings],
                             name=f"{first.name}_siblings_split", axis=-1),
        ]
        dropped.update(id(node) for node in siblings[1:])
    if not stacked:
        return 0
    # The stacked node sits where the first sibling was: after the input's producer, before every sibling's consumer.
    nodes = [new for node in graph.node if id(node) not in dropped for new in stacked.get(id(node), [node])]
    used = {name for node in nodes for name in node.input}
    replace_nodes(model, nodes, {tensor.name for tensor in graph.initializer if tensor.name not in used})
    return len(dropped)
