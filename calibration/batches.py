"""Tokenized batches: the one data contract, and its deterministic on-disk form."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
from safetensors.numpy import load_file, save_file

Batch = dict[str, np.ndarray]


def to_batches(
    texts: Sequence[str], tokenizer: Any, input_names: Sequence[str], batch_size: int, max_length: int
) -> list[Batch]:
    """Tokenize with the model's own tokenizer; each batch is padded to its longest sample."""
    batches: list[Batch] = []
    for start in range(0, len(texts), batch_size):
        encoded = tokenizer(
            list(texts[start : start + batch_size]),
            padding="longest",
            truncation=True,
            max_length=max_length,
            return_tensors="np",
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
