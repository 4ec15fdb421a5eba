"""Accuracy-driven mixed precision: keep the most sensitive nodes in FP32 until a tolerable loss holds.

Sensitivity is measured, not guessed: each quantizable node's quantized form is cut out of the
INT8 graph (the quantizers keep the names of the tensors around it) and put alone into the FP32
graph; the drop of the tuning metric is that node's cost. The search then excludes nodes in that
order, re-quantizing and re-measuring after each, and stops at the first configuration
within the tolerable loss (or after max_nodes).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import onnx

from engines.parallel import parallel_map, width

Batch = dict[str, np.ndarray]
QUANTIZABLE_OP_TYPES = ("MatMul", "Gemm", "Attention", "EmbedLayerNormalization", "Gather", "Conv")
# Ops whose presence in a node's region of the INT8 graph means the node was quantized.
QUANTIZED_OP_TYPES = {
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "ConvInteger",
    "QLinearMatMul", "QLinearConv", "QGemm", "QAttention", "QEmbedLayerNormalization", "QGather",
    "DynamicQuantizeMatMul", "MatMulIntegerToFloat",
}


@dataclass
class Trial:
    excluded: list[str]
    metric: float


@dataclass
class FallbackResult:
    excluded: list[str]
    metric: float
    met: bool
    ranking: list[tuple[str, float]]
    trials: list[Trial] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        return {
            "excluded_nodes": self.excluded,
            "metric": self.metric,
            "met": self.met,
            "ranking": [{"node": name, "metric_drop": round(score, 6)} for name, score in self.ranking[:20]],
            "trials": [{"excluded": t.excluded, "metric": t.metric} for t in self.trials],
        }


def _region(int8: onnx.ModelProto, output: str, boundary: set[str]) -> list[onnx.NodeProto]:
    """The INT8 nodes that compute `output` from tensors the FP32 graph also has (its quantized form)."""
    producers = {out: node for node in int8.graph.node for out in node.output}
    nodes: dict[str, onnx.NodeProto] = {}
    pending = [output]
    while pending:
        node = producers.get(pending.pop())
        if node is None or node.name in nodes:
            continue
        nodes[node.name] = node
        pending += [name for name in node.input if name and name not in boundary and name in producers]
    order = {id(node): index for index, node in enumerate(int8.graph.node)}
    return sorted(nodes.values(), key=lambda node: order[id(node)])


def transplant(fp32: onnx.ModelProto, int8: onnx.ModelProto, node_name: str, boundary: set[str]) -> onnx.ModelProto:
    """The FP32 graph with one node replaced by its quantized form taken from the INT8 graph."""
    model = onnx.ModelProto.FromString(fp32.SerializeToString())
    index, original = next((i, n) for i, n in enumerate(model.graph.node) if n.name == node_name)
    region = _region(int8, original.output[0], boundary)
    keep = boundary | {original.output[0]}
    rename = lambda name: name if not name or name in keep else f"qp_region/{name}"  # noqa: E731
    initializers = {init.name: init for init in int8.graph.initializer}
    used: set[str] = set()
    replacement = []
    for node in region:
        copy = onnx.NodeProto.FromString(node.SerializeToString())
        copy.name = f"qp_region/{node.name}"
        used |= {name for name in copy.input if name in initializers}
        copy.input[:] = [rename(name) for name in copy.input]
        copy.output[:] = [rename(name) for name in copy.output]
        replacement.append(copy)
    del model.graph.node[index]
    for offset, node in enumerate(replacement):
        model.graph.node.insert(index + offset, node)
    for name in sorted(used):
        tensor = onnx.TensorProto.FromString(initializers[name].SerializeToString())
        tensor.name = rename(name)
        model.graph.initializer.append(tensor)
    domains = {entry.domain for entry in model.opset_import}
    model.opset_import.extend(entry for entry in int8.opset_import if entry.domain not in domains)
    return model


def rank_sensitivity(
    fp32: Path, int8: Path, evaluate: Callable[[Path], float], scratch: Path
) -> list[tuple[str, float]]:
    """Quantizable FP32 nodes ordered by how much quantizing that node alone costs the tuning metric.

    Each candidate's quantized form (its Q/DQ pairs, dynamic quantization or integer kernel) is cut
    out of the INT8 graph and put into the FP32 graph in place of the node; the drop of the metric
    is that node's own cost, with no quantizer run per node.
    """
    reference = onnx.load(str(fp32))
    quantized = onnx.load(str(int8))
    int8_tensors = {out for node in quantized.graph.node for out in node.output}
    boundary = {out for node in reference.graph.node for out in node.output}
    boundary |= {graph_input.name for graph_input in reference.graph.input}
    candidates = [
        node.name for node in reference.graph.node
        if node.op_type in QUANTIZABLE_OP_TYPES and node.output[0] in int8_tensors
        and any(n.op_type in QUANTIZED_OP_TYPES for n in _region(quantized, node.output[0], boundary))
    ]
    baseline = evaluate(fp32)

    def include_one(name: str) -> float:
        folder = scratch if scratch.is_dir() else Path(tempfile.gettempdir())  # a Ray node without the build
        path = folder / f"include-{os.getpid()}-{candidates.index(name)}.onnx"
        onnx.save(transplant(reference, quantized, name, boundary), str(path))
        try:
            return evaluate(path)
        finally:
            path.unlink(missing_ok=True)

    metrics = parallel_map(include_one, candidates)
    return order_ranking([(name, baseline - metric) for name, metric in zip(candidates, metrics)])


def order_ranking(ranking: Sequence[tuple[str, float]]) -> list[tuple[str, float]]:
    """Worst first: score descending, ties broken by node name (deterministic across runs and graphs)."""
    return sorted(ranking, key=lambda item: (-item[1], item[0]))


@dataclass
class GreedyOutcome:
    chosen: list[str]
    metric: float
    met: bool
    trials: list[Trial]


def greedy_search(
    ranking: Sequence[tuple[str, float]],
    score: Callable[[list[str]], float],
    target: float,
    max_nodes: int,
    initial: float,
    progress: Callable[[list[str], float], None] = lambda chosen, metric: None,
) -> GreedyOutcome:
    """The one greedy fallback loop of both targets.

    Nodes are taken from `ranking` (ordered by order_ranking) one at a time into the chosen set (CPU: kept in
    FP32; TensorRT: left unquantized); `score(chosen)` builds and measures that candidate. Stops at the
    first candidate whose metric reaches `target`, or after `max_nodes`. `initial` is the metric with
    nothing chosen (trial 0).
    """
    order = [name for name, _ in order_ranking(ranking)[:max(max_nodes, 0)]]
    taken, metric = 0, initial
    trials = [Trial([], initial)]
    while metric < target and taken < len(order):
        # The candidates are the ranking's prefixes, so the next `width()` of them are scored at once (in
        # parallel) and read in order: the first that reaches the target stops the search as it would have
        # sequentially; the ones after it are discarded.
        sizes = list(range(taken + 1, min(taken + width(), len(order)) + 1))
        for size, value in zip(sizes, parallel_map(lambda size: score(order[:size]), sizes)):
            taken, metric = size, value
            trials.append(Trial(order[:size], metric))
            progress(order[:size], metric)
            if metric >= target:
                break
    return GreedyOutcome(order[:taken], metric, metric >= target, trials)


def search(
    fp32: Path,
    quantize: Callable[[list[str], Path], None],
    evaluate: Callable[[Path], float],
    tolerable_loss: float,
    max_nodes: int,
    scratch: Path,
    report: Callable[[str], None] = lambda message: None,
) -> tuple[Path, FallbackResult]:
    """Greedy fallback in sensitivity order; returns the chosen INT8 graph (in scratch) and the record."""
    target = 1.0 - tolerable_loss
    first = scratch / "trial-0.onnx"
    quantize([], first)
    metric = evaluate(first)
    report(f"all nodes INT8: tuning metric {metric:.5f} (target >= {target:.5f})")
    ranking = order_ranking(rank_sensitivity(fp32, first, evaluate, scratch)) if metric < target else []

    def score(excluded: list[str]) -> float:
        path = scratch / f"trial-{len(excluded)}.onnx"
        quantize(excluded, path)
        return evaluate(path)

    outcome = greedy_search(
        ranking, score, target, max_nodes, metric,
        lambda chosen, value: report(f"{len(chosen)} node(s) in FP32 (+{chosen[-1]}): tuning metric {value:.5f}"),
    )
    chosen = scratch / f"trial-{len(outcome.chosen)}.onnx"
    if outcome.chosen and width() > 1:  # scored in another process: quantize the choice here, for its record
        quantize(outcome.chosen, chosen)
    return chosen, FallbackResult(outcome.chosen, outcome.metric, outcome.met, ranking, outcome.trials)
