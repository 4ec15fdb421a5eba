"""Adapters from the one data contract (a sequence of batches) to the quantizers' readers."""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np
from onnx_neural_compressor.data_reader import CalibrationDataReader


class BatchReader(CalibrationDataReader):
    """Intel Neural Compressor's (and ONNX Runtime's) calibration reader over a list of batches."""

    def __init__(
        self,
        batches: Sequence[dict[str, np.ndarray]],
        on_batch: Optional[Callable[[int, int], None]] = None,
    ) -> None:
        self.batches = list(batches)
        self.on_batch = on_batch
        self.position = 0

    def get_next(self) -> Optional[dict[str, np.ndarray]]:
        if self.position >= len(self.batches):
            return None
        batch = self.batches[self.position]
        self.position += 1
        if self.on_batch is not None:
            self.on_batch(self.position, len(self.batches))
        return batch

    def rewind(self) -> None:
        self.position = 0
