"""quantize (decoder LLMs): weight-only MatMulNBits (RTN, GPTQ or AWQ) with the lm_head/embedding policy."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any, Literal

from pipeline.config import BuildConfig
from pipeline.core.errors import InputError, StageError
from pipeline.models.registry import ModelInfo, model_fingerprint
from pipeline.stages.base import Stage, StageContext
from pipeline.stages.facts import ExportFacts, WeightOnlyFacts


class LlmQuantizeStage(Stage):
    name = "quantize"
    facts = WeightOnlyFacts
    version = 11  # 11: block sums by ReduceSum, not a 0/1 MatMul; 10: sibling MatMulNBits stacked; 9: 8-bit embedding sharing the lm_head's codes, vocab blocks of 64; 8: residual offsets folded into the MatMulNBits; 7: --llm-graph genai; 6: source grids kept
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
                "zero_point": zero_point, "lm_head": q.lm_head, "embeddings": q.embeddings, "exclude": q.exclude,
                "vocab_block_size": q.vocab_block_size,
                # the graph quantized, and what was asked (auto or a graph), which its facts record
                "llm_graph": chosen_graph(config, model), "llm_graph_asked": q.llm_graph}

    def external_inputs(self, config: BuildConfig, model: ModelInfo) -> dict[str, str]:
        # The genai graph is built from the checkpoint itself, not from the export.
        return {"model": model_fingerprint(model.path)} if chosen_graph(config, model) == "genai" else {}

    def run(self, context: StageContext, out: Path) -> dict[str, Any]:
        from calibration.readers import BatchReader
        from engines.cpu.weight_only import quantize_weight_only, uses_float_offsets
        from engines.onnx_io import check_graph
        from pipeline.stages.llm_calibrate import calibration_feeds, load_chunks

        logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)
        q = context.config.quantization
        export = context.input("export")
        fp32 = export.path("model.onnx")
        fused: dict[str, Any] = {}
        graph = chosen_graph(context.config, context.model)
        if graph == "genai":
            fp32, fused = fused_graph(context, out)
        reader = None
        if q.mode in ("gptq", "awq"):  # the only modes that read calibration text (see depends_on)
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
                              f"lm_head {q.lm_head}, embeddings {q.embeddings} (blocks of {q.vocab_block_size})")
        summary = quantize_weight_only(fp32, out / "model.onnx", q.mode, q.weight_bits, q.block_size, q.symmetric,
                                       q.lm_head, q.embeddings, reader, q.exclude, q.zero_point, checkpoint,
                                       q.vocab_block_size)
        check_graph(out / "model.onnx")
        if fused:
            fp32.unlink()  # the reference stays the export's FP32 graph (model.fp32.onnx)
            fp32 = export.path("model.onnx")
        fp32_bytes = fp32.stat().st_size
        quantized_bytes = (out / "model.onnx").stat().st_size
        return {
            **summary,
            "llm_graph": {"graph": graph, "asked": q.llm_graph, **fused},
            "fp32_bytes": fp32_bytes,
            "quantized_bytes": quantized_bytes,
            "size_ratio": round(quantized_bytes / fp32_bytes, 4),
            # The FP32 file holds the tied embedding twice (Gather table and transposed lm_head weight).
            "size_ratio_vs_fp32_parameters": round(quantized_bytes / (4 * context.facts("export", ExportFacts).parameters), 4),
        }


def chosen_graph(config: BuildConfig, model: ModelInfo) -> Literal["export", "genai"]:
    """The graph --llm-graph auto quantizes: onnxruntime-genai's fused graph where it is known to hold (the family
    declares it, plain weights, rtn: the only mode whose inputs are not read from the export graph) and its
    builder is installed; our export otherwise."""
    asked = config.quantization.llm_graph
    if asked != "auto":
        return asked
    plain_weights = model.origin is None and model.graph is None
    fits = model.architecture.genai_builder and plain_weights and config.quantization.mode == "rtn"
    return "genai" if fits and importlib.util.find_spec("onnxruntime_genai") is not None else "export"


# The fused FP32 graph against our FP32 export, same weights: prefill and decode logits (max abs).
FUSED_MAX_ABS = 1e-3


def fused_graph(context: StageContext, out: Path) -> tuple[Path, dict[str, Any]]:
    """onnxruntime-genai's fused FP32 graph of the checkpoint, in `out`, checked against the export's graph on
    the export check's real prompt and greedy decode steps (engines/cpu/genai_graph.py says why)."""
    import tempfile

    import numpy as np
    from transformers import AutoTokenizer

    from engines.cpu.genai_graph import fused_fp32_graph
    from pipeline.models.loading import save_hf_folder
    from pipeline.stages.llm_export import DECODE_STEPS, onnx_logits, probe_prompt

    export = context.input("export")
    target = out / "fused.fp32.onnx"
    context.progress.info("building onnxruntime-genai's fused FP32 graph of the same weights")
    with tempfile.TemporaryDirectory(prefix="quantpipe-hf-", dir=out) as scratch:
        save_hf_folder(context.model.path, Path(scratch))
        summary = fused_fp32_graph(Path(scratch), target)
    tokenizer = AutoTokenizer.from_pretrained(str(export.path("tokenizer")))
    prompt = list(tokenizer(probe_prompt()).input_ids)
    tokens = _greedy_tokens(export.path("model.onnx"), prompt)
    reference = onnx_logits(export.path("model.onnx"), prompt, tokens)
    actual = onnx_logits(target, prompt, tokens)
    differences = {"logits_prefill": float(np.abs(reference[0] - actual[0]).max()),
                   "logits_decode": float(max(np.abs(r - a).max() for r, a in zip(reference[1:], actual[1:])))}
    broken = [f"{name} max |diff| {value:.3g}" for name, value in differences.items() if not value <= FUSED_MAX_ABS]
    if broken:
        raise StageError("quantize", f"onnxruntime-genai's fused graph disagrees with the export (limit "
                                     f"{FUSED_MAX_ABS}, {DECODE_STEPS} decode steps): {', '.join(broken)}")
    context.progress.info(f"fused graph: {summary['nodes']} nodes, logits within {max(differences.values()):.2g} "
                          "of the export")
    return target, {**summary, "export_parity_max_abs": differences}


def _greedy_tokens(model: Path, prompt: list[int]) -> list[int]:
    from pipeline.models.decoding import KVDecoder, generate
    from pipeline.stages.llm_export import DECODE_STEPS

    with KVDecoder(model) as decoder:
        return generate(decoder, prompt, DECODE_STEPS).tokens
