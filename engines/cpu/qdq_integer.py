"""A Q/DQ graph's own scales on ONNX Runtime's CPU integer kernels: no calibration, no re-quantization.

ONNX Runtime's QDQ fusions (level "extended") turn each DequantizeLinear -> MatMul -> QuantizeLinear group
into a QLinearMatMul (DQ -> MatMul with no Q after it into MatMulIntegerToFloat) that reads the same
integer weight, scales and zero points. The fused graph is saved (ONNX Runtime's
`optimized_model_filepath`), so the artifact is the integer graph itself, not a Q/DQ graph that becomes
one at session time, and the saved graph is checked: every scale and zero point its integer kernels read is
the input's, bit for bit (engines.qdq_graph.scale_differences).

What re-rounds: the integer kernels accumulate exactly in int32 and requantize each output once with
the fused multiplier s_a * s_b / s_y; the fake-quantized forward computes the same product in float32 and
rounds it with the next QuantizeLinear. Both round the same real number, so they differ by at most one
quantization step where it lies near a rounding boundary. A Q/DQ group the fusions do not take
(ONNX Runtime 1.32 on x86 fuses int8 x int8 MatMuls only in part) stays DQ -> MatMul: exact fake
quantization in float, named in `float_nodes`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx

from engines.onnx_io import declare_domains
from engines.ort_session import create_session
from engines.qdq_graph import INTEGER_OPS, QDQ_OPS, scale_differences
from pipeline.core.errors import EngineError

QUANTIZED_OPS = ("MatMul", "Gemm", "Conv")  # ops whose Q/DQ inputs the fusions take into integer kernels


def integer_graph(source: Path, target: Path) -> dict[str, Any]:
    """Write the integer graph of `source` (a Q/DQ graph) to `target`; returns what it holds. EngineError
    when a scale or zero point of the integer graph is not the input's."""
    create_session(source, threads=1, optimization="extended", optimized_model_path=target)
    built = onnx.load(str(target))
    declare_domains(built)
    onnx.save(built, str(target))
    checked, differences = scale_differences(onnx.load(str(source)), built)
    if differences:
        raise EngineError(f"the integer graph changed {len(differences)} scale(s) of the input: {differences[0]}")
    integer = [node for node in built.graph.node if node.op_type in INTEGER_OPS and node.op_type not in QDQ_OPS]
    dq_outputs = {node.output[0] for node in built.graph.node if node.op_type == "DequantizeLinear"}
    float_nodes = [node.name for node in built.graph.node
                   if node.op_type in QUANTIZED_OPS and any(name in dq_outputs for name in node.input[:2])]
    counts: dict[str, int] = {}
    for node in integer:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return {"integer_nodes": counts, "float_nodes": float_nodes, "scales_checked": checked,
            "scales": "from the input graph, bit for bit (no calibration, no re-quantization)"}
