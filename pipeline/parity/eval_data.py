"""Labelled evaluation files for classifiers: JSON lines {"text", "label"} or "label<TAB>text" lines."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from pipeline.core.errors import InputError


def _label_index(label: Any, label2id: Mapping[str, int], num_labels: int, where: str) -> int:
    if isinstance(label, str) and label in label2id:
        return int(label2id[label])
    try:
        index = int(label)
    except (TypeError, ValueError):
        known = ", ".join(sorted(label2id)) or "none"
        raise InputError(f"{where}: label '{label}' is neither an index nor a label of the model ({known})") from None
    if not 0 <= index < num_labels:
        raise InputError(f"{where}: label {index} is out of range for a model with {num_labels} labels")
    return index


def read_labelled(path: Path, model_config: Mapping[str, Any]) -> tuple[list[str], np.ndarray]:
    """Texts and label indices; labels may be indices or the model's own label names (config label2id)."""
    if not path.is_file():
        raise InputError(f"evaluation file not found: {path}")
    label2id = {str(k): int(v) for k, v in (model_config.get("label2id") or {}).items()}
    num_labels = len(model_config.get("id2label") or label2id) or 2
    texts, labels = [], []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise InputError(f"evaluation file {path}: bytes that are not UTF-8 at offset {exc.start}; re-encode it") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        if line.lstrip().startswith("{"):
            try:
                record = json.loads(line)
                text, label = record["text"], record["label"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise InputError(f"{where}: expected a JSON object with 'text' and 'label'") from None
        elif "\t" in line:
            label, text = line.split("\t", 1)
        else:
            raise InputError(f"{where}: expected JSON lines or 'label<TAB>text' lines")
        texts.append(str(text))
        labels.append(_label_index(label, label2id, num_labels, where))
    if not texts:
        raise InputError(f"evaluation file {path} holds no samples")
    return texts, np.asarray(labels, dtype=np.int64)
