"""Our thin adapter around Intel Neural Compressor's ONNX algorithms (onnx-neural-compressor 1.0).

The library is dormant (one release, 2024), so every call we make goes through
here, and its known bugs are worked around in this one place:
- nodes without a name (the ORT transformer optimizer emits unnamed Cast nodes)
  collide in its name-keyed graph info and get dropped: we name every node;
- `quantize()` always writes external data next to its output and may write a
  `config.json` there: we quantize into a scratch folder and save one file;
- graphs with contrib ops need `DefaultTensorType` for the ORT quantizer;
- `quantize()` passes `provides=` (a typo) to InferenceSession: harmless on a
  CPU-only onnxruntime, noted here in case a GPU build picks a wrong provider;
- its logger prints tables at INFO: we lower it to WARNING;
- its EmbedLayerNormalization quantizer assumes the segment (token type) inputs are present: on a graph
  without them (DistilBERT: no token_type_ids) it quantizes the empty input name, writing a
  DynamicQuantizeLinear that reads '' and a QEmbedLayerNormalization with shifted inputs (an invalid
  graph): such nodes stay in FP32 (an embedding lookup, nothing to gain from INT8);
- its static path calibrates inside `quantize()` with ONNX Runtime's collectors, which fail on
  batches of different sequence lengths for percentile/entropy and count padding tokens: we
  calibrate once in the calibrate stage (calibration/ranges.py, on the same ORT-basic-optimized
  graph `quantize()` would calibrate) and hand the cached ranges to its quantizer, so that
  changing quantization options never re-runs calibration;
- SmoothQuant: `StaticQuantConfig(extra_options={"SmoothQuantAlpha": ...})` silently ignores the
  alpha (only `SmoothQuantConfig` passes it on), and its calibrator stacks activations of all
  batches, which fails on batches of different sequence lengths: we use `SmoothQuantConfig` and
  pad the calibration batches to one length for it. SmoothQuant rewrites the graph before
  calibrating it, so it calibrates on its own output rather than from the cached ranges.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Protocol, Sequence

import numpy as np
import onnx

from calibration.readers import BatchReader
from engines.cpu import outlier_channels
from engines.onnx_io import save_model
from pipeline.core.errors import EngineError, InputError
from pipeline.core.host import resolved_isa


class Int8Settings(Protocol):
    """What `quantize` reads of the build's quantization settings (pipeline.config.QuantizationConfig)."""

    mode: str
    format: Literal["qdq", "qoperator"]
    per_channel: bool
    exclude: list[str]
    smoothquant: bool
    smoothquant_alpha: float
    outlier_threshold: float
    cpu_isa: str


def _quiet_library_logger() -> None:
    # Its logger module sets INFO and its own handler when first imported: route it after importing it.
    import onnx_neural_compressor.logger  # noqa: F401

    from pipeline.core.logs import route_library_logger

    route_library_logger("onnx_neural_compressor")


def name_all_nodes(model: onnx.ModelProto) -> int:
    """Give every unnamed or duplicate-named node a unique name; returns how many were renamed."""
    seen: set[str] = set()
    renamed = 0
    for index, node in enumerate(model.graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{index}"
            renamed += 1
        seen.add(node.name)
    return renamed


def unquantizable_nodes(model: onnx.ModelProto) -> list[str]:
    """Nodes the library's quantizers would turn into an invalid graph (see the module docstring)."""
    return sorted(node.name for node in model.graph.node if node.op_type == "EmbedLayerNormalization"
                  and (len(node.input) < 5 or not node.input[1] or not node.input[4]))


def resolve_exclusions(model: onnx.ModelProto, exclude: Sequence[str]) -> list[str]:
    """Map op types or node names to node names; refuse entries that match nothing."""
    names = {node.name for node in model.graph.node}
    op_types = {node.op_type for node in model.graph.node}
    unknown = [item for item in exclude if item not in names and item not in op_types]
    if unknown:
        raise InputError(
            f"--exclude {', '.join(unknown)}: no node or op type of that name in the graph "
            f"(op types present: {', '.join(sorted(op_types))})"
        )
    return sorted({node.name for node in model.graph.node if node.name in exclude or node.op_type in exclude})


def weight_codes(model: onnx.ModelProto) -> tuple[str, int, int]:
    """(element type, smallest, largest) of the weight codes of a quantized graph (its `*_quantized`
    initializers), uint8 codes taken relative to their zero point 128: the range the kernels multiply."""
    codes = [onnx.numpy_helper.to_array(t) for t in model.graph.initializer
             if t.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8) and t.name.endswith("_quantized")
             and t.dims]
    if not codes:
        return ("none", 0, 0)
    kinds = {str(c.dtype) for c in codes}
    if kinds == {"uint8"}:
        return ("uint8", int(min(c.min() for c in codes)) - 128, int(max(c.max() for c in codes)) - 128)
    return (",".join(sorted(kinds)), int(min(c.min() for c in codes)), int(max(c.max() for c in codes)))


