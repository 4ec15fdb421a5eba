"""The build stages, in order: export -> optimize -> calibrate -> quantize -> verify."""

from __future__ import annotations

from pipeline.config import BuildConfig
from pipeline.stages.base import Stage


def stages_for(config: BuildConfig) -> list[Stage]:
    from pipeline.stages.calibrate import CalibrateStage
    from pipeline.stages.export import ExportStage
    from pipeline.stages.optimize import OptimizeStage
    from pipeline.stages.quantize import QuantizeStage
    from pipeline.stages.verify import VerifyStage

    return [ExportStage(), OptimizeStage(), CalibrateStage(), QuantizeStage(), VerifyStage()]
