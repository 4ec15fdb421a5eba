"""`pipeline export-triton`: a Triton Inference Server model repository from a finished build.

The model's `config.pbtxt` is written from the ONNX graph itself (input and output names,
data types, dims), so it cannot drift from the artifact. Backends:

- CPU builds: `onnxruntime_onnx` (the INT8 `model.onnx`), with ONNX Runtime's thread settings.
- TensorRT builds: `tensorrt_plan` when the bundle holds an engine (`BUILD/trt/<engine>`, built on a
  GPU host); its I/O is that of the bundle's ONNX graph, the batch limit that of the optimization
  profile. Without an engine the export is refused, unless `--backend onnxruntime` asks to serve
  the bundle's Q/DQ graph with ONNX Runtime instead.

`--with-tokenizer` adds a Python-backend model that turns text into token ids and an ensemble
that chains it to the model, so clients send text.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from pipeline.build.manifest_schema import Manifest
from pipeline.build.readback import checked_bundle, checked_file, checked_tree, load_manifest
from pipeline.core.errors import InputError, read_json_input

DEFAULT_MAX_BATCH_SIZE = 32
TEXT_INPUT = "TEXT"
TOKENIZER_TEMPLATE = Path(__file__).with_name("triton_tokenizer_model.py")
_PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")

# ONNX TensorProto element type -> Triton data type (model_config.proto DataType).
ONNX_TO_TRITON = {
    1: "TYPE_FP32", 2: "TYPE_UINT8", 3: "TYPE_INT8", 4: "TYPE_UINT16", 5: "TYPE_INT16", 6: "TYPE_INT32",
    7: "TYPE_INT64", 8: "TYPE_STRING", 9: "TYPE_BOOL", 10: "TYPE_FP16", 11: "TYPE_FP64", 12: "TYPE_UINT32",
    13: "TYPE_UINT64", 16: "TYPE_BF16",
}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    data_type: str
    dims: tuple[int, ...]  # without the batch dimension when the model batches


@dataclass(frozen=True)
class ModelSource:
    """What a build directory offers to Triton: the file to serve and the graph describing it."""

    backend: str  # "onnxruntime" or "tensorrt"
    artifact: Path  # model.onnx or the engine
    graph: Path  # the ONNX graph whose I/O the artifact has
    profile_max_batch: Optional[int]  # TensorRT optimization profile's largest batch
    task: str
    max_length: int


def _manifest(build_dir: Path) -> Manifest:
    manifest = load_manifest(build_dir)
    if manifest.status != "passed":
        raise InputError(f"build {build_dir} has status '{manifest.status}'; only a build whose parity "
                         "passed can be deployed")
    return manifest


def _bundle_file(bundle: Path, name: object, default: str) -> Path:
    """A file the bundle's build_config.json names: a plain name inside the (hash-checked) bundle."""
    name = default if name is None else name
    if not isinstance(name, str) or not _PLAIN_NAME.fullmatch(name) or name in (".", ".."):
        raise InputError(f"{bundle / 'build_config.json'} names {name!r}, not a file name inside {bundle}")
    return bundle / name


def resolve_source(build_dir: Path, backend: str = "auto") -> ModelSource:
    """Pick the artifact and backend for a build directory (see the module docstring); every file it
    names was checked against the manifest's hashes."""
    manifest = _manifest(build_dir)
    target = manifest.config.target
    task = manifest.model.task
    max_length = manifest.config.calibration.max_length
    if target == "trt":
        bundle = checked_bundle(build_dir, manifest, "trt")
        build_config_path = bundle / "build_config.json"
        build_config = read_json_input(build_config_path) if build_config_path.is_file() else {}
        if not isinstance(build_config, dict):
            raise InputError(f"{build_config_path} must hold a JSON object")
        engine = _bundle_file(bundle, build_config.get("engine"), "model.plan")
        bundle_graph = _bundle_file(bundle, build_config.get("onnx"), "model.onnx")
        graph = bundle_graph if bundle_graph.is_file() else checked_file(build_dir, manifest, "model.onnx")
        batch_range = build_config.get("profile_ranges", {}).get("batch") if isinstance(
            build_config.get("profile_ranges"), dict) else None
        try:
            profile_max = int(batch_range[2]) if batch_range else None
        except (TypeError, ValueError, IndexError, KeyError):
            raise InputError(f"{build_config_path}: profile_ranges.batch must be [min, opt, max]") from None
        if backend in ("auto", "tensorrt"):
            if not engine.is_file():
                raise InputError(
                    f"no TensorRT engine in {bundle} ({engine.name}); build it on a GPU host (docker/gpu, or "
                    f"`python {bundle}/build_engine.py`) or pass --backend onnxruntime to serve the ONNX graph")
            return ModelSource("tensorrt", engine, graph, profile_max, task, max_length)
        return ModelSource("onnxruntime", graph, graph, None, task, max_length)
    if backend == "tensorrt":
        raise InputError(f"{build_dir} is a CPU build (target '{target}'); --backend tensorrt needs a "
                         "`pipeline build --target trt` directory with an engine")
    graph = checked_file(build_dir, manifest, "model.onnx")
    return ModelSource("onnxruntime", graph, graph, None, task, max_length)


