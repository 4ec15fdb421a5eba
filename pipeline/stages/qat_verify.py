"""verify, for a Q/DQ ONNX input (a QAT export).

CPU: the integer graph against the QAT model's own fake-quantized forward (the input graph run by ONNX
Runtime with its QDQ fusions off: session.disable_quant_qdq), held to policy.qat_thresholds; the float graph
under the Q/DQ is a second, looser line (pipeline.parity.qat), recorded in the stage's metrics and gated too.

TensorRT: the Q/DQ are passed through byte for byte, so the graph against its own fake-quantized forward would
compare a graph with itself. The pass-through is checked by its hash instead, and the parity report holds the
simulated graph to the float graph under its Q/DQ at the build's ordinary gates.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from pipeline.core.errors import StageError
from pipeline.parity import policy
from pipeline.parity.qat import float_line
from pipeline.parity.verification import run_parity
from pipeline.reports.write import write_reports
from pipeline.stages.base import StageContext
from pipeline.stages.qdq_input import FLOAT_GRAPH
from pipeline.stages.verify import VerifyStage, parity_inputs

CANDIDATES = {
    "quantize": "INT8 ONNX: ONNX Runtime's integer kernels with the QAT graph's own scales (CPU)",
    "precision": "the QAT graph's Q/DQ passed through for TensorRT, simulated in ONNX Runtime (CPU)",
}


class QatVerifyStage(VerifyStage):
    version = 2

    def __init__(self, candidate: str) -> None:
        super().__init__(reference="export", candidate=candidate)

    def run(self, context: StageContext, out: Path) -> dict[str, Any]:
        if self.candidate == "precision":
            return self._run_pass_through(context, out)
        inputs = dataclasses.replace(
            parity_inputs(context, self.reference, self.candidate),
            reference_description="the QAT model's fake-quantized forward (its Q/DQ graph, exact fake "
                                  "quantization in ONNX Runtime)",
            candidate_description=CANDIDATES[self.candidate], fake_quant_reference=True,
        )
        config, model = context.config, context.model
        report = run_parity(inputs, config, model, context.progress, gates=policy.qat_thresholds(config, model.task))
        write_reports(report, out)
        context.progress.info("second line: against the float graph under the Q/DQ")
        loose = float_line(context.input("export").path(FLOAT_GRAPH), inputs.candidate, inputs.heldout, config, model)
        primary = report.outputs[model.task.primary_output]
        failures = report.failures + loose["failures"]
        context.progress.info(
            f"{model.task.primary_output}: cosine mean {primary.cosine_mean:.6f} against the fake-quantized forward, "
            f"{loose['primary']['cosine_mean']:.4f} against the float graph"
            + (f"; FAILED: {'; '.join(failures)}" if failures else "; passed"))
        return {"passed": not failures, "failures": failures, "primary": primary.values(), "float_reference": loose}

    def _run_pass_through(self, context: StageContext, out: Path) -> dict[str, Any]:
        config, model = context.config, context.model
        export = context.input("export")
        inputs = dataclasses.replace(
            parity_inputs(context, self.reference, self.candidate),
            reference=export.path(FLOAT_GRAPH), reference_sha256=export.files[FLOAT_GRAPH],
            reference_description="FP32 ONNX: the input graph with its Q/DQ stripped (weights de-quantized exactly)",
            candidate_description=CANDIDATES[self.candidate],
        )
        if inputs.candidate_sha256 != export.files["model.onnx"]:  # the pass-through is the claim
            raise StageError(self.name, "the TensorRT graph is not the input's Q/DQ graph byte for byte")
        report = run_parity(inputs, config, model, context.progress, gates=policy.thresholds(config, model.task))
        write_reports(report, out)
        primary = report.outputs[model.task.primary_output]
        context.progress.info(
            f"{model.task.primary_output}: cosine mean {primary.cosine_mean:.4f} against the float graph, Q/DQ "
            "passed through byte for byte" + (f"; FAILED: {'; '.join(report.failures)}" if report.failures else "; passed"))
        return {"passed": not report.failures, "failures": report.failures, "primary": primary.values(),
                "pass_through_identical": True}
