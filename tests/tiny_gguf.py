"""Tiny GGUF files of a non-Llama family (qwen2), written in code with the `gguf` package.

The weights are a random transformers model's, stored as GGUF quantization types llama.cpp ships:
Q8_0 (gguf's own quantizer), and Q4_K and Q6_K, which gguf 0.19 can only de-quantize: they are
packed here into their llama.cpp block layouts (and checked by gguf's de-quantizer), with plain
per-block scale choices instead of llama.cpp's search. Q4_K_M is llama.cpp's mix: Q6_K for the first
layer's attn_v and ffn_down (its `use_more_bits` layers), Q4_K for the other matrices. K-quant rows
are 256 values, so these models are 256 wide. The tokenizer is SmolLM2's, copied from its GGUF.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np

QK_K = 256
WIDTH = {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "max_position_embeddings": 512, "tie_word_embeddings": True,
         "initializer_range": 0.1}


def pack_q4_k(rows: np.ndarray) -> np.ndarray:
    """Q4_K super-blocks (256 values: 8 sub-blocks of 32, value = d*sc*q - dmin*m with 6-bit sc and m)."""
    blocks = rows.astype(np.float32).reshape(-1, 8, 32)
    low = np.minimum(blocks.min(axis=2), 0.0)  # Q4_K's minimum is an offset m >= 0 subtracted
    step = (blocks.max(axis=2) - low) / 15
    d = (step.max(axis=1) / 63).astype(np.float16)
    dmin = ((-low).max(axis=1) / 63).astype(np.float16)
    safe_d = np.where(d > 0, d, 1).astype(np.float32)[:, None]
    safe_dmin = np.where(dmin > 0, dmin, 1).astype(np.float32)[:, None]
    # Rounded as llama.cpp rounds them: a sub-block whose 6-bit scale rounds up has codes that stop short of 15.
    sc = np.clip(np.rint(step / safe_d), 1, 63).astype(np.uint8)
    m = np.clip(np.rint(-low / safe_dmin), 0, 63).astype(np.uint8)
    scale = (d.astype(np.float32)[:, None] * sc)[:, :, None]
    offset = (dmin.astype(np.float32)[:, None] * m)[:, :, None]
    q = np.clip(np.rint((blocks + offset) / scale), 0, 15).astype(np.uint8)
    packed_scales = np.concatenate([
        (sc[:, :4] & 63) | ((sc[:, 4:] >> 4) << 6),
        (m[:, :4] & 63) | ((m[:, 4:] >> 4) << 6),
        (sc[:, 4:] & 15) | ((m[:, 4:] & 15) << 4),
    ], axis=1).astype(np.uint8)
    pairs = q.reshape(-1, 4, 2, 32)
    qs = (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(-1, 128)
    return np.concatenate([d.view(np.uint8).reshape(-1, 2), dmin.view(np.uint8).reshape(-1, 2), packed_scales, qs],
                          axis=1)


def pack_q6_k(rows: np.ndarray) -> np.ndarray:
    """Q6_K super-blocks (256 values: 16 sub-blocks of 16, value = d*sc*(q-32) with int8 sc, 6-bit q)."""
    blocks = rows.astype(np.float32).reshape(-1, 16, 16)
    step = np.abs(blocks).max(axis=2) / 31
    d = (step.max(axis=1) / 127).astype(np.float16)
    safe_d = np.where(d > 0, d, 1).astype(np.float32)[:, None]
    sc = np.clip(np.rint(step / safe_d), 1, 127).astype(np.int8)
    scale = (d.astype(np.float32)[:, None] * sc)[:, :, None]
    u = (np.clip(np.rint(blocks / scale), -32, 31) + 32).astype(np.uint8).reshape(-1, QK_K)
    low, high = (u & 15).reshape(-1, 2, 2, 64), (u >> 4).reshape(-1, 2, 4, 32)
    ql = (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(-1, 128)
    qh = (high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)).reshape(-1, 64)
    return np.concatenate([ql, qh, sc.view(np.uint8), d.view(np.uint8).reshape(-1, 2)], axis=1)


def quantize_rows(weight: np.ndarray, qtype: Any) -> np.ndarray:
    """GGUF bytes of a 2-D weight ([rows, row length]) in `qtype`, shaped [rows, bytes per row]."""
    from gguf import GGMLQuantizationType as T
    from gguf import quants

    if qtype in (T.Q4_K, T.Q6_K):
        packed = (pack_q4_k if qtype == T.Q4_K else pack_q6_k)(weight.reshape(-1, QK_K))
        return packed.reshape(weight.shape[0], -1)
    return quants.quantize(weight.astype(np.float32), qtype)


def tensor_types(file_type: str, name: str) -> Any:
    from gguf import GGMLQuantizationType as T

    if file_type == "Q4_K_M":
        return T.Q6_K if name in ("blk.0.attn_v.weight", "blk.0.ffn_down.weight") else T.Q4_K
    return {"Q8_0": T.Q8_0, "Q6_K": T.Q6_K, "Q4_K": T.Q4_K}[file_type]


@functools.lru_cache(maxsize=1)
def _tokenizer_source() -> Any:
    """SmolLM2's GGUF, read once (its 49,152 tokens and merges take seconds to parse)."""
    from gguf import GGUFReader

    from pipeline.models.loading import smollm2_gguf

    return GGUFReader(str(smollm2_gguf()))


def write_tiny_gguf(path: Path, file_type: str, seed: int = 0) -> Path:
    """A random qwen2 causal LM as a GGUF file of `file_type` (Q4_K_M, Q4_K, Q6_K or Q8_0)."""
    import gguf
    import torch
    from gguf import GGUFWriter
    from transformers import AutoConfig, AutoModelForCausalLM

    source = _tokenizer_source()
    vocab = len(source.fields["tokenizer.ggml.tokens"].data)
    config = AutoConfig.for_model("qwen2", vocab_size=vocab, **WIDTH)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN2, config.num_hidden_layers)

    writer = GGUFWriter(str(path), "qwen2")
    writer.add_name(f"tiny-qwen2-{file_type}")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(float(config.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(vocab)
    for key in ("model", "pre"):
        writer.add_string(f"tokenizer.ggml.{key}", source.fields[f"tokenizer.ggml.{key}"].contents())
    writer.add_token_list(source.fields["tokenizer.ggml.tokens"].contents())
    writer.add_token_types(source.fields["tokenizer.ggml.token_type"].contents())
    writer.add_token_merges(source.fields["tokenizer.ggml.merges"].contents())
    for key in ("bos_token_id", "eos_token_id", "unknown_token_id", "padding_token_id"):
        writer.add_uint32(f"tokenizer.ggml.{key}", source.fields[f"tokenizer.ggml.{key}"].contents())
    writer.add_bool("tokenizer.ggml.add_bos_token", False)
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight":  # tied: GGUF stores token_embd once
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        data = tensor.detach().numpy().astype(np.float32)
        if data.ndim == 2:
            qtype = tensor_types(file_type, name)
            writer.add_tensor(name, quantize_rows(data, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
