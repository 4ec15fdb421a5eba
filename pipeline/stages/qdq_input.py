"""export, for a Q/DQ ONNX graph given as the model (a QAT export): nothing is exported, the graph is the model.

Writes the graph as it was given (byte for byte: the QAT model's fake-quantized forward, the parity
reference), the float graph under its Q/DQ (`model.float.onnx`: weights de-quantized exactly, activation
Q/DQ pairs bypassed; the second, looser parity line) and the tokenizer of the folder beside it.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import onnx

from engines.onnx_io import default_opset, graph_input_names, save_model
from engines.qdq_graph import strip_qdq, summarize
from pipeline.config import BuildConfig
from pipeline.core.errors import InputError
from pipeline.core.hashing import file_sha256
from pipeline.models.registry import ModelInfo, load_tokenizer, tokenizer_fingerprint
from pipeline.stages.base import Stage, StageContext
from pipeline.stages.facts import ExportFacts

FLOAT_GRAPH = "model.float.onnx"


def input_graph(model: ModelInfo) -> Path:
    if model.graph is None:
        raise InputError(f"{model.path} is not an ONNX graph input")  # the plan gives this stage such models only
    return model.graph


class QdqInputStage(Stage):
    name = "export"
    facts = ExportFacts
    outputs = ("model.onnx", FLOAT_GRAPH, "tokenizer")

    def config_slice(self, config: BuildConfig, model: ModelInfo) -> dict[str, Any]:
        return {"task": model.task.name, "input": "onnx-qdq"}

    def external_inputs(self, config: BuildConfig, model: ModelInfo) -> dict[str, str]:
        return {"graph": file_sha256(input_graph(model)), "tokenizer": tokenizer_fingerprint(model.path)}

    def run(self, context: StageContext, out: Path) -> dict[str, Any]:
        graph = input_graph(context.model)
        context.progress.info(f"the model is {graph.name}, a Q/DQ ONNX graph: its own scales are kept")
        shutil.copyfile(graph, out / "model.onnx")  # the bytes as given: the QAT model's fake-quantized forward
        model = onnx.load(str(out / "model.onnx"))
        save_model(strip_qdq(model), out / FLOAT_GRAPH)
        load_tokenizer(context.model).save_pretrained(str(out / "tokenizer"))
        opset = default_opset(model)
        parameters = sum(int(_size(tensor)) for tensor in model.graph.initializer)
        return {
            "opset": opset,
            "parameters": parameters,
            "onnx_bytes": (out / "model.onnx").stat().st_size,
            "input_names": graph_input_names(out / "model.onnx"),
            "torch_parity_max_abs": {},  # no PyTorch model: the graph itself is the model
            "input_graph_sha256": file_sha256(graph),
            "qdq": summarize(model).to_dict(),
            "scales": "the input graph's own (QAT): no calibration, no re-quantization",
        }


def _size(tensor: onnx.TensorProto) -> int:
    count = 1
    for dim in tensor.dims:
        count *= dim
    return count
