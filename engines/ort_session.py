"""ONNX Runtime on the CPU: sessions and a runner with the one data contract."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import onnxruntime as ort

from pipeline.core.host import session_threads

Feed = dict[str, np.ndarray]

OPTIMIZATION_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}

# Keeps Add + LayerNormalization unfused: see pipeline.stages.optimize.FUSE_SKIP_LAYER_NORM for the numbers.
DISABLED_OPTIMIZERS = ["SkipLayerNormFusion"]

# A Q/DQ graph meant for TensorRT, run here as exact fake quantization: ONNX Runtime must not fuse its
# Q/DQ pairs into integer kernels (MatMulInteger, QLinearMatMul, ...), whose arithmetic depends on the
# CPU (7-bit weights without VNNI) and which TensorRT does not compute. Keys from ONNX Runtime's
# onnxruntime_session_options_config_keys.h: "1" turns the QDQ fusions off (DequantizeLinear of a
# constant weight is then constant-folded, which is exact), and keeps Q->DQ->Q->DQ chains intact.
TENSORRT_SIMULATION_CONFIG = {
    "session.disable_quant_qdq": "1",
    "session.disable_double_qdq_remover": "1",
}


def apply_threads(options: ort.SessionOptions, threads: int) -> None:
    """threads=0: every core, or the process's core budget (pipeline.core.host.core_budget); a budgeted session
    does not spin its idle threads, which on a shared host take the cores its siblings are computing on."""
    threads, spin = session_threads(threads)
    if not spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1


@dataclass(frozen=True)
class SessionSettings:
    """The ONNX Runtime session settings a build was measured with, recorded in its manifest ("runtime")
    so that every loader (the Python API, `pipeline serve`, a user's own code) opens the graph the same way."""

    graph_optimization_level: str = "ORT_ENABLE_ALL"
    disabled_optimizers: tuple[str, ...] = tuple(DISABLED_OPTIMIZERS)
    session_config_entries: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def for_target(cls, target: str) -> "SessionSettings":
        """cpu: ONNX Runtime's integer kernels are the deployment; trt: the Q/DQ graph as exact fake quantization."""
        return cls(session_config_entries=dict(TENSORRT_SIMULATION_CONFIG) if target == "trt" else {})

    def to_dict(self) -> dict[str, Any]:
        return {"engine": "onnxruntime", "onnxruntime_version": ort.__version__,
                "execution_provider": "CPUExecutionProvider", "graph_optimization_level": self.graph_optimization_level,
                "disabled_optimizers": list(self.disabled_optimizers),
                "session_config_entries": dict(self.session_config_entries)}

    @classmethod
    def from_dict(cls, runtime: Mapping[str, Any]) -> "SessionSettings":
        """Read a manifest's "runtime"; a value ONNX Runtime does not know is a ValueError naming it."""
        level = str(runtime.get("graph_optimization_level", "ORT_ENABLE_ALL"))
        if not hasattr(ort.GraphOptimizationLevel, level):
            raise ValueError(f"unknown graph_optimization_level {level!r}")
        disabled = runtime.get("disabled_optimizers", DISABLED_OPTIMIZERS)
        entries = runtime.get("session_config_entries", {})
        if not isinstance(disabled, list) or not all(isinstance(name, str) for name in disabled):
            raise ValueError("disabled_optimizers must be a list of optimizer names")
        if not isinstance(entries, dict) or not all(isinstance(v, str) for v in entries.values()):
            raise ValueError("session_config_entries must map keys to strings")
        return cls(level, tuple(disabled), dict(entries))

    def apply(self, options: ort.SessionOptions) -> None:
        options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, self.graph_optimization_level)
        for key, value in self.session_config_entries.items():
            options.add_session_config_entry(key, value)


def create_session(
    model_path: Path | bytes,
    threads: int = 0,
    optimization: str = "all",
    optimized_model_path: Optional[Path] = None,
    external_initializers: Optional[tuple[Sequence[str], Sequence[ort.OrtValue]]] = None,
    simulate_tensorrt: bool = False,
    settings: Optional[SessionSettings] = None,
    profile_prefix: Optional[str] = None,
) -> ort.InferenceSession:
    """A CPU session (from a file, or a serialized model); threads=0 lets ONNX Runtime use every core.
    profile_prefix: ONNX Runtime's profiler on, its trace written to `<prefix>_<date>.json` (end_profiling()).

    simulate_tensorrt: run a graph meant for TensorRT (Q/DQ kept as float ops, see
    TENSORRT_SIMULATION_CONFIG). CPU INT8 builds leave it off: ONNX Runtime's integer kernels are their
    deployment. settings: a build's recorded settings (SessionSettings.from_dict of its manifest's
    "runtime"); they replace `optimization` and `simulate_tensorrt`.
    """
    options = ort.SessionOptions()
    apply_threads(options, threads)
    options.graph_optimization_level = OPTIMIZATION_LEVELS[optimization]
    options.log_severity_level = 3
    if simulate_tensorrt:
        for key, value in TENSORRT_SIMULATION_CONFIG.items():
            options.add_session_config_entry(key, value)
    if settings is not None:
        settings.apply(options)
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    if optimized_model_path is not None:
        options.optimized_model_filepath = str(optimized_model_path)
    if external_initializers is not None and external_initializers[0]:
        options.add_external_initializers(list(external_initializers[0]), list(external_initializers[1]))
    model = model_path if isinstance(model_path, bytes) else str(model_path)
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"],
                                disabled_optimizers=list(settings.disabled_optimizers if settings else DISABLED_OPTIMIZERS))


class OrtRunner:
    """Runs one ONNX graph: `infer(feed) -> {output_name: array}`."""

    def __init__(self, model_path: Path, threads: int = 0, output_names: Optional[Sequence[str]] = None,
                 simulate_tensorrt: bool = False) -> None:
        self.model_path = model_path
        self.session = create_session(model_path, threads, simulate_tensorrt=simulate_tensorrt)
        self.input_names = [item.name for item in self.session.get_inputs()]
        self.output_names = list(output_names or [item.name for item in self.session.get_outputs()])

    def infer(self, feed: Feed) -> dict[str, np.ndarray]:
        inputs = {name: feed[name] for name in self.input_names}
        return dict(zip(self.output_names, self.session.run(self.output_names, inputs)))

    def __enter__(self) -> "OrtRunner":
        return self

    def __exit__(self, *exc: object) -> None:
        del self.session
