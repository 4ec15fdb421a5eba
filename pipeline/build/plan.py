"""The build plan: which stages run, in which order, for a (target, family) pair. One table, read by the runner.

The model's family (encoder or decoder LLM) is decided once, by `inspect_model`; the defaults that follow
from it (the CPU quantization scheme) are applied here, before any stage runs. Stages are told what they
need (which upstream stage holds their graph) by their constructor, so none of them asks which target or
family it is building for.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

from pipeline.config import BuildConfig, Target
from pipeline.build.applicability import check_applicable
from pipeline.core.errors import ConfigError, MissingDependencyError
from pipeline.models.adapters import prepare_input
from pipeline.models.prequantized import Scheme, check_checkpoint, checkpoint_scheme
from pipeline.models.qdq_input import check_trt_placement
from pipeline.models.registry import Family, InputKind, ModelInfo, inspect_model
from pipeline.stages.base import Stage
from pipeline.stages.bundle import BundleStage
from pipeline.stages.calibrate import CalibrateStage
from pipeline.stages.export import ExportStage
from pipeline.stages.int4_checkpoint import Int4CheckpointStage
from pipeline.stages.llm_calibrate import LlmCalibrateStage
from pipeline.stages.llm_export import LlmExportStage
from pipeline.stages.llm_quantize import LlmQuantizeStage
from pipeline.stages.llm_verify import LlmVerifyStage
from pipeline.stages.optimize import OptimizeStage
from pipeline.stages.precision import PrecisionStage
from pipeline.stages.qat_verify import QatVerifyStage
from pipeline.stages.qdq_build import QdqIntegerStage, QdqPassThroughStage
from pipeline.stages.qdq_input import QdqInputStage
from pipeline.stages.quantize import QuantizeStage
from pipeline.stages.verify import VerifyStage

StageFactory = Callable[[], Stage]

PLAN: dict[tuple[Target, InputKind], tuple[StageFactory, ...]] = {
    # CPU, encoders: ranges come from the ONNX Runtime-optimized FP32 graph, which is also the reference.
    ("cpu", "encoder"): (
        ExportStage, OptimizeStage, lambda: CalibrateStage(ranges_of="optimize"), QuantizeStage,
        lambda: VerifyStage(reference="optimize", candidate="quantize"),
    ),
    # CPU, decoder LLMs: no optimize stage; the FP32 KV-cache export is the baseline (ORT fuses at load time).
    ("cpu", "decoder"): (
        LlmExportStage, LlmCalibrateStage, LlmQuantizeStage, lambda: LlmVerifyStage(candidate="quantize"),
    ),
    # TensorRT: the plain export (standard ONNX ops only) carries the precision; the precision stage
    # calibrates it itself, so calibrate writes no range cache.
    ("trt", "encoder"): (
        ExportStage, lambda: CalibrateStage(ranges_of=None), PrecisionStage,
        lambda: VerifyStage(reference="export", candidate="precision"), BundleStage,
    ),
    ("trt", "decoder"): (
        LlmExportStage, LlmCalibrateStage, PrecisionStage, lambda: LlmVerifyStage(candidate="precision"), BundleStage,
    ),
    # A Q/DQ ONNX graph (an encoder's QAT export): its scales are kept, so nothing calibrates (calibrate
    # selects the held-out set only). CPU: ONNX Runtime's integer graph of it; TensorRT: the Q/DQ as they are.
    # Both are verified against the graph's own fake-quantized forward, then against the float graph under it.
    ("cpu", "onnx-qdq"): (
        QdqInputStage, lambda: CalibrateStage(ranges_of=None), QdqIntegerStage,
        lambda: QatVerifyStage(candidate="quantize"),
    ),
    ("trt", "onnx-qdq"): (
        QdqInputStage, lambda: CalibrateStage(ranges_of=None), QdqPassThroughStage,
        lambda: QatVerifyStage(candidate="precision"), BundleStage,
    ),
    # A symmetric pre-quantized 4-bit decoder (GPTQ sym, compressed-tensors symmetric, torchao symmetric):
    # its own INT4 codes and scales as blocked DequantizeLinear, weight-only; nothing calibrates (calibrate
    # selects the held-out set). Verified against the FP32 export of the de-quantized checkpoint.
    ("trt", "decoder-int4"): (
        LlmExportStage, LlmCalibrateStage, Int4CheckpointStage, lambda: LlmVerifyStage(candidate="precision"),
        BundleStage,
    ),
}
# Settings a Q/DQ ONNX input never reads: its graph decides its quantization (--quant, --precision).
QDQ_INPUT_FIXED = {"quantization": ("mode",), "trt": ("precision", "calibration_method", "percentile")}


def targets_of(family: Family) -> list[str]:
    """The targets the plan has stages for, for a family (what `pipeline architectures` lists)."""
    return [target for target, planned in PLAN if planned == family]


@dataclass(frozen=True)
class BuildPlan:
    config: BuildConfig  # with the family's defaults applied
    model: ModelInfo
    stages: tuple[Stage, ...]

    @property
    def stage_names(self) -> list[str]:
        return [stage.name for stage in self.stages]


def plan_build(config: BuildConfig) -> BuildPlan:
    """Inspect the model, apply its family's defaults, check the scheme fits it, and pick the stages."""
    # A PEFT adapter is merged, a bitsandbytes checkpoint de-quantized, into a plain folder the stages build.
    path, origin = prepare_input(config.model.path, config.model.adapter)
    model = inspect_model(path, config.model.task, config.model.trust_remote_code,
                          config.quantization.mode if "mode" in config.quantization.model_fields_set else None)
    if origin is not None:
        model = dataclasses.replace(model, origin=origin)
    scheme = checkpoint_scheme(model.path) if model.family.name == "decoder" else None
    if scheme is not None:
        check_checkpoint(model.path, scheme)  # a malformed GPTQ/AWQ checkpoint is refused before any work
    check_applicable(config, model)  # a setting this target or family never reads is refused, not ignored
    if model.kind == "onnx-qdq":
        _check_qdq_input(config, model)
    resolved = apply_family_defaults(config, model)
    if resolved.target == "trt" and resolved.trt.require_engine:
        _require_tensorrt()  # refuse before any work, not after minutes of calibration
    kind = _plan_kind(resolved, model, scheme)
    stages = tuple(factory() for factory in PLAN[(resolved.target, kind)])
    return BuildPlan(resolved, model, stages)


