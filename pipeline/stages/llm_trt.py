"""The TensorRT target for decoder LLMs: what differs from the encoder's TensorRT path, and nothing else.

The graph is the KV-cache export (one graph for prefill and decode); its precision is written by
engines/trt/precision.py with the encoder's rules (FP16 with norms/softmax in FP32; INT8/FP8 Q/DQ on
every MatMul input, calibrated on real text, the measured fallback keeping the worst nodes unquantized).
Three things are LLM-specific:
- calibration feeds are prefill feeds (past length 0) of the calibration chunks;
- the fallback search holds the graph to the perplexity gate, not to a cosine: its score is the
  perplexity ratio FP32 / candidate on the calibration chunks (1.0: no loss);
- two optimization profiles, prefill and decode (below).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from engines.trt.precision import Score
from pipeline.config import BuildConfig
from pipeline.models.decoding import next_token_log_likelihood
from pipeline.models.kv_cache import CacheLayout

PRECISION_CHUNKS = 8  # calibration chunks the precision stage measures on (the fallback search keeps their logits)
ENGINE_CHECK_CHUNKS = 4  # held-out chunks the engine is compared on (GPU hosts)
# The calibration chunks are in-sample: the search aims this far below the held-out perplexity gate.
FALLBACK_MARGIN = 0.01


def prefill_feeds(chunks_path: Path, layout: CacheLayout, limit: int) -> list[dict[str, np.ndarray]]:
    from pipeline.stages.llm_calibrate import calibration_feeds, load_chunks

    return calibration_feeds(load_chunks(chunks_path)[:limit], layout)


def perplexity_ratio(reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray],
                     batches: Sequence[dict[str, np.ndarray]]) -> float:
    """FP32 perplexity / candidate perplexity of the batches' next tokens (logits [1, sequence, vocab])."""
    difference, tokens = 0.0, 0
    for ref, cand, batch in zip(reference, candidate, batches):
        ids = batch["input_ids"][0]
        difference += next_token_log_likelihood(cand[0], ids) - next_token_log_likelihood(ref[0], ids)
        tokens += len(ids) - 1
    return float(math.exp(difference / max(tokens, 1)))


PERPLEXITY_RATIO = Score("perplexity_ratio", perplexity_ratio)


def fallback_target(config: BuildConfig) -> float:
    """The perplexity ratio the calibration chunks must keep: 1 / (1 + the perplexity gate - margin)."""
    from pipeline.parity.policy import max_perplexity_increase

    if config.trt.fallback_target is not None:
        return config.trt.fallback_target
    gate = max_perplexity_increase(config)
    return round(1.0 / (1.0 + max(gate - FALLBACK_MARGIN, 0.0)), 6)


def _round_up(value: float, multiple: int = 8) -> int:
    return int(math.ceil(value / multiple) * multiple)


def prompt_token_counts(prompts_file: Path, tokenizer_dir: Path) -> list[int]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    return [len(tokenizer(text).input_ids) for text in json.loads(prompts_file.read_text(encoding="utf-8"))]


def decoder_profiles(config: BuildConfig, layout: CacheLayout, prompt_tokens: Sequence[int]) -> dict[str, Any]:
    """Two optimization profiles of the one KV-cache graph; select 1 for decode steps at run time.

    context: the most tokens (past + new) a request holds: trt.sequence max, else calibration.max_length.
    prefill (profile 0): past length 0 (empty past tensors), sequence min..context; by default 1, the
      median held-out prompt length rounded up to a multiple of 8, context.
    decode (profile 1): one new token, past length 1, context / 2, context - 1.
    batch: trt.batch, else 1, the calibration batch size, 4x it (as for encoders).
    """
    settings = config.trt
    batch = settings.batch or (1, config.calibration.batch_size, 4 * config.calibration.batch_size)
    context = settings.sequence[2] if settings.sequence else config.calibration.max_length
    median = float(np.median(prompt_tokens)) if prompt_tokens else context / 2
    prefill = settings.sequence or (1, min(_round_up(median), context), context)
    past = (1, max(context // 2, 1), max(context - 1, 1))
    kv = f"{layout.kv_heads}x{{past}}x{layout.head_dim}"
    past_names = layout.past_names

    def shapes(sequence: Sequence[int], past_lengths: Sequence[int]) -> dict[str, dict[str, str]]:
        result: dict[str, dict[str, str]] = {name: {} for name in ["input_ids", "attention_mask", "position_ids"] + past_names}
        for kind, b, s, p in zip(("min", "opt", "max"), batch, sequence, past_lengths):
            result["input_ids"][kind] = result["position_ids"][kind] = f"{b}x{s}"
            result["attention_mask"][kind] = f"{b}x{p + s}"
            for name in past_names:
                result[name][kind] = f"{b}x{kv.format(past=p)}"
        return result

    return {
        "profiles": [
            {"name": "prefill", "shapes": shapes(prefill, (0, 0, 0))},
            {"name": "decode", "shapes": shapes((1, 1, 1), past)},
        ],
        "batch": list(batch), "context": context, "prefill_sequence": list(prefill), "decode_past": list(past),
        "derived_from_prompts": settings.sequence is None, "prompt_tokens_median": median,
    }
