"""Gate policy: the defaults per task, target and family that every parity report is gated with."""

from __future__ import annotations

import pytest

from pipeline.config import load_config
from pipeline.models.registry import TASKS
from pipeline.parity import policy

EMBEDDING, CLASSIFIER, DECODER = TASKS["feature-extraction"], TASKS["text-classification"], TASKS["text-generation"]


def test_encoder_defaults_and_overrides_on_the_primary_output() -> None:
    assert policy.thresholds(load_config(None, {}), EMBEDDING) == {("sentence_embedding", "cosine_mean"): 0.99}
    assert policy.thresholds(load_config(None, {}), CLASSIFIER) == {("logits", "top1_agreement"): 0.98}
    config = load_config(None, {"verify": {"min_cosine": 0.995, "max_abs": 0.1, "min_snr_db": 20}})
    assert policy.thresholds(config, EMBEDDING) == {("sentence_embedding", "cosine_mean"): 0.995,
                                                   ("sentence_embedding", "max_abs"): 0.1,
                                                   ("sentence_embedding", "snr_db"): 20}


def test_gates_a_build_cannot_measure_are_not_recorded() -> None:
    """No top-1 gate on an embedding, no accuracy-drop gate without a labelled file: each gate gets a check."""
    config = load_config(None, {"verify": {"min_top1_agreement": 0.99, "max_accuracy_drop": 0.01}})
    assert policy.thresholds(config, EMBEDDING) == {("sentence_embedding", "cosine_mean"): 0.99}
    assert policy.thresholds(config, CLASSIFIER) == {("logits", "top1_agreement"): 0.99}
    labelled = load_config(None, {"verify": {"max_accuracy_drop": 0.01, "eval_file": "eval.tsv"}})
    assert policy.thresholds(labelled, CLASSIFIER)[("logits", "accuracy_drop")] == 0.01


@pytest.mark.parametrize("precision, cosine", [("int8", 0.99), ("fp8", 0.98), ("fp16", 0.999), ("best", 0.99)])
def test_tensorrt_cosine_gate_per_precision(precision: str, cosine: float) -> None:
    config = load_config(None, {"target": "trt", "trt": {"precision": precision}})
    assert policy.thresholds(config, EMBEDDING) == {("sentence_embedding", "cosine_mean"): cosine}
    assert policy.thresholds(config, CLASSIFIER) == {("logits", "top1_agreement"): 0.98}, "classifiers keep top-1"
    assert policy.trt_min_cosine(config, EMBEDDING) == cosine
    explicit = load_config(None, {"target": "trt", "trt": {"precision": precision}, "verify": {"min_cosine": 0.9}})
    assert policy.thresholds(explicit, EMBEDDING) == {("sentence_embedding", "cosine_mean"): 0.9}


def test_decoder_defaults_and_the_engine_check() -> None:
    assert policy.family_of(DECODER) == "decoder" and policy.family_of(EMBEDDING) == "encoder"
    assert policy.thresholds(load_config(None, {}), DECODER) == {("logits", "perplexity_increase"): 0.08}
    config = load_config(None, {"target": "trt", "verify": {"min_token_agreement": 0.9, "min_cosine": 0.99,
                                                            "max_perplexity_increase": 0.05}})
    assert policy.thresholds(config, DECODER) == {("logits", "perplexity_increase"): 0.05,
                                                 ("logits", "greedy_token_agreement"): 0.9,
                                                 ("logits", "cosine_mean"): 0.99}
    assert policy.engine_thresholds(config, DECODER) == {("logits", "perplexity_increase"): 0.05,
                                                        ("logits", "cosine_mean"): 0.99}
    assert policy.max_perplexity_increase(config) == 0.05
