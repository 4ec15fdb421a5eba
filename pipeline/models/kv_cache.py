"""Export of a causal LM with a KV cache: one ONNX graph for prefill (past length 0) and decode.

Inputs: input_ids, attention_mask (past + current tokens), position_ids and
past_key_values.N.key / .value per layer ([batch, kv_heads, past, head_dim]);
outputs: logits and present.N.key / .value. The wrapper takes flat tensors and
builds the transformers 5 `DynamicCache` itself, so the exported graph has no
cache object in its signature.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

LOGITS = "logits"


@dataclass(frozen=True)
class CacheLayout:
    layers: int
    kv_heads: int
    head_dim: int

    @classmethod
    def of(cls, config: Any) -> "CacheLayout":
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(config.num_hidden_layers, getattr(config, "num_key_value_heads", None) or heads, head_dim)

    @property
    def past_names(self) -> list[str]:
        return [f"past_key_values.{i}.{kind}" for i in range(self.layers) for kind in ("key", "value")]

    @property
    def present_names(self) -> list[str]:
        return [f"present.{i}.{kind}" for i in range(self.layers) for kind in ("key", "value")]

    def empty_past(self, batch: int) -> dict[str, np.ndarray]:
        shape = (batch, self.kv_heads, 0, self.head_dim)
        return {name: np.zeros(shape, dtype=np.float32) for name in self.past_names}


def attention_windows(config: Any) -> list[Optional[int]]:
    """Per layer, the sliding window (tokens) of its attention, or None for global attention: from the
    config's `layer_types` (qwen2/qwen3, gemma3: sliding and full layers) or one `sliding_window` for
    all layers (mistral, phi3)."""
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None) or ["sliding_attention"] * config.num_hidden_layers
    return [window if kind == "sliding_attention" and window else None for kind in types]


INPUT_NAMES = ["input_ids", "attention_mask", "position_ids"]


def cache_keyword(model: Any) -> str:
    """transformers 5.24 renamed `past_key_values` to `cache` (the old name warns until 5.40)."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def build_kv_module(model: Any) -> Any:
    import torch
    from transformers import DynamicCache

    layers = model.config.num_hidden_layers
    keyword = cache_keyword(model)

    class CausalLMWithCache(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                    *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
            cache = DynamicCache()
            for layer in range(layers):
                cache.update(past[2 * layer], past[2 * layer + 1], layer)
            result = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                use_cache=True, **{keyword: cache})
            present = cache
            flat: list[torch.Tensor] = []
            for layer in range(layers):
                flat += [present.layers[layer].keys, present.layers[layer].values]
            return (result.logits, *flat)

    return CausalLMWithCache().eval()


def example_inputs(layout: CacheLayout, batch: int, past: int, sequence: int, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random ids and a random past: used to trace with non-trivial dynamic dimensions."""
    rng = np.random.default_rng(seed)
    feed = {
        "input_ids": rng.integers(0, vocab, size=(batch, sequence), dtype=np.int64),
        "attention_mask": np.ones((batch, past + sequence), dtype=np.int64),
        "position_ids": np.tile(np.arange(past, past + sequence, dtype=np.int64), (batch, 1)),
    }
    shape = (batch, layout.kv_heads, past, layout.head_dim)
    for name in layout.past_names:
        feed[name] = rng.standard_normal(shape).astype(np.float32)
    return feed


def export_kv_model(model: Any, path: Path, opset: int) -> CacheLayout:
    """torch.onnx.export (TorchScript) with dynamic batch, sequence and past-length axes."""
    import torch

    layout = CacheLayout.of(model.config)
    module = build_kv_module(model)
    # Trace with past > 0, batch > 1 and sequence > 1 so no dimension is specialised to a constant.
    feed = example_inputs(layout, batch=2, past=3, sequence=5, vocab=model.config.vocab_size)
    names = INPUT_NAMES + layout.past_names
    args = tuple(torch.from_numpy(feed[name]) for name in names)
    axes: dict[str, dict[int, str]] = {
        "input_ids": {0: "batch", 1: "sequence"},
        "attention_mask": {0: "batch", 1: "total_sequence"},
        "position_ids": {0: "batch", 1: "sequence"},
        LOGITS: {0: "batch", 1: "sequence"},
    }
    axes.update({name: {0: "batch", 2: "past_sequence"} for name in layout.past_names})
    axes.update({name: {0: "batch", 2: "total_sequence"} for name in layout.present_names})
    with warnings.catch_warnings(), torch.inference_mode():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, args, str(path), input_names=names, output_names=[LOGITS] + layout.present_names,
            dynamic_axes=axes, opset_version=opset, dynamo=False,
        )
    return layout
