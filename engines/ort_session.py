"""ONNX Runtime on the CPU: sessions and a runner with the one data contract."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import onnxruntime as ort

Feed = dict[str, np.ndarray]

OPTIMIZATION_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}

# Keeps Add + LayerNormalization unfused: see pipeline.stages.optimize.FUSE_SKIP_LAYER_NORM for the numbers.
DISABLED_OPTIMIZERS = ["SkipLayerNormFusion"]


def create_session(
    model_path: Path | bytes,
    threads: int = 0,
    optimization: str = "all",
    optimized_model_path: Optional[Path] = None,
    external_initializers: Optional[tuple[Sequence[str], Sequence[ort.OrtValue]]] = None,
) -> ort.InferenceSession:
    """A CPU session (from a file, or a serialized model); threads=0 lets ONNX Runtime use every core."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = OPTIMIZATION_LEVELS[optimization]
    options.log_severity_level = 3
    if optimized_model_path is not None:
        options.optimized_model_filepath = str(optimized_model_path)
    if external_initializers is not None and external_initializers[0]:
        options.add_external_initializers(list(external_initializers[0]), list(external_initializers[1]))
    model = model_path if isinstance(model_path, bytes) else str(model_path)
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"],
                                disabled_optimizers=DISABLED_OPTIMIZERS)


class OrtRunner:
    """Runs one ONNX graph: `infer(feed) -> {output_name: array}`."""

    def __init__(self, model_path: Path, threads: int = 0, output_names: Optional[Sequence[str]] = None) -> None:
        self.model_path = model_path
        self.session = create_session(model_path, threads)
        self.input_names = [item.name for item in self.session.get_inputs()]
        self.output_names = list(output_names or [item.name for item in self.session.get_outputs()])

    def infer(self, feed: Feed) -> dict[str, np.ndarray]:
        inputs = {name: feed[name] for name in self.input_names}
        return dict(zip(self.output_names, self.session.run(self.output_names, inputs)))

    def __enter__(self) -> "OrtRunner":
        return self

    def __exit__(self, *exc: object) -> None:
        del self.session
