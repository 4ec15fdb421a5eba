"""calibrate (decoder LLMs): real text as token chunks for GPTQ/AWQ, and held-out chunks and prompts for parity.

Sentences are selected as for encoders (seeded, calibration and held-out disjoint), joined in their
selection order, tokenized, and cut into chunks of `max_length` tokens. Prompts for greedy decoding
are the openings of held-out sentences, so nothing the quantizer saw is used to judge it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from safetensors.numpy import load_file, save_file

from calibration.selection import select_samples
from pipeline.config import BuildConfig
from pipeline.core.errors import InputError
from pipeline.models.kv_cache import CacheLayout
from pipeline.models.registry import ModelInfo, tokenizer_fingerprint
from pipeline.stages.base import Stage, StageContext
from pipeline.stages.calibrate import source_for
from pipeline.stages.facts import CalibrationFacts

PROMPTS = 20
PROMPT_WORDS = 12


def token_chunks(texts: Sequence[str], tokenizer: Any, length: int) -> list[np.ndarray]:
    ids = tokenizer(" ".join(texts)).input_ids
    return [np.array(ids[start:start + length], dtype=np.int64)
            for start in range(0, len(ids) - length + 1, length)]


def save_chunks(path: Path, chunks: Sequence[np.ndarray]) -> None:
    save_file({f"chunk_{index:05d}": chunk for index, chunk in enumerate(chunks)}, str(path))


def load_chunks(path: Path) -> list[np.ndarray]:
    tensors = load_file(str(path))
    return [tensors[name] for name in sorted(tensors)]


class LlmCalibrateStage(Stage):
    name = "calibrate"
    facts = CalibrationFacts
    outputs = ("calibration.safetensors", "heldout.safetensors", "prompts.json", "samples.json")

    def config_slice(self, config: BuildConfig, model: ModelInfo) -> dict[str, Any]:
        settings = config.calibration
        return {"samples": settings.samples, "heldout_samples": settings.heldout_samples, "seed": settings.seed,
                "max_length": settings.max_length, "format": settings.format, "text_field": settings.text_field,
                # the source reads its records with these too (a missing field is refused, a pair is joined)
                "text_pair_field": settings.text_pair_field, "label_field": settings.label_field,
                "prompts": PROMPTS, "prompt_words": PROMPT_WORDS}

    def external_inputs(self, config: BuildConfig, model: ModelInfo) -> dict[str, str]:
        # The model's tokenizer only, not its weights: adapters of one base share this stage.
        return {"source": source_for(config.calibration).fingerprint(), "tokenizer": tokenizer_fingerprint(model.path)}

    def run(self, context: StageContext, out: Path) -> dict[str, Any]:
        from pipeline.models.loading import load_llm_tokenizer

        settings = context.config.calibration
        source = source_for(settings)
        calibration, heldout = select_samples(source, settings.samples, settings.heldout_samples, settings.seed,
                                              source.name, None)
        tokenizer = load_llm_tokenizer(context.model.path)
        calibration_chunks = token_chunks([s.text for s in calibration], tokenizer, settings.max_length)
        heldout_chunks = token_chunks([s.text for s in heldout], tokenizer, settings.max_length)
        prompts = [" ".join(s.text.split()[:PROMPT_WORDS]) for s in heldout if len(s.text.split()) > PROMPT_WORDS]
        if not calibration_chunks or not heldout_chunks or len(prompts) < PROMPTS:
            raise InputError(f"{source.name}: too little text for {settings.max_length}-token chunks and {PROMPTS} "
                             "prompts; raise --calib-samples/--heldout-samples or lower --max-length")
        save_chunks(out / "calibration.safetensors", calibration_chunks)
        save_chunks(out / "heldout.safetensors", heldout_chunks)
        (out / "prompts.json").write_text(json.dumps(prompts[:PROMPTS], indent=1, ensure_ascii=False), encoding="utf-8")
        samples = {"source": source.name, "calibration": [s.to_json() for s in calibration],
                   "heldout": [s.to_json() for s in heldout]}
        (out / "samples.json").write_text(json.dumps(samples, indent=1, ensure_ascii=False), encoding="utf-8")
        context.progress.info(f"{len(calibration_chunks)} calibration and {len(heldout_chunks)} held-out chunks "
                              f"of {settings.max_length} tokens, {PROMPTS} held-out prompts")
        return {
            "source": source.name,
            "calibration_samples": len(calibration),
            "heldout_samples": len(heldout),
            "calibration_chunks": len(calibration_chunks),
            "heldout_chunks": len(heldout_chunks),
            "chunk_tokens": settings.max_length,
            "prompts": PROMPTS,
        }


def calibration_feeds(chunks: Sequence[np.ndarray], layout: CacheLayout) -> list[dict[str, np.ndarray]]:
    """Prefill feeds (past length 0) of the KV graph, one chunk per batch, for Neural Compressor's GPTQ/AWQ."""
    feeds = []
    for chunk in chunks:
        ids = chunk[None, :]
        feeds.append({"input_ids": ids, "attention_mask": np.ones_like(ids),
                      "position_ids": np.arange(ids.shape[1], dtype=np.int64)[None, :], **layout.empty_past(1)})
    return feeds
