"""optimize: ONNX Runtime's transformer fusions; the result is the FP32 baseline for parity and speed."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from engines.neural_compressor import name_all_nodes
from pipeline.config import BuildConfig
from pipeline.errors import StageError
from pipeline.models import ModelInfo, load_tokenizer
from pipeline.onnx_io import save_model
from pipeline.stages.base import Stage, StageContext
from pipeline.stages.export import max_abs_differences, probe_batches

OPTIMIZE_MAX_ABS = 1e-3


class OptimizeStage(Stage):
    name = "optimize"
    outputs = ("model.onnx",)

    def depends_on(self, config: BuildConfig) -> tuple[str, ...]:
        return ("export",)

    def config_slice(self, config: BuildConfig, model: ModelInfo) -> dict[str, Any]:
        return {
            "optimizer_model_type": model.architecture.ort_optimizer_type,
            "num_heads": model.num_heads,
            "hidden_size": model.hidden_size,
        }

    def run(self, context: StageContext, out: Path) -> dict[str, Any]:
        from onnxruntime.transformers.optimizer import optimize_model

        from engines.onnxruntime_cpu import OrtRunner

        info = context.model
        exported = context.input("export").path("model.onnx")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # opt_level=0: only the Python fusions, so the graph stays portable across ORT builds.
            optimized = optimize_model(
                str(exported), model_type=info.architecture.ort_optimizer_type,
                num_heads=info.num_heads, hidden_size=info.hidden_size, opt_level=0,
            )
        fusions = {op: count for op, count in optimized.get_fused_operator_statistics().items() if count}
        model = optimized.model
        name_all_nodes(model)
        save_model(model, out / "model.onnx")

        probes = probe_batches(info, load_tokenizer(info))
        with OrtRunner(exported) as before, OrtRunner(out / "model.onnx") as after:
            differences = max_abs_differences(
                [before.infer(b) for b in probes], [after.infer(b) for b in probes]
            )
        broken = {name: diff for name, diff in differences.items() if not diff <= OPTIMIZE_MAX_ABS}
        if broken:
            raise StageError(self.name, f"fused graph disagrees with the export: {broken}")
        context.progress.info("fused: " + ", ".join(f"{op} x{n}" for op, n in fusions.items()))
        return {
            "fusions": fusions,
            "onnx_bytes": (out / "model.onnx").stat().st_size,
            "export_parity_max_abs": differences,
        }
