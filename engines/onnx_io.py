"""Loading and saving ONNX graphs, with external data past protobuf's 2 GB limit."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import onnx

PROTOBUF_LIMIT = 2 * 1024**3 - 1024 * 1024  # leave room for the graph itself


def initializer_bytes(model: onnx.ModelProto) -> int:
    total = 0
    for tensor in model.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            total += next((int(e.value) for e in tensor.external_data if e.key == "length"), 0)
        else:
            total += len(tensor.raw_data) or tensor.ByteSize()
    return total


def save_model(model: onnx.ModelProto, path: Path) -> None:
    """One file when it fits in a protobuf; otherwise weights in `<name>.data` beside it."""
    if initializer_bytes(model) >= PROTOBUF_LIMIT:
        onnx.save_model(
            model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
            location=f"{path.name}.data", size_threshold=1024,
        )
    else:
        onnx.save_model(model, str(path))


def default_opset(model: onnx.ModelProto) -> int:
    """The graph's opset of the default (ai.onnx) domain; 0 when it declares none."""
    return next((entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx")), 0)


def consumer_counts(model: onnx.ModelProto) -> Counter[str]:
    """How many node inputs read each tensor name (a node reading a tensor twice counts twice)."""
    return Counter(name for node in model.graph.node for name in node.input)


def declare_domains(model: onnx.ModelProto) -> None:
    """Add the opset import of every node domain the graph uses but does not declare (ONNX Runtime's
    transformer optimizer writes com.microsoft nodes without importing the domain, which the checker refuses)."""
    declared = {opset.domain for opset in model.opset_import}
    for domain in sorted({node.domain for node in model.graph.node} - declared - {"", "ai.onnx"}):
        model.opset_import.append(onnx.helper.make_opsetid(domain, 1))


def replace_nodes(model: onnx.ModelProto, nodes: list[onnx.NodeProto], unused_initializers: set[str]) -> None:
    """A graph rewrite's last step: `nodes` become the graph's nodes, the initializers no node reads any more
    go, and the domains of the new nodes (com.microsoft contrib ops) are declared."""
    kept = [tensor for tensor in model.graph.initializer if tensor.name not in unused_initializers]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    declare_domains(model)


def graph_input_names(path: Path) -> list[str]:
    """The inputs a graph reads at run time (initializers listed as inputs excluded), in order."""
    model = onnx.load_model(str(path), load_external_data=False)
    initializers = {tensor.name for tensor in model.graph.initializer}
    return [value.name for value in model.graph.input if value.name not in initializers]


def check_onnx_file(path: Path, runnable: bool = False) -> None:
    """Refuse, with one line (InputError), a file that is not an ONNX model: garbage bytes, an empty or
    truncated file, a protobuf without a graph; with runnable=True also one ONNX Runtime cannot load.

    Not onnx.checker: it rejects ONNX Runtime's fused contrib ops in our own optimized graphs."""
    from pipeline.core.errors import InputError

    try:
        model = onnx.load_model(str(path), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError and friends: the bytes are not an ONNX model
        raise InputError(f"{path} is not an ONNX model ({type(exc).__name__}: {_first_line(exc)})") from None
    if not model.graph.node or not model.graph.output:
        raise InputError(f"{path} is not an ONNX model (no graph: empty, truncated or another kind of file)")
    if runnable:
        from engines.ort_session import create_session

        try:
            create_session(path, threads=1, optimization="disable")
        except Exception as exc:  # ONNX Runtime's Fail / InvalidGraph / NotImplemented
            raise InputError(f"ONNX Runtime cannot load {path}: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def check_graph(path: Path) -> None:
    """What a stage checks of the graph it wrote, before it is cached: the ONNX checker (full, with shape
    inference; it accepts ONNX Runtime's contrib ops) and an ONNX Runtime load. EngineError otherwise."""
    from engines.ort_session import create_session
    from pipeline.core.errors import EngineError

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise EngineError(f"the graph written to {path.name} is not valid ONNX: {_first_line(exc)}") from None
    try:
        create_session(path, threads=1, optimization="disable")
    except Exception as exc:  # ONNX Runtime's Fail / InvalidGraph / NotImplemented
        raise EngineError(f"ONNX Runtime cannot load the graph written to {path.name}: {_first_line(exc)}") from None
