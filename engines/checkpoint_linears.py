"""A pre-quantized checkpoint's Linears, and the walk that finds them in an FP32 export.

Both targets put a checkpoint's own codes into the graph: the CPU as MatMulNBits (engines/cpu/prequantized.py),
TensorRT as blocked INT4 DequantizeLinear (engines/trt/int4_weights.py). They share what is here: the Linear
itself, how its act-order groups become an input-channel permutation, and the walk over the graph's MatMuls.

The FP32 export of the de-quantized model holds W^T bit for bit, so each MatMul is matched to its checkpoint
Linear by the bytes of its weight, not by names the exporter does not keep. act-order (GPTQ `desc_act`,
compressed-tensors `actorder: group`) assigns input channels to groups out of order (g_idx not k // group):
a Gather puts x's channels in group order and the codes' columns follow (x @ W^T = x[:, p] @ W[:, p]^T).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from engines.onnx_io import consumer_counts, replace_nodes


@dataclass(frozen=True)
class QuantizedLinear:
    """One Linear of a checkpoint: codes [N, K] uint8 (0..15), scales [N, G] FP32, zero points [N, G] uint8,
    g_idx [K] (the group of each input channel) or None for k // group_size."""

    name: str
    codes: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray
    group_size: int
    g_idx: np.ndarray | None = None

    @property
    def groups(self) -> np.ndarray:
        k = self.codes.shape[1]
        return self.g_idx if self.g_idx is not None else np.arange(k) // self.group_size

    @property
    def act_order(self) -> bool:
        return self.g_idx is not None and bool(np.any(self.g_idx != np.arange(self.codes.shape[1]) // self.group_size))

    def dequantize(self) -> np.ndarray:
        """W [N, K] in FP32: (q - z) * s, the checkpoint's own de-quantization."""
        g = self.groups
        return ((self.codes.astype(np.float32) - self.zero_points[:, g].astype(np.float32))
                * self.scales[:, g]).astype(np.float32)

    def group_order(self) -> Optional[np.ndarray]:
        """The input-channel permutation that puts the groups in order (None when they already are); a g_idx
        whose groups are not all group_size channels is a ValueError."""
        if not self.act_order:
            return None
        k = self.codes.shape[1]
        permutation = np.argsort(self.groups, kind="stable")
        if np.any(self.groups[permutation] != np.arange(k) // self.group_size):
            raise ValueError(f"{self.name}: g_idx does not give every group exactly {self.group_size} channels")
        return permutation


def weight_key(transposed: np.ndarray) -> str:
    """Identity of a [K, N] FP32 MatMul weight: the digest of its bytes."""
    return hashlib.sha256(np.ascontiguousarray(transposed, dtype=np.float32).tobytes()).hexdigest()


@dataclass
class WrittenWeight:
    """What a target wrote for one checkpoint Linear: the graph's new initializers and nodes, the number of
    blocks taken from the checkpoint, the input permutation (None: groups in order) and the target's own
    record of it (handed back to its MatMul writer)."""

    initializers: list[onnx.TensorProto]
    blocks: int
    permutation: Optional[np.ndarray]
    payload: Any
    nodes: list[onnx.NodeProto] = field(default_factory=list)


WeightWriter = Callable[[str, QuantizedLinear], WrittenWeight]  # (weight name, Linear) -> what goes in the graph
# (the MatMul node, its activation after any permutation, weight name, what the writer wrote) -> the new node
MatMulWriter = Callable[[onnx.NodeProto, str, str, WrittenWeight], onnx.NodeProto]


def rewrite_checkpoint_matmuls(model: onnx.ModelProto, linears: list[QuantizedLinear], skip: set[str],
                               write_weight: WeightWriter, write_matmul: MatMulWriter) -> dict[str, int]:
    """Replace every MatMul (2-D FP32 constant weight, not named in `skip`) whose weight is a checkpoint
    Linear's de-quantized W^T, in place: the weight once by `write_weight`, each MatMul by `write_matmul`,
    act-order inputs through one Gather per (activation, permutation). Returns counts: matmuls and blocks
    taken from the checkpoint, act-order matmuls, checkpoint Linears that matched no MatMul."""
    by_key = {weight_key(linear.dequantize().T): linear for linear in linears}
    constants = {tensor.name: tensor for tensor in model.graph.initializer}
    consumers = consumer_counts(model)
    counts = {"checkpoint_matmuls": 0, "checkpoint_blocks": 0, "act_order_matmuls": 0}
    matched: set[str] = set()
    written: dict[str, WrittenWeight] = {}
    gathers: dict[tuple[str, bytes], str] = {}
    new_nodes: list[onnx.NodeProto] = []
    for node in model.graph.node:
        weight = constants.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
        if weight is None or node.name in skip or weight.data_type != TensorProto.FLOAT or len(weight.dims) != 2:
            new_nodes.append(node)
            continue
        base = weight.name
        if base not in written:
            linear = by_key.get(weight_key(numpy_helper.to_array(weight)))
            if linear is None:
                new_nodes.append(node)
                continue
            written[base] = write_weight(base, linear)
            matched.add(linear.name)
            counts["checkpoint_blocks"] += written[base].blocks
            model.graph.initializer.extend(written[base].initializers)
            new_nodes += written[base].nodes
        activation, permutation = node.input[0], written[base].permutation
        if permutation is not None:
            key = (activation, permutation.tobytes())
            if key not in gathers:
                index = f"{base}_act_order"
                model.graph.initializer.append(numpy_helper.from_array(permutation.astype(np.int64), index))
                gathers[key] = f"{node.name}_act_order_input"
                new_nodes.append(helper.make_node("Gather", [activation, index], [gathers[key]], axis=-1,
                                                  name=f"{node.name}_ActOrder"))
            activation = gathers[key]
            counts["act_order_matmuls"] += 1
        new_nodes.append(write_matmul(node, activation, base, written[base]))
        consumers[base] -= 1
        counts["checkpoint_matmuls"] += 1
    replace_nodes(model, new_nodes, {name for name, count in consumers.items() if count == 0 and name in constants})
    counts["unmatched_linears"] = len({linear.name for linear in linears} - matched)
    return counts
