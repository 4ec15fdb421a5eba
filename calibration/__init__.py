"""Calibration data: real text sources, reproducible selection, tokenized batches, cached ranges.

The data contract shared by calibration, verification and benchmarks is a list
(or iterable) of batches, each a `dict[input_name, numpy.ndarray]`.
"""

from calibration.batches import Batch, load_batches, save_batches, to_batches
from calibration.selection import select_samples
from calibration.sources import Fields, Sample, SampleSource, TextSource, default_source, open_source

__all__ = [
    "Batch",
    "Fields",
    "Sample",
    "SampleSource",
    "TextSource",
    "default_source",
    "load_batches",
    "open_source",
    "save_batches",
    "select_samples",
    "to_batches",
]
