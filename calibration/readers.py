"""Adapters from the one data contract (an iterable of `dict[input_name, ndarray]`) to its consumers:
Intel Neural Compressor's and ONNX Runtime's calibration readers, and the TensorRT target
(a stream of batches, and the sequence-length distribution its optimization profiles need)."""

from __future__ import annotations

from collections import Counter
from typing import Callable, Iterable, Iterator, Optional, Sequence

import numpy as np
from onnx_neural_compressor.data_reader import CalibrationDataReader

Batch = dict[str, np.ndarray]
Shape = tuple[int, ...]


class BatchReader(CalibrationDataReader):
    """Intel Neural Compressor's calibration reader over a list of batches. ONNX Runtime's
    `CalibrationDataReader` accepts it too (it checks for `get_next` by subclass hook)."""

    def __init__(
        self,
        batches: Sequence[Batch],
        on_batch: Optional[Callable[[int, int], None]] = None,
    ) -> None:
        self.batches = list(batches)
        self.on_batch = on_batch
        self.position = 0

    def get_next(self) -> Optional[Batch]:
        if self.position >= len(self.batches):
            return None
        batch = self.batches[self.position]
        self.position += 1
        if self.on_batch is not None:
            self.on_batch(self.position, len(self.batches))
        return batch

    def rewind(self) -> None:
        self.position = 0


def feed(batches: Iterable[Batch], input_names: Sequence[str]) -> Iterator[Batch]:
    """The batches restricted to a graph's inputs (e.g. a TensorRT engine's bindings), in order."""
    for batch in batches:
        missing = [name for name in input_names if name not in batch]
        if missing:
            raise KeyError(f"calibration batches lack inputs {missing}; they hold {sorted(batch)}")
        yield {name: batch[name] for name in input_names}


def length_distribution(batches: Iterable[Batch]) -> dict[int, int]:
    """Padded sequence length -> number of samples with it (the shapes the batches come in)."""
    counts: Counter[int] = Counter()
    for batch in batches:
        rows, length = batch["input_ids"].shape
        counts[length] += rows
    return dict(sorted(counts.items()))


def optimization_profile(batches: Sequence[Batch]) -> dict[str, tuple[Shape, Shape, Shape]]:
    """(min, opt, max) shape per input for a TensorRT optimization profile: min one sample of the
    shortest length, opt the usual batch at the median sample's length, max the largest batch at
    the longest length (`profile.set_shape(name, min, opt, max)`)."""
    distribution = length_distribution(batches)
    lengths = np.repeat(np.array(list(distribution)), list(distribution.values()))
    median = int(lengths[len(lengths) // 2])
    rows = [next(iter(batch.values())).shape[0] for batch in batches]
    usual = int(np.bincount(rows).argmax())
    shapes = ((1, int(lengths.min())), (usual, median), (max(rows), int(lengths.max())))
    return {name: shapes for name in sorted(batches[0])}
