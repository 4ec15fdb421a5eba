"""Gate policy: the default parity thresholds per task, target and family (encoder or decoder LLM),
and how the verify settings override them. Every producer of a parity report asks here.

A gate is (output, metric) -> threshold; metrics in gates.LOWER_BOUNDS are lower bounds. Only gates
the build can measure are returned (a top-1 gate on an embedding, an accuracy-drop gate without a
labelled file, greedy agreement on a TensorRT engine): a recorded gate is always checked.
"""

from __future__ import annotations

from pipeline.config import BuildConfig, VerifyConfig
from pipeline.models.registry import FAMILIES, Family, TaskSpec

Gates = dict[tuple[str, str], float]

# Encoder task defaults.
TASK_THRESHOLDS: dict[str, Gates] = {
    "feature-extraction": {("sentence_embedding", "cosine_mean"): 0.99},
    "text-classification": {("logits", "top1_agreement"): 0.98},
    # Per-token top-1 agreement over real tokens (padding is not a token).
    "token-classification": {("logits", "top1_agreement"): 0.98},
}
# TensorRT target: default gate on the primary output's mean cosine, per precision.
TRT_MIN_COSINE = {"int8": 0.99, "fp8": 0.98, "fp16": 0.999, "best": 0.99}
# Decoder LLMs: relative perplexity increase over FP32.
DEFAULT_MAX_PERPLEXITY_INCREASE = 0.08
# Measured by decoding both graphs token by token: not on a TensorRT engine's prefill check.
DECODE_ONLY_METRICS = frozenset({"greedy_token_agreement", "greedy_prefix_agreement", "decode_speedup"})


def family_of(task: TaskSpec) -> Family:
    """The family a task belongs to, as the model registry declares it."""
    return next(family.name for family in FAMILIES.values() if task.name in family.tasks)


def encoder_thresholds(task: TaskSpec, verify: VerifyConfig) -> Gates:
    thresholds = dict(TASK_THRESHOLDS[task.name])
    primary = task.primary_output
    classifier = task.classifier
    if verify.min_cosine is not None:
        thresholds[(primary, "cosine_mean")] = verify.min_cosine
    if verify.max_abs is not None:
        thresholds[(primary, "max_abs")] = verify.max_abs
    if verify.min_top1_agreement is not None and classifier:
        thresholds[(primary, "top1_agreement")] = verify.min_top1_agreement
    if verify.min_snr_db is not None:
        thresholds[(primary, "snr_db")] = verify.min_snr_db
    if verify.max_accuracy_drop is not None and task.name == "text-classification" and verify.eval_file:
        thresholds[(primary, "accuracy_drop")] = verify.max_accuracy_drop
    return thresholds


def trt_encoder_thresholds(task: TaskSpec, verify: VerifyConfig, precision: str) -> Gates:
    """The CPU target's gates, with the primary cosine gate set per TensorRT precision unless overridden."""
    thresholds = encoder_thresholds(task, verify)
    if verify.min_cosine is None and task.name == "feature-extraction":  # classifiers keep their top-1 gate
        thresholds[(task.primary_output, "cosine_mean")] = TRT_MIN_COSINE[precision]
    return thresholds


def decoder_thresholds(verify: VerifyConfig) -> Gates:
    thresholds = {("logits", "perplexity_increase"): verify.max_perplexity_increase
                  if verify.max_perplexity_increase is not None else DEFAULT_MAX_PERPLEXITY_INCREASE}
    if verify.min_token_agreement is not None:
        thresholds[("logits", "greedy_token_agreement")] = verify.min_token_agreement
    if verify.min_cosine is not None:
        thresholds[("logits", "cosine_mean")] = verify.min_cosine
    return thresholds


def thresholds(config: BuildConfig, task: TaskSpec) -> Gates:
    """The gates of a build's verify stage (and of `pipeline verify`)."""
    if family_of(task) == "decoder":
        return decoder_thresholds(config.verify)
    if config.target == "trt":
        return trt_encoder_thresholds(task, config.verify, config.trt.precision)
    return encoder_thresholds(task, config.verify)


# A QAT graph's integer (CPU) or passed-through (TensorRT) build against the graph's own fake-quantized
# forward: the same scales on both sides, so only the integer kernels' requantization rounding differs.
QAT_MIN_COSINE = 0.999


def qat_thresholds(config: BuildConfig, task: TaskSpec) -> Gates:
    """The gates of a Q/DQ ONNX input's build against its own fake-quantized forward: the build's gates with
    the primary output's cosine at QAT_MIN_COSINE (unless --min-cosine is given). The float graph under the
    Q/DQ is held to the build's own gates (`thresholds`), the looser line."""
    gates = thresholds(config, task)
    if config.verify.min_cosine is None:
        key = (task.primary_output, "cosine_mean")
        gates[key] = max(QAT_MIN_COSINE, gates.get(key, 0.0))
    return gates


def engine_thresholds(config: BuildConfig, task: TaskSpec) -> Gates:
    """The gates of the TensorRT engine's own check (bundle stage): the build's, less what it cannot measure."""
    return {key: value for key, value in thresholds(config, task).items() if key[1] not in DECODE_ONLY_METRICS}


def trt_min_cosine(config: BuildConfig, task: TaskSpec) -> float:
    """The primary output's cosine the TensorRT graph must keep (for classifiers, a proxy for top-1 agreement)."""
    # Only the cosine gate is read: the precision stage's cache key holds this value, not the other gates
    # (tests/pipeline/build/test_cache_keys.py).
    if config.verify.min_cosine is not None:
        return config.verify.min_cosine
    if task.name == "feature-extraction":
        return TRT_MIN_COSINE[config.trt.precision]
    return TASK_THRESHOLDS[task.name].get((task.primary_output, "cosine_mean"), TRT_MIN_COSINE[config.trt.precision])


def max_perplexity_increase(config: BuildConfig) -> float:
    """The decoder's perplexity gate (read alone, for the same reason as trt_min_cosine)."""
    gate = config.verify.max_perplexity_increase
    return DEFAULT_MAX_PERPLEXITY_INCREASE if gate is None else gate
