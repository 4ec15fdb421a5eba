"""A model folder checked against what it claims, before anything is exported from it.

- config.json: `architectures` is a list of names; sizes are whole numbers within named bounds (a
  `num_hidden_layers` of -1 builds an encoder-less model, 1e9 runs for minutes and eats memory).
- the tokenizer loads and covers the config's vocabulary (a folder whose tokenizer files are gone loads
  as a handful of special tokens that map every text to [UNK]).
- the weights: every tensor the architecture expects is in the checkpoint and nothing else is
  (transformers' loading report, never a silenced warning), and every weight is finite.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from pipeline.core.errors import InputError

# (config key, smallest, largest): generous for every released model of the supported families.
SIZE_BOUNDS: tuple[tuple[str, int, int], ...] = (
    ("num_hidden_layers", 1, 512),
    ("n_layers", 1, 512),
    ("num_attention_heads", 1, 1024),
    ("n_heads", 1, 1024),
    ("num_key_value_heads", 1, 1024),
    ("hidden_size", 1, 65_536),
    ("dim", 1, 65_536),
    ("intermediate_size", 1, 524_288),
    ("vocab_size", 2, 4_000_000),
    ("max_position_embeddings", 1, 4_194_304),
    ("type_vocab_size", 0, 1024),  # 0: no token types (DeBERTa-v3 checkpoints)
)
# The tokenizer must reach at least this share of the config's vocabulary (and never beyond it).
MIN_VOCAB_COVERAGE = 0.5
SHOWN = 5


def check_config(config_file: Path, config: Mapping[str, Any]) -> None:
    """config.json's claims: types and sizes (one InputError naming the key and its bound)."""
    architectures = config.get("architectures")
    if architectures is not None and (not isinstance(architectures, list)
                                      or not all(isinstance(name, str) for name in architectures)):
        raise InputError(f"{config_file}: 'architectures' must be a list of class names, got {architectures!r:.80}")
    for key, low, high in SIZE_BOUNDS:
        if key not in config or config[key] is None:
            continue
        value = config[key]
        if not isinstance(value, int) or isinstance(value, bool):
            raise InputError(f"{config_file}: '{key}' must be a whole number, got {value!r:.40}")
        if not low <= value <= high:
            raise InputError(f"{config_file}: '{key}' is {value}, outside the sane bound {low}..{high} "
                             f"(pipeline.models.validation.SIZE_BOUNDS)")
    hidden, heads = config.get("hidden_size"), config.get("num_attention_heads")
    if isinstance(hidden, int) and isinstance(heads, int) and "head_dim" not in config and hidden % heads:
        raise InputError(f"{config_file}: hidden_size {hidden} is not a multiple of num_attention_heads {heads}")


def check_tokenizer(folder: Path, config: Mapping[str, Any], tokenizer: Any) -> None:
    """The tokenizer's vocabulary fits the embedding matrix and covers most of it."""
    size = len(tokenizer)
    vocab = config.get("vocab_size")
    if size <= len(getattr(tokenizer, "all_special_ids", [])) or size < 2:
        raise InputError(f"the tokenizer of {folder} has an empty vocabulary ({size} tokens, special tokens "
                         "only); restore its tokenizer files (tokenizer.json or vocab.txt)")
    if isinstance(vocab, int):
        if size > vocab:
            raise InputError(f"the tokenizer of {folder} has {size} tokens, more than config.json's vocab_size "
                             f"{vocab}: ids past the embedding matrix")
        if size < MIN_VOCAB_COVERAGE * vocab:
            raise InputError(f"the tokenizer of {folder} covers {size} of config.json's {vocab} tokens (below "
                             f"{MIN_VOCAB_COVERAGE:.0%}, MIN_VOCAB_COVERAGE); its tokenizer files are missing or "
                             "belong to another model")


def _names(keys: Any) -> str:
    names = sorted(str(key) for key in keys)
    return ", ".join(names[:SHOWN]) + (f" and {len(names) - SHOWN} more" if len(names) > SHOWN else "")


def check_loaded_weights(folder: Path, model: Any, loading_info: Mapping[str, Any],
                         unused: tuple[str, ...] = ()) -> None:
    """transformers' loading report (from_pretrained(output_loading_info=True)) and finite weights;
    `unused`: prefixes of modules the exported graph does not use (a missing pooler, a classifier head)."""
    import torch

    for kind, advice in (("missing_keys", "the checkpoint lacks tensors the architecture needs"),
                         ("unexpected_keys", "the checkpoint holds tensors the architecture does not have"),
                         ("mismatched_keys", "tensors whose shape differs from config.json's")):
        keys = [key for key in loading_info.get(kind) or ()
                if not str(key[0] if isinstance(key, tuple) else key).startswith(unused or ("\x00",))]
        if keys:
            if kind == "mismatched_keys":
                keys = [key[0] if isinstance(key, tuple) else key for key in keys]
            raise InputError(f"{folder} does not hold the model config.json describes: {advice} ({_names(keys)})")
    with torch.no_grad():
        broken = [name for name, tensor in model.state_dict().items()
                  if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())]
    if broken:
        raise InputError(f"{folder} has weights that are NaN or infinite: {_names(broken)}")
