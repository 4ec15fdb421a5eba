"""A symmetric pre-quantized checkpoint's own INT4 codes and scales as TensorRT's weight-only blocked Q/DQ.

TensorRT's IDequantizeLayer takes INT4 weights with block quantization along one of the last two axes and
no zero point (or an all-zero one): only symmetric quantization. A symmetric checkpoint (codes q in 0..15
with zero point 8, compressed-tensors' signed codes + 8, torchao's symmetric int8 -8..7 + 8) is exactly
that: W^T[k, n] = (q[n, k] - 8) * s[n, g(k)]. So each body MatMul of the FP32 export (matched to its
checkpoint Linear by the bytes of its de-quantized weight, engines/checkpoint_linears.py) reads

    INT4 initializer [K, N] (q - 8, in -8..7) -> DequantizeLinear(scale [K/group, N], axis 0,
                                                 block_size = group, no zero point) -> MatMul

(opset 21). Activations stay float (weight-only). Scales are the checkpoint's FP16/BF16 values widened to
FP32 (exact), so DequantizeLinear's (x - 0) * scale is the de-quantized export's weight bit for bit.
act-order (g_idx): the same input-channel permutation as the CPU path (a Gather on the activation, the
weight's rows in group order). An asymmetric Linear (any zero point != 8) cannot be written this way.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from engines.checkpoint_linears import QuantizedLinear, WrittenWeight, rewrite_checkpoint_matmuls

SYMMETRIC_ZERO = 8
MIN_OPSET = 21  # blocked DequantizeLinear (block_size) and INT4 tensors


@dataclass(frozen=True)
class Int4Weight:
    """DequantizeLinear's inputs for one Linear: values [K, N] int8 in -8..7 (stored as INT4), scales
    [K / block, N] FP32, and the input permutation (None when the groups are already in order)."""

    values: np.ndarray
    scales: np.ndarray
    block_size: int
    permutation: np.ndarray | None

    def dequantize(self) -> np.ndarray:
        """The [K, N] weight DequantizeLinear computes, rows in the checkpoint's channel order."""
        rows = np.arange(self.values.shape[0]) // self.block_size
        values = (self.values.astype(np.float32) * self.scales[rows]).astype(np.float32)
        if self.permutation is None:
            return values
        restored = np.empty_like(values)
        restored[self.permutation] = values
        return restored


def asymmetric_linears(linears: list[QuantizedLinear]) -> list[str]:
    """The Linears with a zero point other than 8 (TensorRT's DequantizeLinear takes none)."""
    return [linear.name for linear in linears if np.any(linear.zero_points != SYMMETRIC_ZERO)]


def to_int4(linear: QuantizedLinear) -> Int4Weight:
    """The checkpoint's codes as signed INT4 [K, N] blocked along K (blocks = the checkpoint's groups)."""
    n, k = linear.codes.shape
    size = linear.group_size
    if k % size:
        raise ValueError(f"{linear.name}: K={k} is not a multiple of the group size {size}")
    if np.any(linear.zero_points != SYMMETRIC_ZERO):
        raise ValueError(f"{linear.name}: zero points other than {SYMMETRIC_ZERO} (asymmetric)")
    permutation = linear.group_order()
    codes = linear.codes if permutation is None else linear.codes[:, permutation]
    values = (codes.astype(np.int8) - SYMMETRIC_ZERO).T
    scales = np.ascontiguousarray(linear.scales[:, : k // size].T, dtype=np.float32)
    return Int4Weight(np.ascontiguousarray(values), scales, size, permutation)


def _int4_tensor(values: np.ndarray, name: str) -> onnx.TensorProto:
    return helper.make_tensor(name, TensorProto.INT4, list(values.shape), values.reshape(-1).tolist())


def _ensure_opset(model: onnx.ModelProto) -> None:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx") and entry.version < MIN_OPSET:
            raise ValueError(f"the graph is opset {entry.version}; blocked INT4 DequantizeLinear needs {MIN_OPSET}")
    model.ir_version = max(model.ir_version, 10)  # INT4 tensors


def replace_with_int4(model: onnx.ModelProto, linears: list[QuantizedLinear]) -> dict[str, int]:
    """Put every MatMul whose constant weight is a checkpoint Linear's de-quantized W^T behind a blocked INT4
    DequantizeLinear with that Linear's codes and scales, in place. Returns counts: matmuls and blocks taken
    from the checkpoint, act-order matmuls, checkpoint Linears that matched no MatMul."""
    _ensure_opset(model)

    def write_weight(base: str, linear: QuantizedLinear) -> WrittenWeight:
        int4 = to_int4(linear)
        dequantize = helper.make_node("DequantizeLinear", [f"{base}_int4", f"{base}_scale"], [f"{base}_dequantized"],
                                      name=f"{base}_DequantizeLinear", axis=0, block_size=int4.block_size)
        return WrittenWeight([_int4_tensor(int4.values, f"{base}_int4"),
                              numpy_helper.from_array(int4.scales, f"{base}_scale")],
                             int4.scales.size, int4.permutation, int4, [dequantize])

    def write_matmul(node: onnx.NodeProto, activation: str, base: str, weight: WrittenWeight) -> onnx.NodeProto:
        return helper.make_node("MatMul", [activation, f"{base}_dequantized"], list(node.output), name=node.name)

    return rewrite_checkpoint_matmuls(model, linears, set(), write_weight, write_matmul)
