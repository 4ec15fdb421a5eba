"""quantize (decoder LLMs): weight-only MatMulNBits (RTN, GPTQ or AWQ) with the lm_head/embedding policy."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from pipeline.config import BuildConfig
from pipeline.core.errors import InputError
from pipeline.models.registry import ModelInfo
from pipeline.stages.base import Stage, StageContext
from pipeline.stages.facts import ExportFacts, WeightOnlyFacts


class LlmQuantizeStage(Stage):
    name = "quantize"
    facts = WeightOnlyFacts
    version = 6  # 6: float-offset blocks keep a source 4-bit grid (Q4_K sub-blocks); the graph is checked
    outputs = ("model.onnx",)

    def depends_on(self, config: BuildConfig) -> tuple[str, ...]:
        # RTN reads no text, so new calibration samples must not re-run it.
        return ("export",) if config.quantization.mode in ("rtn", "checkpoint") else ("export", "calibrate")

    def config_slice(self, config: BuildConfig, model: ModelInfo) -> dict[str, Any]:
        from engines.cpu.weight_only import uses_float_offsets

        q = config.quantization
        # The zero-point option only changes 4-bit asymmetric RTN: GPTQ/AWQ must not re-run for it.
        zero_point = "float" if uses_float_offsets(q.mode, q.weight_bits, q.symmetric, q.zero_point) else "int"
        return {"mode": q.mode, "weight_bits": q.weight_bits, "block_size": q.block_size, "symmetric": q.symmetric,
                "zero_point": zero_point, "lm_head": q.lm_head, "embeddings": q.embeddings, "exclude": q.exclude}

    def run(self, context: StageContext, out: Path) -> dict[str, Any]:
        from calibration.readers import BatchReader
        from engines.cpu.weight_only import quantize_weight_only, uses_float_offsets
        from engines.onnx_io import check_graph
        from pipeline.stages.llm_calibrate import calibration_feeds, load_chunks

        logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)
        q = context.config.quantization
        export = context.input("export")
        fp32 = export.path("model.onnx")
        reader = None
        if q.mode != "rtn":
            chunks = load_chunks(context.input("calibrate").path("calibration.safetensors"))
            layout = context.facts("export", ExportFacts).kv_cache.layout
            reader = BatchReader(calibration_feeds(chunks, layout), on_batch=lambda done, total: context.progress.batches(
                f"{q.mode} calibration", done, total))  # GPTQ/AWQ read the chunks once per pass: one bar per pass
            context.progress.info(f"{q.mode.upper()} calibrated on {len(chunks)} chunks of real text")
        checkpoint: list = []
        if q.mode == "checkpoint":
            from pipeline.models.prequantized import checkpoint_scheme, read_linears

            found = checkpoint_scheme(context.model.path)
            if found is None:
                raise InputError(f"{context.model.name} is not a pre-quantized checkpoint (--quant checkpoint)")
            checkpoint = read_linears(context.model.path, found)[0]
            context.progress.info(f"{found.describe()}: {len(checkpoint)} Linears keep the checkpoint's own codes")
        float_offsets = uses_float_offsets(q.mode, q.weight_bits, q.symmetric, q.zero_point)
        scheme = "symmetric" if q.symmetric else "asymmetric, " + ("float offsets" if float_offsets else "integer zero points")
        context.progress.info(f"{q.mode} {q.weight_bits}-bit weights, block {q.block_size} ({scheme}); "
                              f"lm_head {q.lm_head}, embeddings {q.embeddings}")
        summary = quantize_weight_only(fp32, out / "model.onnx", q.mode, q.weight_bits, q.block_size, q.symmetric,
                                       q.lm_head, q.embeddings, reader, q.exclude, q.zero_point, checkpoint)
        check_graph(out / "model.onnx")
        fp32_bytes = fp32.stat().st_size
        quantized_bytes = (out / "model.onnx").stat().st_size
        return {
            **summary,
            "fp32_bytes": fp32_bytes,
            "quantized_bytes": quantized_bytes,
            "size_ratio": round(quantized_bytes / fp32_bytes, 4),
            # The FP32 file holds the tied embedding twice (Gather table and transposed lm_head weight).
            "size_ratio_vs_fp32_parameters": round(quantized_bytes / (4 * context.facts("export", ExportFacts).parameters), 4),
        }
