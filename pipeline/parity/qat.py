"""The second, looser parity line of a QAT build: the built graph against the float graph under its Q/DQ.

The first line (the parity report) holds the build to the QAT model's own fake-quantized forward; this one
says what the quantization itself costs against the float weights the QAT model de-quantizes to, held to
the build's ordinary gates (policy.thresholds, what any INT8 build of a float model must keep).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from calibration.batches import load_batches
from pipeline.config import BuildConfig
from pipeline.models.registry import ModelInfo
from pipeline.parity import policy
from pipeline.parity.engine import measure, run_pair


def float_line(float_graph: Path, candidate: Path, heldout: Path, config: BuildConfig,
               model: ModelInfo) -> dict[str, Any]:
    """Metrics and gate checks of `candidate` against `float_graph` on the held-out batches."""
    task = model.task
    batches = load_batches(heldout)
    reference, built = run_pair(float_graph, candidate, batches, task.output_names,
                                simulate_tensorrt=config.target == "trt")
    gates = policy.thresholds(config, task)
    result = measure(task, reference, built, [batch.get("attention_mask") for batch in batches], gates)
    return {
        "reference": "FP32 ONNX: the input graph with its Q/DQ stripped (weights de-quantized exactly)",
        "gates": {f"{output}.{metric}": value for (output, metric), value in gates.items()},
        "primary": result.metrics[task.primary_output].to_dict(),
        "failures": [f"against the float graph: {failure}" for failure in result.failures],
    }
