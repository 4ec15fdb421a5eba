"""The build stages, in order.

cpu: export -> optimize -> calibrate -> quantize -> verify
cpu, decoder LLMs: export (with KV cache) -> calibrate -> quantize (weight-only) -> verify
trt: export -> calibrate -> precision -> verify -> bundle
trt, decoder LLMs: export (with KV cache) -> calibrate -> precision -> verify (LLM parity) -> bundle
"""

from __future__ import annotations

from pipeline.config import BuildConfig
from pipeline.stages.base import Stage


def stages_for(config: BuildConfig) -> list[Stage]:
    from pipeline.stages.calibrate import CalibrateStage
    from pipeline.stages.export import ExportStage
    from pipeline.stages.verify import VerifyStage

    if config.target == "trt":
        path = config.model.path or ""
        if config.model.task == "text-generation" or path.endswith(".gguf") or _is_decoder_folder(path):
            from pipeline.stages.llm_calibrate import LlmCalibrateStage
            from pipeline.stages.llm_export import LlmExportStage
            from pipeline.stages.llm_verify import LlmVerifyStage

            return _trt_stages(config, LlmExportStage(), LlmCalibrateStage(), LlmVerifyStage())
        return _trt_stages(config, ExportStage(), CalibrateStage(), VerifyStage())
    if is_decoder_build(config):
        from pipeline.stages.llm_calibrate import LlmCalibrateStage
        from pipeline.stages.llm_export import LlmExportStage
        from pipeline.stages.llm_quantize import LlmQuantizeStage
        from pipeline.stages.llm_verify import LlmVerifyStage

        # No optimize stage: the FP32 export is the baseline (ORT applies its basic fusions at load time).
        return [LlmExportStage(), LlmCalibrateStage(), LlmQuantizeStage(), LlmVerifyStage()]

    from pipeline.stages.optimize import OptimizeStage
    from pipeline.stages.quantize import QuantizeStage

    return [ExportStage(), OptimizeStage(), CalibrateStage(), QuantizeStage(), VerifyStage()]


def is_decoder_build(config: BuildConfig) -> bool:
    """Decoder LLM builds: task text-generation, a weight-only scheme, a GGUF file or a decoder folder."""
    from pipeline.config import WEIGHT_ONLY_MODES
    from pipeline.core.errors import ConfigError

    path = config.model.path or ""
    decoder = (config.model.task == "text-generation" or path.endswith(".gguf")
               or config.quantization.mode in WEIGHT_ONLY_MODES or _is_decoder_folder(path))
    if decoder and config.quantization.mode not in WEIGHT_ONLY_MODES:
        raise ConfigError(f"--quant {config.quantization.mode} is for encoders; decoder LLMs take --quant rtn, gptq or awq")
    return decoder


def _is_decoder_folder(path: str) -> bool:
    import json
    from pathlib import Path

    from pipeline.models.registry import DECODER_MODEL_TYPES

    config_file = Path(path) / "config.json" if path else None
    if config_file is None or not config_file.is_file():
        return False
    try:
        return json.loads(config_file.read_text(encoding="utf-8")).get("model_type") in DECODER_MODEL_TYPES
    except (OSError, json.JSONDecodeError):
        return False


def _trt_stages(config: BuildConfig, export: Stage, calibrate: Stage, verify: Stage) -> list[Stage]:
    from engines.trt.builder import tensorrt_missing_reason
    from pipeline.core.errors import MissingDependencyError
    from pipeline.stages.bundle import BundleStage
    from pipeline.stages.precision import PrecisionStage

    if config.trt.require_engine:  # refuse before any work, not after minutes of calibration
        missing = tensorrt_missing_reason()
        if missing:
            raise MissingDependencyError(
                f"--require-engine: {missing}; install the `trt` extra (TensorRT 11) on a host with an NVIDIA GPU, "
                "or drop --require-engine to get the deployment bundle only"
            )
    return [export, calibrate, PrecisionStage(), verify, BundleStage()]