def _dims(shape: Any) -> list[int]:
    return [d.dim_value if d.HasField("dim_value") else -1 for d in shape.dim]


def graph_tensors(graph: Path, batched: bool) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Inputs and outputs of an ONNX graph as Triton sees them (batch dimension dropped when batched)."""
    import onnx

    model = onnx.load(str(graph), load_external_data=False)
    initializers = {tensor.name for tensor in model.graph.initializer}

    def spec(value: Any) -> TensorSpec:
        tensor_type = value.type.tensor_type
        if tensor_type.elem_type not in ONNX_TO_TRITON:
            raise InputError(f"{graph}: tensor '{value.name}' has ONNX type {tensor_type.elem_type}, "
                             "which Triton has no data type for")
        dims = _dims(tensor_type.shape)
        if batched:
            if not dims or dims[0] != -1:
                raise InputError(f"{graph}: tensor '{value.name}' has no dynamic batch dimension ({dims}); "
                                 "export with --max-batch-size 0")
            dims = dims[1:]
        return TensorSpec(value.name, ONNX_TO_TRITON[tensor_type.elem_type], tuple(dims))

    inputs = [spec(v) for v in model.graph.input if v.name not in initializers]
    return inputs, [spec(v) for v in model.graph.output]


def _tensor_block(kind: str, tensors: list[TensorSpec]) -> list[str]:
    lines = [f"{kind} ["]
    for index, tensor in enumerate(tensors):
        dims = ", ".join(str(d) for d in tensor.dims)
        comma = "," if index < len(tensors) - 1 else ""
        lines += ["  {", f'    name: "{tensor.name}"', f"    data_type: {tensor.data_type}", f"    dims: [ {dims} ]",
                  f"  }}{comma}"]
    return lines + ["]"]


def _parameters(values: dict[str, str]) -> list[str]:
    lines = []
    for key, value in values.items():
        lines += ["parameters {", f'  key: "{key}"', f'  value: {{ string_value: "{value}" }}', "}"]
    return lines


def model_config(name: str, source: ModelSource, inputs: list[TensorSpec], outputs: list[TensorSpec],
                 max_batch_size: int, instances: int, intra_op_threads: int, inter_op_threads: int,
                 max_queue_delay_us: int) -> str:
    platform = {"onnxruntime": "onnxruntime_onnx", "tensorrt": "tensorrt_plan"}[source.backend]
    kind = "KIND_GPU" if source.backend == "tensorrt" else "KIND_CPU"
    lines = [f'name: "{name}"', f'platform: "{platform}"', f"max_batch_size: {max_batch_size}"]
    lines += _tensor_block("input", inputs) + _tensor_block("output", outputs)
    lines += ["instance_group [", f"  {{ count: {instances}, kind: {kind} }}", "]"]
    if max_batch_size > 0:
        lines += ["dynamic_batching {", f"  max_queue_delay_microseconds: {max_queue_delay_us}", "}"]
    if source.backend == "onnxruntime":
        lines += _parameters({"intra_op_thread_count": str(intra_op_threads),
                              "inter_op_thread_count": str(inter_op_threads)})
    return "\n".join(lines) + "\n"


def tokenizer_config(name: str, inputs: list[TensorSpec], max_batch_size: int, max_length: int) -> str:
    text = TensorSpec(TEXT_INPUT, "TYPE_STRING", (1,) if max_batch_size > 0 else (-1,))
    ids = [TensorSpec(t.name, t.data_type, (-1,) if max_batch_size > 0 else (-1, -1)) for t in inputs]
    lines = [f'name: "{name}"', 'backend: "python"', f"max_batch_size: {max_batch_size}"]
    lines += _tensor_block("input", [text]) + _tensor_block("output", ids)
    lines += ["instance_group [", "  { count: 1, kind: KIND_CPU }", "]"]
    lines += _parameters({"max_length": str(max_length)})
    return "\n".join(lines) + "\n"


def ensemble_config(name: str, tokenizer: str, model: str, inputs: list[TensorSpec], outputs: list[TensorSpec],
                    max_batch_size: int) -> str:
    text = TensorSpec(TEXT_INPUT, "TYPE_STRING", (1,) if max_batch_size > 0 else (-1,))
    lines = [f'name: "{name}"', 'platform: "ensemble"', f"max_batch_size: {max_batch_size}"]
    lines += _tensor_block("input", [text]) + _tensor_block("output", outputs)
    lines += ["ensemble_scheduling {", "  step ["]
    tokenizer_outputs = ", ".join(f'{{ key: "{t.name}" value: "{t.name}" }}' for t in inputs)
    model_outputs = ", ".join(f'{{ key: "{t.name}" value: "{t.name}" }}' for t in outputs)
    lines += ["    {", f'      model_name: "{tokenizer}"', "      model_version: -1",
              f'      input_map {{ key: "{TEXT_INPUT}" value: "{TEXT_INPUT}" }}',
              f"      output_map [ {tokenizer_outputs} ]", "    },",
              "    {", f'      model_name: "{model}"', "      model_version: -1",
              f"      input_map [ {tokenizer_outputs} ]", f"      output_map [ {model_outputs} ]", "    }",
              "  ]", "}"]
    return "\n".join(lines) + "\n"


def _copy_artifact(source: Path, version_dir: Path, backend: str) -> None:
    target = version_dir / ("model.plan" if backend == "tensorrt" else "model.onnx")
    shutil.copyfile(source, target)
    external = source.with_name(f"{source.name}.data")  # weights past protobuf's limit (engines.onnx_io)
    if backend == "onnxruntime" and external.is_file():
        shutil.copyfile(external, version_dir / external.name)


def export_triton(build_dir: Path, repo_dir: Path, model_name: str, backend: str = "auto",
                  max_batch_size: Optional[int] = None, instances: int = 1, intra_op_threads: int = 0,
                  inter_op_threads: int = 1, max_queue_delay_us: int = 1000,
                  with_tokenizer: bool = False, ensemble_outputs: Optional[list[str]] = None) -> list[str]:
    """Write (or replace) the models of one build in a Triton repository; returns the model names written.
    ensemble_outputs: the outputs the text ensemble returns (default: every output of the graph)."""
    if not _PLAIN_NAME.fullmatch(model_name) or model_name in (".", ".."):
        raise InputError(f"model name {model_name!r} must be letters, digits, '.', '_' or '-' (a Triton model folder)")
    source = resolve_source(build_dir, backend)
    if max_batch_size is None:
        max_batch_size = source.profile_max_batch or DEFAULT_MAX_BATCH_SIZE
    if max_batch_size < 0:
        raise InputError(f"--max-batch-size must be 0 or more, got {max_batch_size}")
    if source.profile_max_batch is not None and source.backend == "tensorrt" and max_batch_size > source.profile_max_batch:
        raise InputError(f"--max-batch-size {max_batch_size} exceeds the engine's optimization profile "
                         f"(largest batch {source.profile_max_batch})")
    if with_tokenizer:
        checked_tree(build_dir, _manifest(build_dir), "tokenizer")
    inputs, outputs = graph_tensors(source.graph, batched=max_batch_size > 0)
    returned = outputs
    if ensemble_outputs:
        unknown = sorted(set(ensemble_outputs) - {t.name for t in outputs})
        if unknown:
            raise InputError(f"--outputs {', '.join(unknown)}: not an output of the graph "
                             f"(outputs: {', '.join(t.name for t in outputs)})")
        if not with_tokenizer:
            raise InputError("--outputs selects what the text ensemble returns; give --with-tokenizer too")
        returned = [t for t in outputs if t.name in ensemble_outputs]

    repo_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".export-", dir=repo_dir))  # renamed into place when complete
    written: list[str] = []
    try:
        model_dir = staging / model_name
        (model_dir / "1").mkdir(parents=True)
        _copy_artifact(source.artifact, model_dir / "1", source.backend)
        (model_dir / "config.pbtxt").write_text(model_config(
            model_name, source, inputs, outputs, max_batch_size, instances, intra_op_threads, inter_op_threads,
            max_queue_delay_us), encoding="utf-8")
        written.append(model_name)
        if with_tokenizer:
            tokenizer_name, ensemble_name = f"{model_name}_tokenizer", f"{model_name}_text"
            tokenizer_dir = staging / tokenizer_name
            (tokenizer_dir / "1").mkdir(parents=True)
            shutil.copyfile(TOKENIZER_TEMPLATE, tokenizer_dir / "1" / "model.py")
            shutil.copytree(build_dir / "tokenizer", tokenizer_dir / "1" / "tokenizer")
            (tokenizer_dir / "config.pbtxt").write_text(
                tokenizer_config(tokenizer_name, inputs, max_batch_size, source.max_length), encoding="utf-8")
            ensemble_dir = staging / ensemble_name
            (ensemble_dir / "1").mkdir(parents=True)  # Triton wants a version folder, even an empty one
            (ensemble_dir / "config.pbtxt").write_text(
                ensemble_config(ensemble_name, tokenizer_name, model_name, inputs, returned, max_batch_size),
                encoding="utf-8")
            written += [tokenizer_name, ensemble_name]
        for name in written:
            target = repo_dir / name
            if target.exists():
                shutil.rmtree(target)
            os.replace(staging / name, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return written
