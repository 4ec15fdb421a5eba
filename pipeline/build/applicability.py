"""Which settings apply to which (target, family): one table, checked before any work starts.

A setting the user gave (in a build file or as a flag), with a value other than its default, that the
chosen target or model family never reads is refused with one line: `--weight-bits 8` on an encoder or `--precision fp8` on the CPU target
would otherwise be accepted silently and even enter cache keys, while building something else than asked.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from pipeline.config import BuildConfig
from pipeline.core.errors import ConfigError
from pipeline.models.registry import ModelInfo


@dataclass(frozen=True)
class Applies:
    flag: str
    targets: tuple[str, ...] = ("cpu", "trt")
    families: tuple[str, ...] = ("encoder", "decoder")
    tasks: Optional[tuple[str, ...]] = None  # None: every task of the families


_LLM = ("decoder",)
_ENCODER = ("encoder",)
# configuration key -> where it applies. Keys not listed apply everywhere.
APPLIES: dict[str, Applies] = {
    "quantization.mode": Applies("--quant", ("cpu",)),
    # Weight-only LLM quantization (CPU, decoder LLMs).
    "quantization.weight_bits": Applies("--weight-bits", ("cpu",), _LLM),
    "quantization.block_size": Applies("--block-size", ("cpu",), _LLM),
    "quantization.lm_head": Applies("--lm-head", ("cpu",), _LLM),
    "quantization.vocab_block_size": Applies("--vocab-block-size", ("cpu",), _LLM),
    "quantization.symmetric": Applies("--symmetric/--asymmetric", ("cpu",), _LLM),
    "quantization.zero_point": Applies("--zero-point", ("cpu",), _LLM),
    "quantization.llm_graph": Applies("--llm-graph", ("cpu",), _LLM),
    "quantization.embeddings": Applies("--embeddings", ("cpu",), _LLM),
    # CPU INT8 of encoders (Neural Compressor).
    "quantization.per_channel": Applies("--per-channel/--per-tensor", ("cpu",), _ENCODER),
    "quantization.format": Applies("--format", ("cpu",), _ENCODER),
    "quantization.smoothquant": Applies("--smoothquant", ("cpu",), _ENCODER),
    "quantization.smoothquant_alpha": Applies("--smoothquant-alpha", ("cpu",), _ENCODER),
    "quantization.outlier_threshold": Applies("--outlier-threshold", ("cpu",), _ENCODER),
    "quantization.fallback": Applies("--fallback", ("cpu",), _ENCODER),
    "quantization.tolerable_loss": Applies("--tolerable-loss", ("cpu",), _ENCODER),
    "quantization.cpu_isa": Applies("--cpu-isa", ("cpu",), _ENCODER),
    "quantization.max_fallback_nodes": Applies("quantization.max_fallback_nodes", ("cpu",), _ENCODER),
    "calibration.method": Applies("--calib-method", ("cpu",), _ENCODER),
    "calibration.percentile": Applies("--percentile", ("cpu",), _ENCODER),
    # Parity gates of one family.
    "verify.max_perplexity_increase": Applies("--max-perplexity-increase", families=_LLM),
    "verify.min_token_agreement": Applies("--min-token-agreement", families=_LLM),
    "verify.greedy_prompts": Applies("verify.greedy_prompts", families=_LLM),
    "verify.min_top1_agreement": Applies("verify.min_top1_agreement", families=_ENCODER,
                                         tasks=("text-classification",)),
    "verify.eval_file": Applies("--eval-file", families=_ENCODER, tasks=("text-classification",)),
    "verify.max_accuracy_drop": Applies("verify.max_accuracy_drop", families=_ENCODER, tasks=("text-classification",)),
    "verify.localize": Applies("--localize", families=_ENCODER),
    "verify.localize_batches": Applies("verify.localize_batches", families=_ENCODER),
    # TensorRT.
    "trt.precision": Applies("--precision", ("trt",)),
    "trt.calibration_method": Applies("trt.calibration_method", ("trt",)),
    "trt.percentile": Applies("trt.percentile", ("trt",)),
    "trt.fallback_target": Applies("trt.fallback_target", ("trt",)),
    "trt.max_fallback_nodes": Applies("trt.max_fallback_nodes", ("trt",)),
    "trt.batch": Applies("--min-shapes/--opt-shapes/--max-shapes", ("trt",)),
    "trt.sequence": Applies("--min-shapes/--opt-shapes/--max-shapes", ("trt",)),
    "trt.workspace_mib": Applies("trt.workspace_mib", ("trt",)),
    "trt.builder_optimization_level": Applies("trt.builder_optimization_level", ("trt",)),
}


_SECTIONS = ("model", "calibration", "quantization", "verify", "trt")


def _differs_from_default(holder: Any, name: str) -> bool:
    field = type(holder).model_fields[name]
    default = field.default_factory() if field.default_factory is not None else field.default  # type: ignore[call-arg]
    return bool(getattr(holder, name) != default)


def given_keys(config: BuildConfig) -> list[str]:
    """The dotted keys the user set (build file or flags) to something else than the schema's default. A
    default value changes nothing, and a manifest's configuration (every key written out) stays valid."""
    keys = [name for name in config.model_fields_set
            if name not in _SECTIONS and _differs_from_default(config, name)]
    for section in _SECTIONS:
        if section in config.model_fields_set:
            holder = getattr(config, section)
            keys += [f"{section}.{name}" for name in holder.model_fields_set if _differs_from_default(holder, name)]
    return keys


def check_applicable(config: BuildConfig, model: ModelInfo) -> None:
    """Refuse, in one line, every given setting the (target, family, task) never reads."""
    family, task = model.architecture.family, model.task.name
    refused = []
    for key in sorted(given_keys(config)):
        rule = APPLIES.get(key)
        if rule is None:
            continue
        if config.target not in rule.targets:
            refused.append(f"{rule.flag} applies to --target {'/'.join(rule.targets)} only")
        elif family not in rule.families:
            refused.append(f"{rule.flag} applies to {' and '.join(rule.families)} models only, "
                           f"and {model.name} is a{'n' if family == 'encoder' else ''} {family}")
        elif rule.tasks is not None and task not in rule.tasks:
            refused.append(f"{rule.flag} applies to --task {'/'.join(rule.tasks)} only, not {task}")
    if refused:
        raise ConfigError("; ".join(dict.fromkeys(refused)) + " (drop it, or see `pipeline build --help`)")
