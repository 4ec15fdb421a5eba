"""LLM parity: perplexity on held-out text, greedy-decoding agreement and decode speed, FP32 against quantized.

Greedy agreement is reported two ways: `greedy_token_agreement` teacher-forces the candidate on the
reference's own continuation and counts the steps where its next-token choice is the same (one
early divergence does not poison the rest); `greedy_prefix_agreement` is the mean share of each
free-running continuation that is identical before the first differing token.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from pipeline.models.decoding import KVDecoder, generate, token_log_likelihood
from pipeline.parity.metrics import compare_output

NEW_TOKENS = 32
STATISTICS_CHUNKS = 4  # logits are vocabulary-wide: element statistics on a few chunks keep memory small


def _teacher_forced_agreement(decoder: KVDecoder, prompt: Sequence[int], continuation: Sequence[int]) -> int:
    ids = np.array([list(prompt) + list(continuation)], dtype=np.int64)
    logits = decoder.logits(ids)[0]
    choices = logits[len(prompt) - 1: len(prompt) - 1 + len(continuation)].argmax(axis=1)
    return int(np.sum(choices == np.array(continuation)))


def llm_parity(reference: Path, candidate: Path, heldout: Sequence[np.ndarray], prompts: Sequence[Sequence[int]],
               threads: int = 0, on_progress: Callable[[str], None] = lambda message: None,
               simulate_tensorrt: bool = False,
               on_batch: Callable[[str, int, int], None] = lambda what, done, total: None) -> dict[str, Any]:
    """simulate_tensorrt: the candidate is a TensorRT graph (Q/DQ run as fake quantization, no integer kernels)."""
    with KVDecoder(reference, threads) as ref, KVDecoder(candidate, threads, simulate_tensorrt) as cand:
        on_progress(f"perplexity on {len(heldout)} held-out chunks")
        ref_ll, tokens = token_log_likelihood(ref, heldout, lambda done, total: on_batch("FP32 perplexity", done, total))
        cand_ll, _ = token_log_likelihood(cand, heldout, lambda done, total: on_batch("perplexity", done, total))
        ref_ppl, cand_ppl = float(np.exp(-ref_ll / tokens)), float(np.exp(-cand_ll / tokens))
        chunks = [chunk[None, :] for chunk in heldout[:STATISTICS_CHUNKS]]
        statistics = compare_output("logits", [ref.logits(c) for c in chunks], [cand.logits(c) for c in chunks],
                                    [np.ones_like(c) for c in chunks])
        on_progress(f"greedy decoding of {NEW_TOKENS} tokens for {len(prompts)} prompts, both graphs")
        agreed = prefix = 0
        exact = 0
        ref_time = cand_time = 0.0
        ref_steps = cand_steps = 0
        for index, prompt in enumerate(prompts, 1):
            expected = generate(ref, prompt, NEW_TOKENS)
            actual = generate(cand, prompt, NEW_TOKENS)
            ref_time, ref_steps = ref_time + expected.decode_s, ref_steps + len(expected.tokens) - 1
            cand_time, cand_steps = cand_time + actual.decode_s, cand_steps + len(actual.tokens) - 1
            agreed += _teacher_forced_agreement(cand, prompt, expected.tokens)
            same = next((i for i, (a, b) in enumerate(zip(expected.tokens, actual.tokens)) if a != b),
                        min(len(expected.tokens), len(actual.tokens)))
            prefix += same
            exact += int(expected.tokens == actual.tokens)
            on_batch("greedy prompts", index, len(prompts))
    generated = len(prompts) * NEW_TOKENS
    ref_speed, cand_speed = ref_steps / ref_time, cand_steps / cand_time
    metrics = statistics.to_dict()
    metrics.pop("histogram", None)
    metrics.update({
        "perplexity_reference": ref_ppl,
        "perplexity_candidate": cand_ppl,
        "perplexity_increase": cand_ppl / ref_ppl - 1.0,
        "perplexity_tokens": int(tokens),
        "greedy_token_agreement": agreed / generated,
        "greedy_prefix_agreement": prefix / generated,
        "greedy_identical_sequences": exact,
        "greedy_prompts": len(prompts),
        "greedy_new_tokens": NEW_TOKENS,
        "decode_tokens_per_s_reference": ref_speed,
        "decode_tokens_per_s_candidate": cand_speed,
        "decode_speedup": cand_speed / ref_speed,
    })
    return {"metrics": metrics, "histogram": statistics.histogram}
