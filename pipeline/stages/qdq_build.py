"""The quantized graph of a Q/DQ ONNX input (a QAT export), from the input's own scales: never re-calibrated.

quantize (target cpu): ONNX Runtime's integer graph of the Q/DQ graph (engines.cpu.qdq_integer), every
scale and zero point checked against the input's. precision (target trt): the Q/DQ graph passed through
unchanged (byte for byte), read against TensorRT's placement rules (engines.trt.qdq.placement).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import onnx

from engines.cpu.qdq_integer import integer_graph
from engines.qdq_graph import scale_differences
from engines.trt.qdq import placement
from pipeline.config import BuildConfig
from pipeline.core.errors import EngineError, StageError
from pipeline.models.registry import ModelInfo
from pipeline.stages.base import Stage, StageContext
from pipeline.stages.facts import PrecisionFacts, QuantizeFacts


class QdqIntegerStage(Stage):
    name = "quantize"
    facts = QuantizeFacts
    outputs = ("model.onnx",)

    def depends_on(self, config: BuildConfig) -> tuple[str, ...]:
        return ("export",)

    def run(self, context: StageContext, out: Path) -> dict[str, Any]:
        source = context.input("export").path("model.onnx")
        context.progress.info("fusing the graph's Q/DQ into ONNX Runtime's integer kernels, with its own scales")
        try:
            summary = integer_graph(source, out / "model.onnx")
        except EngineError as exc:
            raise StageError(self.name, exc.message) from None
        if summary["float_nodes"]:
            context.progress.info(f"{len(summary['float_nodes'])} quantized node(s) stay fake-quantized in float "
                                  "(ONNX Runtime fuses no integer kernel for them)")
        return {**summary, "excluded_nodes": list(summary["float_nodes"]), "fallback": None,
                "onnx_bytes": (out / "model.onnx").stat().st_size}


class QdqPassThroughStage(Stage):
    name = "precision"
    facts = PrecisionFacts
    version = 2  # 2: graph_precision, so the bundle does not label the graph with --precision's default
    outputs = ("model.onnx", "precision.json")

    def depends_on(self, config: BuildConfig) -> tuple[str, ...]:
        return ("export",)

    def config_slice(self, config: BuildConfig, model: ModelInfo) -> dict[str, Any]:
        return {"qdq_ops": list(model.architecture.trt_qdq_ops)}

    def run(self, context: StageContext, out: Path) -> dict[str, Any]:
        source = context.input("export").path("model.onnx")
        shutil.copyfile(source, out / "model.onnx")  # TensorRT reads the Q/DQ as they are
        model = onnx.load(str(out / "model.onnx"))
        checked, differences = scale_differences(onnx.load(str(source)), model)
        if differences:
            raise StageError(self.name, f"changed a scale of the input: {differences[0]}")
        rules = placement(model, context.model.architecture.trt_qdq_ops)  # refusals: refused at plan time
        dq_outputs = {node.output[0] for node in model.graph.node if node.op_type == "DequantizeLinear"}
        unquantized = [node.name for node in model.graph.node if node.op_type in context.model.architecture.trt_qdq_ops
                       and not any(name in dq_outputs for name in node.input[:2])]
        summary = {
            "precision": "the input's Q/DQ (passed through)",
            "graph_precision": "the input's Q/DQ (passed through)",
            "scales": "the input graph's own, bit for bit (no calibration)",
            "scales_checked": checked,
            "float_after_dequantize": rules.float_ops,
            "partly_quantized": rules.partly_quantized,
            "kept_higher_precision": unquantized,
        }
        (out / "precision.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        if rules.float_ops or rules.partly_quantized:
            context.progress.info(f"TensorRT placement: {len(rules.float_ops)} DQ read by unfused ops, "
                                  f"{len(rules.partly_quantized)} node(s) partly quantized (legal; they run in float)")
        return {**summary, "onnx_bytes": (out / "model.onnx").stat().st_size}

