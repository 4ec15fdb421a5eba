"""A symmetric pre-quantized checkpoint's own INT4 codes and scales as TensorRT's weight-only blocked Q/DQ.

TensorRT's IDequantizeLayer takes INT4 weights with block quantization along one of the last two axes and
no zero point (or an all-zero one): only symmetric quantization. A symmetric checkpoint (codes q in 0..15
with zero point 8, compressed-tensors' signed codes + 8, torchao's symmetric int8 -8..7 + 8) is exactly
that: W^T[k, n] = (q[n, k] - 8) * s[n, g(k)]. So each body MatMul of the FP32 export (matched to its
checkpoint Linear by the bytes of its de-quantized weight, as engines/cpu/prequantized.py does) reads

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

from engines.cpu.prequantized import QuantizedLinear, weight_key
from engines.onnx_io import replace_nodes

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
    codes, permutation = linear.codes, None
    if linear.act_order:
        permutation = np.argsort(linear.groups, kind="stable")
        if np.any(linear.groups[permutation] != np.arange(k) // size):
            raise ValueError(f"{linear.name}: g_idx does not give every group exactly {size} channels")
        codes = codes[:, permutation]
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
    by_key = {weight_key(linear.dequantize().T): linear for linear in linears}
    constants = {tensor.name: tensor for tensor in model.graph.initializer}
    consumers: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    counts = {"checkpoint_matmuls": 0, "checkpoint_blocks": 0, "act_order_matmuls": 0}
    matched: set[str] = set()
    written: dict[str, Int4Weight] = {}
    gathers: dict[tuple[str, bytes], str] = {}
    new_nodes: list[onnx.NodeProto] = []
    for node in model.graph.node:
        weight = constants.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
        if weight is None or weight.data_type != TensorProto.FLOAT or len(weight.dims) != 2:
            new_nodes.append(node)
            continue
        base = weight.name
        if base not in written:
            linear = by_key.get(weight_key(numpy_helper.to_array(weight)))
            if linear is None:
                new_nodes.append(node)
                continue
            int4 = to_int4(linear)
            written[base] = int4
            matched.add(linear.name)
            counts["checkpoint_blocks"] += int4.scales.size
            model.graph.initializer.extend([_int4_tensor(int4.values, f"{base}_int4"),
                                            numpy_helper.from_array(int4.scales, f"{base}_scale")])
            new_nodes.append(helper.make_node("DequantizeLinear", [f"{base}_int4", f"{base}_scale"],
                                              [f"{base}_dequantized"], name=f"{base}_DequantizeLinear",
                                              axis=0, block_size=int4.block_size))
        int4 = written[base]
        activation = node.input[0]
        if int4.permutation is not None:
            key = (activation, int4.permutation.tobytes())
            if key not in gathers:
                index = f"{base}_act_order"
                model.graph.initializer.append(numpy_helper.from_array(int4.permutation.astype(np.int64), index))
                gathers[key] = f"{node.name}_act_order_input"
                new_nodes.append(helper.make_node("Gather", [activation, index], [gathers[key]], axis=-1,
                                                  name=f"{node.name}_ActOrder"))
            activation = gathers[key]
            counts["act_order_matmuls"] += 1
        new_nodes.append(helper.make_node("MatMul", [activation, f"{base}_dequantized"], list(node.output),
                                          name=node.name))
        consumers[base] -= 1
        counts["checkpoint_matmuls"] += 1
    replace_nodes(model, new_nodes, {name for name, count in consumers.items() if count == 0 and name in constants})
    counts["unmatched_linears"] = len({linear.name for linear in linears} - matched)
    return counts