def prepare_graph(fp32_path: Path, output_path: Path) -> Path:
    """The graph the quantizer works on: every node named, then ONNX Runtime's basic optimizations
    (what `onnx_neural_compressor.quantization.quantize()` applies first). Tensor names in it are
    the keys of calibration ranges."""
    import onnxruntime as ort

    model = onnx.load(str(fp32_path))
    name_all_nodes(model)
    with tempfile.TemporaryDirectory(prefix="quantpipe-prep-") as scratch:
        named = Path(scratch) / "named.onnx"
        save_model(model, named)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.optimized_model_filepath = str(Path(scratch) / "basic.onnx")
        options.add_session_config_entry(
            "session.optimized_model_external_initializers_file_name", "basic.onnx_data"
        )
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        options.log_severity_level = 3
        ort.InferenceSession(str(named), options, providers=["CPUExecutionProvider"])
        save_model(onnx.load(options.optimized_model_filepath), output_path)
    return output_path


def _augment(model_path: Path, op_types: Sequence[str]):
    from onnx_neural_compressor.algorithms.post_training_quant import calibrate

    augment = calibrate.ONNXRTAugment(str(model_path), None, dump_op_types=list(op_types))
    augment.augment_graph()
    return augment


def _static_op_types() -> list[str]:
    from onnx_neural_compressor.quantization import config as inc_config

    return list(inc_config.StaticQuantConfig(calibration_data_reader=None).op_types_to_quantize)


def activation_tensors(prepared_path: Path) -> list[str]:
    """The activation tensors whose ranges static quantization reads: inputs and outputs of every
    node of a quantizable op type, and the graph outputs (excluding nodes never adds any)."""
    _quiet_library_logger()
    augment = _augment(prepared_path, _static_op_types())
    return sorted(output.name for output in augment.augmented_model.graph.output)


def _static_quantize(prepared_path: Path, output_path: Path, quant_config, ranges: dict[str, tuple[float, float]]) -> None:
    """The library's `static_quantize_entry`, with its calibration replaced by our cached ranges."""
    from onnx_neural_compressor.algorithms.post_training_quant import quantizer
    from onnx_neural_compressor.quantization import config as inc_config

    model_info = inc_config.StaticQuantConfig.get_model_info(model=str(prepared_path))
    config_mapping = quant_config.to_config_mapping(model_info=model_info)
    augment = _augment(prepared_path, quant_config.op_types_to_quantize)
    wanted = [output.name for output in augment.augmented_model.graph.output]
    missing = sorted(name for name in wanted if name not in ranges)
    if missing:
        raise EngineError(
            f"the calibration cache has no range for {len(missing)} tensors ({', '.join(missing[:3])}, ...); "
            "it was computed on another graph: run the calibrate stage again (--force)",
        )
    thresholds = {name: ranges[name] for name in wanted}
    for name, values in augment.get_weight_tensors_calib_range().items():
        thresholds[name] = tuple(float(v) for v in values[0])
    params = augment.calculate_quantization_params(config_mapping, thresholds)
    static = quantizer.StaticQuantizer(
        str(prepared_path),
        config_mapping,
        quant_format=quant_config.quant_format.name.lower(),
        quantization_params=params,
        op_types_to_quantize=quant_config.op_types_to_quantize,
        execution_provider=quant_config.execution_provider,
        optypes_to_exclude_output_quant=quant_config.optypes_to_exclude_output_quant,
        dedicated_qdq_pair=quant_config.dedicated_qdq_pair,
        add_qdq_pair_to_weight=quant_config.add_qdq_pair_to_weight,
    )
    static.quantize_model()
    static.model.save(str(output_path))


