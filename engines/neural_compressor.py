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
- SmoothQuant: `StaticQuantConfig(extra_options={"SmoothQuantAlpha": ...})` silently ignores the
  alpha (only `SmoothQuantConfig` passes it on), and its calibrator stacks activations of all
  batches, which fails on batches of different sequence lengths: we use `SmoothQuantConfig` and
  pad the calibration batches to one length for it.
"""

from __future__ import annotations

import logging
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import onnx

from calibration.readers import BatchReader
from pipeline.config import QuantizationConfig
from pipeline.errors import InputError
from pipeline.onnx_io import save_model



def _quiet_library_logger() -> None:
    # Its logger module sets INFO when first imported, so lower it after importing the library.
    import onnx_neural_compressor.logger  # noqa: F401

    logging.getLogger("onnx_neural_compressor").setLevel(logging.WARNING)


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


def _reduce_range() -> bool:
    # Without VNNI, u8*s8 products can saturate the 16-bit accumulation: 7-bit weights avoid it.
    from onnx_neural_compressor import utility

    return not utility.CpuInfo().vnni


def pad_to_common_length(batches: Sequence[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """Right-pad every batch to the longest sequence (padding id 0, attention mask 0)."""
    longest = max(next(iter(batch.values())).shape[1] for batch in batches)
    return [
        {name: np.pad(array, ((0, 0), (0, longest - array.shape[1]))) for name, array in batch.items()}
        for batch in batches
    ]


def quantize(
    fp32_path: Path,
    output_path: Path,
    settings: QuantizationConfig,
    calibration: Optional[Sequence[dict[str, np.ndarray]]] = None,
    on_batch: Optional[Callable[[int, int], None]] = None,
    extra_exclusions: Sequence[str] = (),
) -> dict[str, object]:
    """Quantize an FP32 graph to INT8 as the settings say; returns what was done."""
    from onnx_neural_compressor.quantization import config as inc_config
    from onnx_neural_compressor.quantization import quantize as inc_quantize
    from onnxruntime.quantization import CalibrationMethod, QuantFormat

    _quiet_library_logger()
    model = onnx.load(str(fp32_path))
    name_all_nodes(model)
    excluded = resolve_exclusions(model, [*settings.exclude, *extra_exclusions])
    reduce_range = _reduce_range()
    extra_options: dict[str, object] = {"DefaultTensorType": onnx.TensorProto.FLOAT}
    with tempfile.TemporaryDirectory(prefix="quantpipe-inc-") as scratch:
        named_input = Path(scratch) / "input.onnx"
        save_model(model, named_input)
        if settings.mode == "dynamic":
            quant_config = inc_config.DynamicQuantConfig(
                per_channel=settings.per_channel, nodes_to_exclude=excluded, reduce_range=reduce_range,
                extra_options=extra_options,
            )
        else:
            if not calibration:
                raise InputError("static quantization needs calibration data, and none was given")
            static_options: dict[str, Any] = dict(
                calibrate_method=CalibrationMethod.MinMax,
                quant_format=QuantFormat.QDQ if settings.format == "qdq" else QuantFormat.QOperator,
                per_channel=settings.per_channel,
                nodes_to_exclude=excluded,
                reduce_range=reduce_range,
                calibration_sampling_size=sum(len(next(iter(b.values()))) for b in calibration),
            )
            if settings.smoothquant:
                quant_config = inc_config.SmoothQuantConfig(
                    alpha=settings.smoothquant_alpha,
                    calibration_data_reader=BatchReader(pad_to_common_length(calibration), on_batch=on_batch),
                    extra_options={**extra_options, "SmoothQuant": True},
                    **static_options,
                )
            else:
                quant_config = inc_config.StaticQuantConfig(
                    calibration_data_reader=BatchReader(calibration, on_batch=on_batch),
                    extra_options=extra_options,
                    **static_options,
                )
        out_dir = Path(scratch) / "out"
        out_dir.mkdir()
        inc_quantize(str(named_input), str(out_dir / "model.onnx"), quant_config)
        quantized = onnx.load(str(out_dir / "model.onnx"))  # pulls in the external data it wrote
    save_model(quantized, output_path)
    op_counts = Counter(node.op_type for node in quantized.graph.node)
    return {
        "mode": settings.mode,
        "format": settings.format if settings.mode == "static" else None,
        "smoothquant_alpha": settings.smoothquant_alpha if settings.smoothquant else None,
        "per_channel": settings.per_channel,
        "reduce_range": reduce_range,
        "excluded_nodes": excluded,
        "op_counts": dict(sorted(op_counts.items())),
    }
