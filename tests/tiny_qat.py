"""A Q/DQ-carrying ONNX model made in code: what a QAT export hands Quantpipe, without training.

The tiny BERT (tests/tiny_encoders.py) is exported to ONNX by the pipeline's own export module, ONNX
Runtime's `quantize_static(..., quant_format=QuantFormat.QDQ)` inserts Q/DQ pairs, and every scale is then
scaled by a factor in [1.10, 1.30]: scales that no re-calibration of this model would produce, which is
what "learned" means here. Written as a folder a user would hand over: model.onnx, config.json, tokenizer.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

SCALE_FACTORS = (1.10, 1.30)


def export_float(folder: Path, target: Path) -> list[dict[str, np.ndarray]]:
    """The FP32 graph of a tiny encoder folder (sentence_embedding, last_hidden_state); returns probe batches."""
    import torch

    from pipeline.models.registry import inspect_model, load_tokenizer
    from pipeline.stages.export import build_export_module, candidate_inputs, load_torch_model, probe_batches

    info = inspect_model(str(folder), None)
    model = load_torch_model(info)
    names = candidate_inputs(model, info)
    probes = [{name: batch[name] for name in names} for batch in probe_batches(info, load_tokenizer(info))]
    axes = {name: {0: "batch", 1: "sequence"} for name in names}
    axes.update({"sentence_embedding": {0: "batch"}, "last_hidden_state": {0: "batch", 1: "sequence"}})
    with torch.inference_mode():
        torch.onnx.export(build_export_module(model, info, names), tuple(torch.from_numpy(probes[0][n]) for n in names),
                          str(target), input_names=names, output_names=["sentence_embedding", "last_hidden_state"],
                          dynamic_axes=axes, opset_version=17, dynamo=False)
    return probes


def write_qat_folder(folder: Path, encoder: Path, symmetric: bool = False, seed: int = 0) -> Path:
    """`folder`/model.onnx (Q/DQ with perturbed scales), the encoder's config.json and tokenizer; beside the folder,
    `<name>.fp32.onnx` (the float export) and `<name>.calibrated.onnx` (the Q/DQ before the perturbation).

    symmetric=False: uint8 activations with zero points, int8 weights (the CPU's U8S8 kernels);
    symmetric=True: int8 activations and weights, zero points 0, per-channel weights (what TensorRT takes)."""
    import onnx
    from onnx import numpy_helper
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    folder.mkdir(parents=True, exist_ok=True)
    float_graph = folder.parent / f"{folder.name}.fp32.onnx"
    probes = export_float(encoder, float_graph)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(probes)

        def get_next(self):
            return next(self.batches, None)

    quantize_static(str(float_graph), str(folder / "model.onnx"), Reader(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QInt8 if symmetric else QuantType.QUInt8, weight_type=QuantType.QInt8,
                    op_types_to_quantize=["MatMul", "Gemm"], per_channel=symmetric,
                    extra_options={"ActivationSymmetric": symmetric, "WeightSymmetric": True})
    shutil.copyfile(folder / "model.onnx", folder.parent / f"{folder.name}.calibrated.onnx")  # what calibration gives
    model = onnx.load(str(folder / "model.onnx"))
    rng = np.random.default_rng(seed)
    scales = {node.input[1] for node in model.graph.node if node.op_type in ("QuantizeLinear", "DequantizeLinear")}
    for tensor in model.graph.initializer:
        if tensor.name in scales:
            values = numpy_helper.to_array(tensor)
            factor = rng.uniform(*SCALE_FACTORS, size=values.shape).astype(values.dtype)
            tensor.CopyFrom(numpy_helper.from_array(values * factor, tensor.name))
    onnx.save(model, str(folder / "model.onnx"))
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(encoder / name, folder / name)
    return folder


def scale_initializers(path: Path) -> dict[str, np.ndarray]:
    """Every scale and zero point a Q/DQ node of the graph reads, by name."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    names = {name for node in model.graph.node if node.op_type in ("QuantizeLinear", "DequantizeLinear")
             for name in node.input[1:3] if name}
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer if t.name in names}