def pad_to_common_length(batches: Sequence[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """Right-pad every batch to the longest sequence (padding id 0, attention mask 0)."""
    longest = max(next(iter(batch.values())).shape[1] for batch in batches)
    return [
        {name: np.pad(array, ((0, 0), (0, longest - array.shape[1])) + ((0, 0),) * (array.ndim - 2))
         for name, array in batch.items()}
        for batch in batches
    ]


def smoothed(fp32_path: Path, out: Path, alpha: float, calibration: Optional[Sequence[dict[str, np.ndarray]]],
             on_batch: Optional[Callable[[int, int], None]] = None) -> Path:
    """The FP32 graph with SmoothQuant's per-channel scales applied (Neural Compressor's Smoother), for
    dynamic INT8: a Mul of 1/s before each MatMul (folded into a parent it alone reads), s into the weight
    rows. Dynamic INT8 quantizes each activation tensor with one scale, so outlier channels cost every
    other channel its resolution; measured on all-MiniLM-L6-v2 (300 out-of-domain sentences, AVX-512 VNNI):
    embedding cosine 0.9905 -> 0.9932 at alpha 0.65, +10% latency at 8 x 128 (docs/encoder-speed.md)."""
    from onnx_neural_compressor.algorithms.smoother.core import Smoother

    if not calibration:
        raise InputError("SmoothQuant needs calibration samples, and none were given")
    batches = pad_to_common_length(calibration)
    model = Smoother(onnx.load(str(fp32_path)), BatchReader(batches, on_batch=on_batch)).transform(
        alpha=alpha, folding=True, calib_iter=len(batches))
    save_model(model, out)
    return out


@dataclass(frozen=True)
class DynamicInput:
    """The FP32 graph dynamic INT8 quantizes, and the record of how it was rewritten (outlier channels moved)."""

    path: Path
    outlier_channels: Optional[dict[str, object]] = None


def dynamic_input(fp32_path: Path, scratch: Path, settings: Int8Settings,
                  calibration: Optional[Sequence[dict[str, np.ndarray]]],
                  on_batch: Optional[Callable[[int, int], None]] = None) -> DynamicInput:
    """SmoothQuant's graph, the graph with its outlier channels moved, or `fp32_path` itself: computed once per
    build and shared by every quantizer run of the fallback search (each rewrite runs the FP32 graph over the
    calibration samples). The rewritten graph computes what the FP32 graph does, so the search ranks nodes
    against it (a node quantized from it carries its scaled weights)."""
    if settings.smoothquant:
        return DynamicInput(smoothed(fp32_path, scratch / "smoothed.onnx", settings.smoothquant_alpha, calibration,
                                     on_batch))
    if settings.outlier_threshold > 0:
        if not calibration:
            raise InputError("moving outlier channels needs calibration samples, and none were given "
                             "(or pass --outlier-threshold 0)")
        path, record = outlier_channels.migrated(fp32_path, scratch / "outliers.onnx", calibration,
                                                 settings.outlier_threshold, on_batch)
        return DynamicInput(path, record)
    return DynamicInput(fp32_path)


def quantize(
    fp32_path: Path,
    output_path: Path,
    settings: Int8Settings,
    ranges: Optional[dict[str, tuple[float, float]]] = None,
    calibration: Optional[Sequence[dict[str, np.ndarray]]] = None,
    extra_exclusions: Sequence[str] = (),
    on_batch: Optional[Callable[[int, int], None]] = None,
    prepared: Optional[DynamicInput] = None,
) -> dict[str, object]:
    """Quantize an FP32 graph to INT8 as the settings say.

    Static INT8 reads cached activation ranges; static INT8 with SmoothQuant reads calibration
    batches instead (it calibrates the graph it rewrote); dynamic INT8 reads them for SmoothQuant or to move
    outlier channels (settings.outlier_threshold > 0), else neither. `prepared` (dynamic INT8): the rewritten
    graph of `dynamic_input`, quantized instead of `fp32_path` without rewriting again.
    """
    from onnx_neural_compressor.quantization import config as inc_config
    from onnx_neural_compressor.quantization import quantize as inc_quantize
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType

    from pipeline.core.host import weight_type_for

    _quiet_library_logger()

    model = onnx.load(str(prepared.path if prepared is not None and settings.mode == "dynamic" else fp32_path))
    name_all_nodes(model)
    excluded = resolve_exclusions(model, [*settings.exclude, *extra_exclusions])
    excluded = sorted(set(excluded) | set(unquantizable_nodes(model)))
    isa = resolved_isa(settings.cpu_isa)
    weight_type = QuantType.QUInt8 if weight_type_for(isa) == "uint8" else QuantType.QInt8
    extra_options: dict[str, Any] = {"DefaultTensorType": onnx.TensorProto.FLOAT}
    static_options: dict[str, Any] = dict(
        calibrate_method=CalibrationMethod.MinMax,
        quant_format=QuantFormat.QDQ if settings.format == "qdq" else QuantFormat.QOperator,
        per_channel=settings.per_channel,
        nodes_to_exclude=excluded,
        weight_type=weight_type,
    )
    outliers: Optional[dict[str, object]] = None
    with tempfile.TemporaryDirectory(prefix="quantpipe-inc-") as scratch:
        out_dir = Path(scratch) / "out"
        out_dir.mkdir()
        named_input = Path(scratch) / "input.onnx"
        save_model(model, named_input)
        if settings.mode == "dynamic":
            if prepared is None:
                prepared = dynamic_input(named_input, Path(scratch), settings, calibration, on_batch)
                named_input = prepared.path
            outliers = prepared.outlier_channels
            quant_config = inc_config.DynamicQuantConfig(
                per_channel=settings.per_channel, nodes_to_exclude=excluded, weight_type=weight_type,
                extra_options=extra_options,
            )
            inc_quantize(str(named_input), str(out_dir / "model.onnx"), quant_config)
        elif settings.smoothquant:
            if not calibration:
                raise InputError("SmoothQuant needs calibration samples, and none were given")
            quant_config = inc_config.SmoothQuantConfig(
                alpha=settings.smoothquant_alpha,
                calibration_data_reader=BatchReader(pad_to_common_length(calibration), on_batch=on_batch),
                calibration_sampling_size=sum(len(next(iter(batch.values()))) for batch in calibration),
                extra_options={**extra_options, "SmoothQuant": True},
                **static_options,
            )
            inc_quantize(str(named_input), str(out_dir / "model.onnx"), quant_config)
        else:
            if not ranges:
                raise InputError("static quantization needs calibration ranges, and none were given")
            # calibrate_method is unused here: the ranges are given.
            quant_config = inc_config.StaticQuantConfig(
                calibration_data_reader=None, extra_options=extra_options, **static_options
            )
            prepared = prepare_graph(fp32_path, Path(scratch) / "prepared.onnx")
            _static_quantize(prepared, out_dir / "model.onnx", quant_config, ranges)
        quantized = onnx.load(str(out_dir / "model.onnx"))  # pulls in the external data it wrote
    save_model(quantized, output_path)
    op_counts = Counter(node.op_type for node in quantized.graph.node)
    codes = weight_codes(quantized)
    return {
        "mode": settings.mode,
        "format": settings.format if settings.mode == "static" else None,
        "smoothquant_alpha": settings.smoothquant_alpha if settings.smoothquant else None,
        "outlier_channels": outliers,
        "per_channel": settings.per_channel,
        # What the graph holds, read back from it: int8 codes, or on AVX2 the same codes + 128 as uint8.
        "weight_type": codes[0],
        "weight_codes": list(codes[1:]),
        "cpu_isa": isa,
        "excluded_nodes": excluded,
        "op_counts": dict(sorted(op_counts.items())),
    }
