"""A pre-quantized checkpoint's own 4-bit codes on ONNX Runtime's MatMulNBits: no second rounding.

A GPTQ/AWQ checkpoint (compressed-tensors, GPTQ or AWQ format; read by pipeline/models/prequantized.py)
holds, per Linear, integer codes q in 0..15, a scale and an integer zero point per group of input
channels: W[n, k] = (q[n, k] - z[n, g(k)]) * s[n, g(k)]. MatMulNBits computes exactly that with its
uint8 zero points, so the codes, scales and zero points go into the graph as they are; nothing is
rounded again (scales are the checkpoint's FP16/BF16 values widened to FP32, which is exact).

act-order (GPTQ `desc_act`, compressed-tensors `actorder: group`) assigns input channels to groups
out of order (g_idx not k // group). ONNX Runtime 1.32's CPU kernel takes no g_idx on its pre-packed
path, so the input channels are permuted instead: a Gather puts x's channels in group order and the
codes' columns follow (x @ W^T = x[:, p] @ W[:, p]^T), which keeps the kernel's fast path and is exact.

The FP32 export of the de-quantized model holds W^T bit for bit, so each MatMul is matched to its
checkpoint Linear by the bytes of its weight, not by names the exporter does not keep.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from engines.cpu.block_offset import _pack, _unpack
from engines.onnx_io import replace_nodes

BITS = 4


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


def weight_key(transposed: np.ndarray) -> str:
    """Identity of a [K, N] FP32 MatMul weight: the digest of its bytes."""
    return hashlib.sha256(np.ascontiguousarray(transposed, dtype=np.float32).tobytes()).hexdigest()


@dataclass(frozen=True)
class NBitsWeight:
    """MatMulNBits' inputs for one Linear: packed [N, blocks, block/2], scales [N*blocks], zero points
    [N*ceil(blocks/2)], and the input permutation (None when the groups are already in order)."""

    packed: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray
    block_size: int
    permutation: np.ndarray | None

    def dequantize(self) -> np.ndarray:
        """The [N, K] weight MatMulNBits computes with, in the checkpoint's channel order."""
        n, blocks, _ = self.packed.shape
        q = _unpack(self.packed).reshape(n, blocks, self.block_size).astype(np.float32)
        z = _unpack(self.zero_points.reshape(n, -1))[:, :blocks].astype(np.float32)
        values = ((q - z[:, :, None]) * self.scales.reshape(n, blocks)[:, :, None]).reshape(n, -1)
        if self.permutation is None:
            return values
        restored = np.empty_like(values)
        restored[:, self.permutation] = values
        return restored


def to_nbits(linear: QuantizedLinear) -> NBitsWeight:
    """The checkpoint's codes in MatMulNBits' layout (blocks = the checkpoint's groups)."""
    n, k = linear.codes.shape
    size = linear.group_size
    if size < 16 or size & (size - 1):
        raise ValueError(f"{linear.name}: group size {size} is not a power of two >= 16 (MatMulNBits' blocks)")
    if k % size:
        raise ValueError(f"{linear.name}: K={k} is not a multiple of the group size {size}")
    permutation = None
    codes = linear.codes
    groups = linear.groups
    if linear.act_order:
        permutation = np.argsort(groups, kind="stable")
        sorted_groups = groups[permutation]
        if np.any(sorted_groups != np.arange(k) // size):
            raise ValueError(f"{linear.name}: g_idx does not give every group exactly {size} channels")
        codes = codes[:, permutation]
    blocks = k // size
    return NBitsWeight(_pack(codes.reshape(n, blocks, size).astype(np.uint8)),
                       np.ascontiguousarray(linear.scales[:, :blocks], dtype=np.float32).reshape(-1),
                       _pack(linear.zero_points[:, :blocks].astype(np.uint8)).reshape(-1), size, permutation)


def replace_with_checkpoint(model: onnx.ModelProto, linears: list[QuantizedLinear], skip: set[str],
                            accuracy_level: int) -> dict[str, int]:
    """Replace every MatMul whose constant weight is a checkpoint Linear's de-quantized W^T by MatMulNBits
    with that Linear's codes, in place (nodes named in `skip` are left alone). Returns counts: matmuls and
    blocks taken from the checkpoint, act-order matmuls, checkpoint Linears that matched no MatMul."""
    by_key = {weight_key(linear.dequantize().T): linear for linear in linears}
    constants = {tensor.name: tensor for tensor in model.graph.initializer}
    consumers: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    counts = {"checkpoint_matmuls": 0, "checkpoint_blocks": 0, "act_order_matmuls": 0}
    matched: set[str] = set()
    packed: dict[str, NBitsWeight] = {}
    gathers: dict[tuple[str, bytes], str] = {}
    new_nodes: list[onnx.NodeProto] = []
    for node in model.graph.node:
        weight = constants.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
        if (weight is None or node.name in skip or weight.data_type != TensorProto.FLOAT or len(weight.dims) != 2):
            new_nodes.append(node)
            continue
        base = weight.name
        if base not in packed:
            linear = by_key.get(weight_key(numpy_helper.to_array(weight)))
            if linear is None:
                new_nodes.append(node)
                continue
            nbits = to_nbits(linear)
            packed[base] = nbits
            matched.add(linear.name)
            counts["checkpoint_blocks"] += nbits.scales.size
            model.graph.initializer.extend([
                numpy_helper.from_array(nbits.packed, f"{base}_Q4"),
                numpy_helper.from_array(nbits.scales, f"{base}_scales"),
                numpy_helper.from_array(nbits.zero_points, f"{base}_zero_points"),
            ])
        nbits = packed[base]
        k, n = (int(d) for d in weight.dims)
        activation = node.input[0]
        if nbits.permutation is not None:
            key = (activation, nbits.permutation.tobytes())
            if key not in gathers:
                index = f"{base}_act_order"
                model.graph.initializer.append(numpy_helper.from_array(nbits.permutation.astype(np.int64), index))
                gathers[key] = f"{node.name}_act_order_input"
                new_nodes.append(helper.make_node("Gather", [activation, index], [gathers[key]], axis=-1,
                                                  name=f"{node.name}_ActOrder"))
            activation = gathers[key]
            counts["act_order_matmuls"] += 1
        new_nodes.append(helper.make_node(
            "MatMulNBits", [activation, f"{base}_Q4", f"{base}_scales", f"{base}_zero_points"], [node.output[0]],
            name=f"{node.name}_Q4", domain="com.microsoft", K=k, N=n, bits=BITS, block_size=nbits.block_size,
            accuracy_level=accuracy_level))
        consumers[base] -= 1
        counts["checkpoint_matmuls"] += 1
    replace_nodes(model, new_nodes, {name for name, count in consumers.items() if count == 0 and name in constants})
    counts["unmatched_linears"] = len({linear.name for linear in linears} - matched)
    return counts
