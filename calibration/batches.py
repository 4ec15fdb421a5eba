"""Tokenized batches: the one data contract, and its deterministic on-disk form.

Samples are tokenized with the model's own tokenizer, sorted by token length, and cut into
batches; each batch is padded to its longest sample rounded up to a multiple of
`BUCKET_MULTIPLE` (capped at the maximum length). Sequence lengths so follow the samples'
own length distribution, in a few distinct shapes, with little padding.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence, Union

import numpy as np
from safetensors.numpy import load_file, save_file

from calibration.sources import Sample
from pipeline.core.errors import InputError

Batch = dict[str, np.ndarray]
Padding = Literal["bucket", "max_length"]
LongSamples = Literal["truncate", "error"]
BUCKET_MULTIPLE = 8


@dataclass(frozen=True)
class TokenStats:
    """Token lengths of the samples before truncation, and how many exceeded the maximum."""

    lengths: tuple[int, ...]
    max_length: int

    @property
    def too_long(self) -> int:
        return sum(1 for length in self.lengths if length > self.max_length)

    def summary(self) -> dict[str, float]:
        lengths = np.minimum(np.array(self.lengths), self.max_length)
        return {
            "min": int(lengths.min()),
            "p50": float(np.percentile(lengths, 50)),
            "p90": float(np.percentile(lengths, 90)),
            "max": int(lengths.max()),
            "truncated": self.too_long,
        }


def _texts(samples: Sequence[Union[Sample, str]]) -> tuple[list[str], list[str] | None]:
    texts = [item if isinstance(item, str) else item.text for item in samples]
    pairs = [None if isinstance(item, str) else item.text_pair for item in samples]
    if all(pair is None for pair in pairs):
        return texts, None
    if any(pair is None for pair in pairs):
        raise InputError("some samples have a text pair and some do not; every sample needs both fields")
    return texts, pairs  # type: ignore[return-value]


def token_lengths(samples: Sequence[Union[Sample, str]], tokenizer: Any, max_length: int) -> TokenStats:
    texts, pairs = _texts(samples)
    encoded = tokenizer(texts, pairs, truncation=False, padding=False, verbose=False)
    return TokenStats(tuple(len(ids) for ids in encoded["input_ids"]), max_length)


def check_long_samples(
    stats: TokenStats, samples: Sequence[Union[Sample, str]], policy: LongSamples, what: str, source: str
) -> None:
    if policy != "error" or not stats.too_long:
        return
    first = next(index for index, length in enumerate(stats.lengths) if length > stats.max_length)
    text = samples[first] if isinstance(samples[first], str) else samples[first].text  # type: ignore[union-attr]
    raise InputError(
        f"{stats.too_long} of {len(samples)} {what} samples from {source} are longer than --max-length "
        f"{stats.max_length} tokens (longest {max(stats.lengths)}; first: {text[:60]!r}...); raise --max-length "
        "or pass --long-samples truncate"
    )


def to_batches(
    samples: Sequence[Union[Sample, str]],
    tokenizer: Any,
    input_names: Sequence[str],
    batch_size: int,
    max_length: int,
    padding: Padding = "bucket",
) -> list[Batch]:
    """Tokenize with the model's own tokenizer into length-sorted batches (longer samples are truncated)."""
    lengths = token_lengths(samples, tokenizer, max_length).lengths
    order = sorted(range(len(samples)), key=lambda index: (lengths[index], index))
    batches: list[Batch] = []
    for start in range(0, len(order), batch_size):
        chunk = [samples[index] for index in order[start : start + batch_size]]
        longest = min(max(lengths[index] for index in order[start : start + batch_size]), max_length)
        width = max_length if padding == "max_length" else min(max_length, -(-longest // BUCKET_MULTIPLE) * BUCKET_MULTIPLE)
        texts, pairs = _texts(chunk)
        encoded = tokenizer(
            texts, pairs, padding="max_length", truncation=True, max_length=width, return_tensors="np"
        )
        batch = {}
        for name in input_names:
            if name == "token_type_ids" and name not in encoded:
                batch[name] = np.zeros_like(encoded["input_ids"], dtype=np.int64)
            else:
                batch[name] = np.ascontiguousarray(encoded[name], dtype=np.int64)
        batches.append(batch)
    return batches


def save_batches(path: Path, batches: Sequence[Batch]) -> None:
    """safetensors: sorted keys, no timestamps, so equal batches give equal bytes."""
    tensors = {f"{index:06d}/{name}": array for index, batch in enumerate(batches) for name, array in batch.items()}
    save_file(tensors, str(path))


def load_batches(path: Path) -> list[Batch]:
    tensors = load_file(str(path))
    batches: dict[int, Batch] = {}
    for key, array in tensors.items():
        index, name = key.split("/", 1)
        batches.setdefault(int(index), {})[name] = array
    return [batches[index] for index in sorted(batches)]
