"""An ONNX graph that already carries QuantizeLinear/DequantizeLinear (a QAT export) as the model.

`--model qat.onnx` (its config.json and tokenizer in the same folder) or `--model DIR` holding a `model.onnx`
and no PyTorch weights. The graph's scales are its learned quantization: the build keeps them (the plan's
"onnx-qdq" rows), and parity is measured against the graph's own fake-quantized forward. Checked here,
before any stage runs: the file is an ONNX graph ONNX Runtime loads, it carries Q/DQ with constant,
finite, positive scales, it reads the family's inputs and gives the task's outputs.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

from pipeline.core.errors import InputError
from pipeline.models.registry import ModelInfo

GRAPH_FILE = "model.onnx"


def qdq_graph_of(path: Path) -> Optional[Path]:
    """The ONNX graph a --model path names: a `.onnx` file, or a folder with model.onnx and no PyTorch weights."""
    if path.suffix == ".onnx":
        return path
    if path.is_dir() and (path / GRAPH_FILE).is_file() and not any(path.glob("*.safetensors")) \
            and not any(path.glob("*.bin")):
        return path / GRAPH_FILE
    return None


def check_qdq_graph(graph: Path, info: ModelInfo) -> ModelInfo:
    """The folder's ModelInfo with its graph attached, once the graph is one the build can keep."""
    import onnx

    from engines.onnx_io import check_onnx_file
    from engines.qdq_graph import scale_problems, summarize

    if not graph.is_file():
        raise InputError(f"ONNX model not found: {graph}")
    check_onnx_file(graph, runnable=True)
    model = onnx.load(str(graph))
    summary = summarize(model)
    if not summary.dequantize:
        raise InputError(f"{graph} carries no QuantizeLinear/DequantizeLinear: an ONNX input is a QAT export "
                         "with its scales in the graph; build a float model from its Hugging Face folder")
    problems = scale_problems(model)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise InputError(f"{graph}: {problems[0]}{more}; learned scales must be constant initializers")
    initializers = {tensor.name for tensor in model.graph.initializer}
    inputs = [value.name for value in model.graph.input if value.name not in initializers]
    unknown = [name for name in inputs if name not in info.architecture.input_names]
    if unknown:
        raise InputError(f"{graph} reads {', '.join(unknown)}, which a {info.architecture.model_type} tokenizer "
                         f"does not give (its inputs: {', '.join(info.architecture.input_names)})")
    outputs = {value.name for value in model.graph.output}
    missing = [name for name in info.task.output_names if name not in outputs]
    if missing:
        raise InputError(f"{graph} has no output {', '.join(missing)}, which --task {info.task.name} needs "
                         f"(its outputs: {', '.join(sorted(outputs))})")
    from pipeline.core.hashing import file_sha256

    counts = summary.to_dict()
    origin = {"kind": "onnx-qdq", "base": str(graph.parent), "graph": str(graph), "graph_sha256": file_sha256(graph),
              "quantize_linear": counts["quantize_linear"], "dequantize_linear": counts["dequantize_linear"],
              "quantized_weights": counts["quantized_weights"], "scale_tensors": counts["scales"],
              "exact": "the scales and zero points are the graph's own (QAT), kept bit for bit: no calibration, "
                       "no re-quantization (--target trt: the graph passed through unchanged; --target cpu: "
                       "ONNX Runtime's "
                       "integer kernels, which re-round each requantized output once)"}
    return dataclasses.replace(info, graph=graph, origin=origin)


def check_trt_placement(info: ModelInfo) -> None:
    """A Q/DQ graph TensorRT cannot take as it is (asymmetric zero points, per-channel activation scales, uint8)
    is refused before any work: passing it through is the TensorRT target's whole job."""
    import onnx

    from engines.trt.qdq import placement

    if info.graph is None:
        return
    refusals = placement(onnx.load(str(info.graph)), info.architecture.trt_qdq_ops).refusals
    if refusals:
        more = f" (and {len(refusals) - 1} more)" if len(refusals) > 1 else ""
        raise InputError(f"{info.graph}: TensorRT cannot build its Q/DQ as they are: {refusals[0]}{more}; "
                         "export the QAT model with symmetric int8 (zero points 0), per-tensor activations")
