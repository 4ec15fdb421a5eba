"""The parity engine: the FP32 graph (reference) and a built artifact (candidate) run side by side.

Both graphs run in ONNX Runtime through Polygraphy's runners
(`OnnxrtRunner(SessionFromOnnx(...))`) and `Comparator.run`, streamed one
held-out batch at a time; the outputs are then compared per output by
`pipeline.parity.metrics`. Every backend is a runner, so a TensorRT candidate is a
different runner over the same data loader.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import numpy as np

from pipeline.models.registry import TaskSpec
from pipeline.parity.gates import Check
from pipeline.parity.metrics import TASK_METRICS, OutputMetrics, compare_output, evaluate

Batch = dict[str, np.ndarray]


@dataclass
class ParityResult:
    metrics: dict[str, OutputMetrics]
    checks: list[Check]

    @property
    def failures(self) -> list[str]:
        return [check.description for check in self.checks if not check.passed]


def onnx_runner(model: object, name: str, simulate_tensorrt: bool = False):
    """A Polygraphy runner for an ONNX path (or a Polygraphy loader that returns model bytes).

    simulate_tensorrt: the session of engines.ort_session for graphs meant for TensorRT (Q/DQ as exact
    fake quantization, no integer kernels); otherwise Polygraphy's own ONNX Runtime session.
    """
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx

    if simulate_tensorrt:
        from engines.ort_session import create_session

        return OnnxrtRunner(lambda: create_session(model if isinstance(model, Path) else model(),
                                                   simulate_tensorrt=True), name=name)
    return OnnxrtRunner(SessionFromOnnx(str(model) if isinstance(model, Path) else model, providers=["cpu"]), name=name)


def stream_pair(reference: object, candidate: object, batches: Sequence[Batch],
                simulate_tensorrt: bool = False, fake_quant_reference: bool = False) -> Iterator[tuple[Batch, Batch]]:
    """(reference outputs, candidate outputs) for each batch, one batch in memory at a time.

    fake_quant_reference: the reference alone runs as exact fake quantization (a QAT graph's own forward,
    against the CPU integer graph built from it)."""
    from polygraphy.comparator import Comparator
    from polygraphy.logger import G_LOGGER

    runners = [onnx_runner(reference, "reference", simulate_tensorrt or fake_quant_reference),
               onnx_runner(candidate, "candidate", simulate_tensorrt)]
    if isinstance(reference, Path):  # batches may hold inputs the graph does not read (a DeBERTa's token types)
        from engines.onnx_io import graph_input_names

        names = set(graph_input_names(reference))
        batches = [{name: value for name, value in batch.items() if name in names} for batch in batches]
    with G_LOGGER.verbosity(G_LOGGER.ERROR):
        for run_results in Comparator.run(runners, data_loader=list(batches), streaming=True):
            ref, cand = (iterations[0] for _, iterations in run_results)
            # Copied: in streaming mode a runner may reuse its output buffers.
            yield ({k: np.array(v, copy=True) for k, v in ref.items()},
                   {k: np.array(v, copy=True) for k, v in cand.items()})


def run_pair(
    reference: Path,
    candidate: Path,
    batches: Sequence[Batch],
    output_names: Sequence[str],
    on_batch: Optional[Callable[[int, int], None]] = None,
    simulate_tensorrt: bool = False,
    fake_quant_reference: bool = False,
) -> tuple[dict[str, list[np.ndarray]], dict[str, list[np.ndarray]]]:
    """Both graphs on every batch; returns (reference, candidate) outputs, one array per batch."""
    collected: tuple[dict[str, list], dict[str, list]] = ({n: [] for n in output_names}, {n: [] for n in output_names})
    pairs = stream_pair(reference, candidate, batches, simulate_tensorrt, fake_quant_reference)
    for index, outputs in enumerate(pairs, start=1):
        for produced, store in zip(outputs, collected):
            for name in output_names:
                store[name].append(produced[name])
        if on_batch:
            on_batch(index, len(batches))
    return collected


def measure(
    task: TaskSpec,
    reference_outputs: dict[str, list[np.ndarray]],
    candidate_outputs: dict[str, list[np.ndarray]],
    masks: Sequence[Optional[np.ndarray]],
    thresholds: dict[tuple[str, str], float],
    labels: Optional[np.ndarray] = None,
    labelled: Optional[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]] = None,
) -> ParityResult:
    """Per-output metrics, task metrics (label accuracy, ...) and every gate checked."""
    classification = task.classifier
    metrics = {
        name: compare_output(name, reference_outputs[name], candidate_outputs[name], masks,
                             classification and name == "logits")
        for name in task.output_names
    }
    task_metrics = TASK_METRICS.get(task.name)
    if task_metrics is not None and labelled is not None:
        for name, values in task_metrics(labelled[0], labelled[1], labels).items():
            metrics[name].extra.update(values)
    return ParityResult(metrics, evaluate(metrics, thresholds))
