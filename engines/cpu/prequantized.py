"""A pre-quantized checkpoint's own 4-bit codes on ONNX Runtime's MatMulNBits: no second rounding.

A GPTQ/AWQ checkpoint (compressed-tensors, GPTQ or AWQ format; read by pipeline/models/prequantized.py)
holds, per Linear, integer codes q in 0..15, a scale and an integer zero point per group of input
channels: W[n, k] = (q[n, k] - z[n, g(k)]) * s[n, g(k)]. MatMulNBits computes exactly that with its
uint8 zero points, so the codes, scales and zero points go into the graph as they are; nothing is
rounded again (scales are the checkpoint's FP16/BF16 values widened to FP32, which is exact).

act-order: ONNX Runtime 1.32's CPU kernel takes no g_idx on its pre-packed path, so the input channels are
permuted instead (engines/checkpoint_linears.py), which keeps the kernel's fast path and is exact. Matching
the export's MatMuls to the checkpoint's Linears is shared with the TensorRT target there too.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from engines.checkpoint_linears import QuantizedLinear, WrittenWeight, rewrite_checkpoint_matmuls
from engines.cpu.block_offset import _pack, _unpack

BITS = 4


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
    permutation = linear.group_order()
    codes = linear.codes if permutation is None else linear.codes[:, permutation]
    blocks = k // size
    return NBitsWeight(_pack(codes.reshape(n, blocks, size).astype(np.uint8)),
                       np.ascontiguousarray(linear.scales[:, :blocks], dtype=np.float32).reshape(-1),
                       _pack(linear.zero_points[:, :blocks].astype(np.uint8)).reshape(-1), size, permutation)


def replace_with_checkpoint(model: onnx.ModelProto, linears: list[QuantizedLinear], skip: set[str],
                            accuracy_level: int) -> dict[str, int]:
    """Replace every MatMul whose constant weight is a checkpoint Linear's de-quantized W^T by MatMulNBits
    with that Linear's codes, in place (nodes named in `skip` are left alone). Returns the counts of
    `rewrite_checkpoint_matmuls`."""

    def write_weight(base: str, linear: QuantizedLinear) -> WrittenWeight:
        nbits = to_nbits(linear)
        return WrittenWeight([numpy_helper.from_array(nbits.packed, f"{base}_Q4"),
                              numpy_helper.from_array(nbits.scales, f"{base}_scales"),
                              numpy_helper.from_array(nbits.zero_points, f"{base}_zero_points")],
                             nbits.scales.size, nbits.permutation, nbits)

    def write_matmul(node: onnx.NodeProto, activation: str, base: str, weight: WrittenWeight) -> onnx.NodeProto:
        nbits: NBitsWeight = weight.payload
        n, blocks, _ = nbits.packed.shape
        return helper.make_node(
            "MatMulNBits", [activation, f"{base}_Q4", f"{base}_scales", f"{base}_zero_points"], [node.output[0]],
            name=f"{node.name}_Q4", domain="com.microsoft", K=blocks * nbits.block_size, N=n, bits=BITS,
            block_size=nbits.block_size, accuracy_level=accuracy_level)

    return rewrite_checkpoint_matmuls(model, linears, skip, write_weight, write_matmul)
