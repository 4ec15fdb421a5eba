"""precision (target trt, a symmetric pre-quantized 4-bit decoder): the checkpoint's own INT4 codes and scales.

The FP32 KV-cache export (the de-quantized checkpoint) with every body Linear's MatMul fed by a blocked INT4
DequantizeLinear holding the checkpoint's codes (q - 8) and scales (engines.trt.int4_weights): weight-only,
nothing calibrated, nothing rounded again. Each DequantizeLinear is read back and compared with the
export's FP32 weight bit for bit before the stage finishes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from engines.trt.int4_weights import asymmetric_linears, replace_with_int4
from pipeline.config import BuildConfig
from pipeline.core.errors import InputError, StageError
from pipeline.models.registry import ModelInfo
from pipeline.stages.base import Stage, StageContext
from pipeline.stages.facts import PrecisionFacts

GRAPH_PRECISION = "INT4 weight-only (the checkpoint's codes and scales)"


def dequantized_weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Every DequantizeLinear's FP32 output in the graph, computed from its own initializers ((x - 0) * s,
    blocks along its axis), keyed by the node's name."""
    init = {tensor.name: tensor for tensor in model.graph.initializer}
    found = {}
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in init:
            continue
        attrs = {a.name: a.i for a in node.attribute}
        values = numpy_helper.to_array(init[node.input[0]]).astype(np.float32)
        scales = numpy_helper.to_array(init[node.input[1]]).astype(np.float32)
        axis, block = attrs.get("axis", 1), attrs.get("block_size", 0)
        found[node.name] = (values * np.repeat(scales, block, axis=axis)).astype(np.float32)
    return found


class Int4CheckpointStage(Stage):
    name = "precision"
    facts = PrecisionFacts
    outputs = ("model.onnx", "precision.json")

    def depends_on(self, config: BuildConfig) -> tuple[str, ...]:
        return ("export",)

    def config_slice(self, config: BuildConfig, model: ModelInfo) -> dict[str, Any]:
        return {"weights": "checkpoint int4, blocked DequantizeLinear"}

    def run(self, context: StageContext, out: Path) -> dict[str, Any]:
        from pipeline.models.prequantized import checkpoint_scheme, read_linears

        scheme = checkpoint_scheme(context.model.path)
        if scheme is None or not scheme.symmetric:
            raise InputError(f"{context.model.name} is not a symmetric pre-quantized 4-bit checkpoint")
        linears = read_linears(context.model.path, scheme)[0]
        asymmetric = asymmetric_linears(linears)
        if asymmetric:  # a config saying symmetric over zero points that are not 8
            raise InputError(f"{context.model.name}: {len(asymmetric)} Linear(s) ({asymmetric[0]}, ...) have zero "
                             "points other than 8 though the config says symmetric; TensorRT's DequantizeLinear "
                             "takes none (build with --target cpu)")
        source = context.input("export").path("model.onnx")
        model = onnx.load(str(source))
        before = {tensor.name: numpy_helper.to_array(tensor) for tensor in model.graph.initializer
                  if tensor.data_type == onnx.TensorProto.FLOAT and len(tensor.dims) == 2}
        try:
            counts = replace_with_int4(model, linears)
        except ValueError as exc:
            raise StageError(self.name, str(exc)) from None
        if counts["unmatched_linears"]:
            raise StageError(self.name, f"{counts['unmatched_linears']} checkpoint Linear(s) match no MatMul weight "
                                        "of the export")
        mismatched = [name for name, weight in dequantized_weights(model).items()
                      if name.endswith("_DequantizeLinear") and not np.array_equal(
                          _restore(model, name, weight), before[name[: -len("_DequantizeLinear")]])]
        if mismatched:
            raise StageError(self.name, f"{mismatched[0]} does not give the export's weight bit for bit")
        onnx.save(model, str(out / "model.onnx"))
        context.progress.info(f"{scheme.describe()}: {counts['checkpoint_matmuls']} MatMuls read the checkpoint's "
                              "INT4 codes and scales (blocked DequantizeLinear, weight-only)")
        summary = {
            "precision": GRAPH_PRECISION,
            "graph_precision": GRAPH_PRECISION,
            "scheme": scheme.describe(),
            "scales": "the checkpoint's own, bit for bit (no calibration)",
            "activations": "float (FP32)",
            **counts,
            "dequantize_checked": len(dequantized_weights(model)),
        }
        (out / "precision.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        return {**summary, "onnx_bytes": (out / "model.onnx").stat().st_size}


def _restore(model: onnx.ModelProto, name: str, weight: np.ndarray) -> np.ndarray:
    """A DequantizeLinear's weight back in the export's row order (act-order rows were permuted)."""
    index = name[: -len("_DequantizeLinear")] + "_act_order"
    for tensor in model.graph.initializer:
        if tensor.name == index:
            restored = np.empty_like(weight)
            restored[numpy_helper.to_array(tensor)] = weight
            return restored
    return weight
