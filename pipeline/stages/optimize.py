"""optimize: ONNX Runtime's transformer fusions; the result is the FP32 baseline for parity and speed."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from engines.cpu.neural_compressor import name_all_nodes
from engines.onnx_io import declare_domains, save_model
from pipeline.config import BuildConfig
from pipeline.core.errors import StageError
from pipeline.models.registry import ModelInfo, load_tokenizer
from pipeline.stages.base import Stage, StageContext
from pipeline.stages.export import max_abs_differences, probe_batches
from pipeline.stages.facts import OptimizeFacts

OPTIMIZE_MAX_ABS = 1e-3

# ONNX Runtime 1.32's CPU SkipLayerNormalization kernel is a scalar loop with a division per element:
# measured 0.82 ms against 0.18 ms for Add + LayerNormalization on 1024 x 384 floats (2 threads), 7-8 ms
# of a 70 ms MiniLM forward pass. The residual Adds stay unfused here, and sessions keep ONNX Runtime
# from re-fusing them (engines.ort_session.DISABLED_OPTIMIZERS).
FUSE_SKIP_LAYER_NORM = False
# The FusionOptions flags a family declares (Architecture.ort_fusions) or leaves off.
DECLARED_FUSIONS = ("attention", "embed_layer_norm", "gelu", "bias_gelu", "layer_norm")


class OptimizeStage(Stage):
    name = "optimize"
    facts = OptimizeFacts
    outputs = ("model.onnx",)

    def depends_on(self, config: BuildConfig) -> tuple[str, ...]:
        return ("export",)

    def config_slice(self, config: BuildConfig, model: ModelInfo) -> dict[str, Any]:
        return {
            "optimizer_model_type": model.architecture.ort_optimizer_type,
            "num_heads": model.num_heads,
            "hidden_size": model.hidden_size,
            "fuse_skip_layer_norm": FUSE_SKIP_LAYER_NORM,
            "fusions": list(model.architecture.ort_fusions),
        }

    def run(self, context: StageContext, out: Path) -> dict[str, Any]:
        from onnxruntime.transformers.fusion_options import FusionOptions
        from onnxruntime.transformers.optimizer import optimize_model

        from engines.ort_session import OrtRunner

        info = context.model
        exported = context.input("export").path("model.onnx")
        options = FusionOptions(info.architecture.ort_optimizer_type)
        options.enable_skip_layer_norm = FUSE_SKIP_LAYER_NORM
        for fusion in DECLARED_FUSIONS:
            setattr(options, f"enable_{fusion}", fusion in info.architecture.ort_fusions)
        options.enable_bias_skip_layer_norm = FUSE_SKIP_LAYER_NORM
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # opt_level=0: only the Python fusions, so the graph stays portable across ORT builds.
            optimized = optimize_model(
                str(exported), model_type=info.architecture.ort_optimizer_type,
                num_heads=info.num_heads, hidden_size=info.hidden_size, opt_level=0,
                optimization_options=options,
            )
        fusions = {op: count for op, count in optimized.get_fused_operator_statistics().items() if count}
        model = optimized.model
        declare_domains(model)
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
        context.progress.info("fused: " + (", ".join(f"{op} x{n}" for op, n in fusions.items()) or "nothing"))
        return {
            "fusions": fusions,
            "fusions_enabled": list(info.architecture.ort_fusions),
            "onnx_bytes": (out / "model.onnx").stat().st_size,
            "export_parity_max_abs": differences,
        }
