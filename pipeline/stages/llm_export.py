"""export (decoder LLMs): PyTorch -> one ONNX graph with a KV cache, checked against PyTorch's own cache.

The check runs a real BBC News prompt through prefill and then DECODE_STEPS single-token steps, in
PyTorch (transformers' DynamicCache) and in ONNX Runtime (the graph's present keys/values fed back),
with the same greedy tokens, and gates on the max absolute logits difference of both phases.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from pipeline.config import BuildConfig
from pipeline.core.errors import StageError
from pipeline.models.adapters import adapter_inputs, is_adapted, peft_reference
from pipeline.models.registry import ModelInfo, model_fingerprint
from pipeline.stages.base import Stage, StageContext
from pipeline.stages.facts import ExportFacts

DECODE_STEPS = 16
EXPORT_MAX_ABS = 1e-3
# GatherBlockQuantized (the 4-bit embedding) is only valid beside opset-21 default-domain ops.
LLM_OPSET = 21


def trace_opset(config: BuildConfig) -> int:
    """The TorchScript exporter traces at --opset up to 20; the graph is converted to LLM_OPSET after."""
    return min(config.model.opset, 20)
PROBE_PROMPT_WORDS = 24


def probe_prompt() -> str:
    from calibration.sources import default_source

    for sample in default_source():
        if len(sample.text.split()) >= PROBE_PROMPT_WORDS:
            return sample.text
    raise StageError("export", "the default corpus holds no sentence long enough for the export check")


def torch_reference(model: Any, prompt_ids: list[int], steps: int) -> tuple[list[np.ndarray], list[int]]:
    """Logits of prefill and each greedy decode step, from transformers with the cache it makes itself (the
    family's own layers: sliding-window layers keep only their window), not the export's wrapper."""
    import torch

    from pipeline.models.kv_cache import cache_keyword

    keyword = cache_keyword(model)
    ids = torch.tensor([prompt_ids])
    logits_per_step, tokens = [], []
    with torch.inference_mode():
        mask = torch.ones_like(ids)
        result = model(input_ids=ids, attention_mask=mask, use_cache=True)
        logits_per_step.append(result.logits[0].numpy())
        for _ in range(steps):
            token = int(result.logits[0, -1].argmax())
            tokens.append(token)
            mask = torch.cat([mask, torch.ones((1, 1), dtype=mask.dtype)], dim=1)
            result = model(input_ids=torch.tensor([[token]]), attention_mask=mask, use_cache=True,
                           **{keyword: result[keyword]})
            logits_per_step.append(result.logits[0].numpy())
    return logits_per_step, tokens


def onnx_logits(model_path: Path, prompt_ids: list[int], tokens: list[int]) -> list[np.ndarray]:
    """The same prefill and decode steps in ONNX Runtime, feeding the graph's own cache back."""
    from pipeline.models.decoding import KVDecoder

    with KVDecoder(model_path) as decoder:
        ids = np.array([prompt_ids], dtype=np.int64)
        logits, past = decoder.step(ids, np.ones_like(ids), decoder.empty_past(1))
        outputs = [logits[0]]
        for token in tokens:
            ids = np.concatenate([ids, [[token]]], axis=1)
            logits, past = decoder.step(ids[:, -1:], np.ones_like(ids), past)
            outputs.append(logits[0])
    return outputs


class LlmExportStage(Stage):
    name = "export"
    facts = ExportFacts
    version = 2  # 2: checked against transformers' own cache (sliding-window layers), graph checked before caching
    outputs = ("model.onnx", "tokenizer")

    def config_slice(self, config: BuildConfig, model: ModelInfo) -> dict[str, Any]:
        return {"task": model.task.name, "opset": LLM_OPSET, "trace_opset": trace_opset(config),
                "decode_steps": DECODE_STEPS}

    def external_inputs(self, config: BuildConfig, model: ModelInfo) -> dict[str, str]:
        return {"model": model_fingerprint(model.path), **adapter_inputs(model)}

    def run(self, context: StageContext, out: Path) -> dict[str, Any]:
        from onnx import version_converter

        from engines.onnx_io import check_graph, save_model
        from pipeline.models.kv_cache import attention_windows, export_kv_model
        from pipeline.models.loading import load_llm, load_llm_tokenizer

        info = context.model
        context.progress.info(f"loading {info.path.name} (FP32)")
        tokenizer = load_llm_tokenizer(info.path)
        model = load_llm(info.path)
        context.progress.info(f"exporting {info.name} with a KV cache ({model.config.num_hidden_layers} layers)")
        with tempfile.TemporaryDirectory(prefix="quantpipe-llm-export-", dir=out.parent) as scratch:
            traced = Path(scratch) / "traced.onnx"
            layout = export_kv_model(model, traced, opset=trace_opset(context.config))
            converted = version_converter.convert_version(onnx.load(str(traced)), LLM_OPSET)
        save_model(converted, out / "model.onnx")
        del converted
        check_graph(out / "model.onnx")
        tokenizer.save_pretrained(str(out / "tokenizer"))

        prompt_ids = list(tokenizer(probe_prompt()).input_ids)
        context.progress.info(f"checking ONNX Runtime against PyTorch: prefill of {len(prompt_ids)} tokens "
                              f"and {DECODE_STEPS} decode steps with the cache")
        reference = model
        if is_adapted(info):  # the PEFT model's LoRA-injected module (unmerged), not the merged weights
            context.progress.info(f"reference: the PEFT model of {info.origin['adapter']} on its base, unmerged")
            reference = peft_reference(info, "AutoModelForCausalLM").get_base_model()
        expected, tokens = torch_reference(reference, prompt_ids, DECODE_STEPS)
        actual = onnx_logits(out / "model.onnx", prompt_ids, tokens)
        prefill = float(np.abs(expected[0] - actual[0]).max())
        decode = float(max(np.abs(e - a).max() for e, a in zip(expected[1:], actual[1:])))
        differences = {"logits_prefill": prefill, "logits_decode": decode}
        broken = {name: value for name, value in differences.items() if not value <= EXPORT_MAX_ABS}
        if broken:
            detail = ", ".join(f"{name} max |diff| {value:.3g}" for name, value in broken.items())
            raise StageError(self.name, f"ONNX graph disagrees with PyTorch (limit {EXPORT_MAX_ABS}): {detail}")
        return {
            "opset": LLM_OPSET,
            "parameters": int(sum(p.numel() for p in model.parameters())),
            # Sliding-window layers keep every past position in the graph's cache; their mask applies the window.
            "kv_cache": {"layers": layout.layers, "kv_heads": layout.kv_heads, "head_dim": layout.head_dim,
                         "sliding_windows": attention_windows(model.config),
                         "tied_lm_head": bool(getattr(model.config, "tie_word_embeddings", False))},
            "onnx_bytes": (out / "model.onnx").stat().st_size,
            "torch_parity_max_abs": differences,
            "decode_steps": DECODE_STEPS,
            "prompt_tokens": len(prompt_ids),
        }
