"""The build stages, in order.

cpu: export -> optimize -> calibrate -> quantize -> verify
trt: export -> calibrate -> precision -> verify -> bundle
"""

from __future__ import annotations

from pipeline.config import BuildConfig
from pipeline.stages.base import Stage


def stages_for(config: BuildConfig) -> list[Stage]:
    from pipeline.stages.calibrate import CalibrateStage
    from pipeline.stages.export import ExportStage
    from pipeline.stages.verify import VerifyStage

    if config.target == "trt":
        return _trt_stages(config, ExportStage(), CalibrateStage(), VerifyStage())

    from pipeline.stages.optimize import OptimizeStage
    from pipeline.stages.quantize import QuantizeStage

    return [ExportStage(), OptimizeStage(), CalibrateStage(), QuantizeStage(), VerifyStage()]


def _trt_stages(config: BuildConfig, export: Stage, calibrate: Stage, verify: Stage) -> list[Stage]:
    from engines.tensorrt import tensorrt_missing_reason
    from pipeline.errors import MissingDependencyError
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