def _plan_kind(config: BuildConfig, model: ModelInfo, scheme: Scheme | None) -> InputKind:
    """The plan's key: a pre-quantized 4-bit decoder on TensorRT keeps its codes (symmetric) or is refused
    (asymmetric: TensorRT's DequantizeLinear takes no zero point); its scales are never re-calibrated."""
    if scheme is None or config.target != "trt":
        return model.kind
    if not scheme.symmetric:
        raise ConfigError(f"--target trt cannot keep {model.name}'s {scheme.describe()} codes: TensorRT's "
                          "DequantizeLinear takes no non-zero zero point (symmetric only); build it with "
                          "--target cpu (MatMulNBits keeps its zero points), or give a symmetric checkpoint")
    given = [f"trt.{key}" for key in QDQ_INPUT_FIXED["trt"] if key in config.trt.model_fields_set]
    if given:
        raise ConfigError(f"{', '.join(given)} does not apply to {model.name}: a pre-quantized INT4 checkpoint "
                          "keeps its own codes and scales on --target trt")
    return "decoder-int4"


def _check_qdq_input(config: BuildConfig, model: ModelInfo) -> None:
    """A Q/DQ ONNX input keeps its own quantization: a scheme or precision asked for is refused, not ignored;
    on --target trt, Q/DQ TensorRT cannot take as they are are refused before any work."""
    given = [f"{section}.{key}" for section, keys in QDQ_INPUT_FIXED.items()
             for key in keys if key in getattr(config, section).model_fields_set]
    if given:
        raise ConfigError(f"{', '.join(given)} does not apply to {model.graph}: a Q/DQ ONNX graph keeps its own "
                          "scales (to re-calibrate, build the float model's folder instead)")
    if config.target == "trt":
        check_trt_placement(model)


def apply_family_defaults(config: BuildConfig, model: ModelInfo) -> BuildConfig:
    """The CPU scheme defaults to the family's (dynamic INT8 for encoders, 4-bit RTN for decoders); an
    explicit scheme of the other family is refused."""
    family = model.family
    mode = config.quantization.mode
    if config.target != "cpu":
        return config
    prequantized = family.name == "decoder" and checkpoint_scheme(model.path) is not None
    if "mode" not in config.quantization.model_fields_set:
        default = "checkpoint" if prequantized else family.default_cpu_quant
        if mode == default:
            return _checkpoint_precisions(config)
        resolved = config.model_copy(deep=True)
        resolved.quantization.mode = default
        return _checkpoint_precisions(resolved)
    if mode == "checkpoint" and not prequantized:
        raise ConfigError(f"--quant checkpoint needs a pre-quantized GPTQ/AWQ checkpoint; {model.name} has no "
                          "quantization_config with quant_method compressed-tensors, gptq, awq or torchao")
    if mode == "checkpoint":
        return _checkpoint_precisions(config)
    if mode not in family.cpu_quant_modes:
        raise ConfigError(f"--quant {mode} does not fit {model.name}, a{'n' if family.name == 'encoder' else ''} "
                          f"{family.name} (its schemes: {', '.join(family.cpu_quant_modes)})")
    return config


def _checkpoint_precisions(config: BuildConfig) -> BuildConfig:
    """A GPTQ/AWQ checkpoint keeps what it has: its lm_head and embedding (never in its quantized Linears)
    stay FP32 unless --lm-head / --embeddings ask for a rounding of them."""
    q = config.quantization
    unset = [key for key in ("lm_head", "embeddings") if key not in q.model_fields_set and getattr(q, key) != "fp32"]
    if q.mode != "checkpoint" or not unset:
        return config
    resolved = config.model_copy(deep=True)
    for key in unset:
        setattr(resolved.quantization, key, "fp32")
    return resolved


def _require_tensorrt() -> None:
    from engines.trt.builder import tensorrt_missing_reason

    missing = tensorrt_missing_reason()
    if missing:
        raise MissingDependencyError(
            f"--require-engine: {missing}; install the `trt` extra (TensorRT 11) on a host with an NVIDIA GPU, "
            "or drop --require-engine to get the deployment bundle only"
        )
