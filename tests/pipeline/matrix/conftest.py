"""Tiny random-weight models for matrix tests, and a writer of matrix files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

# Small calibration and parity sets: the matrix tests are about scheduling, caching and retries.
TINY_CALIBRATION = {"samples": 16, "heldout_samples": 32, "max_length": 32}


@pytest.fixture(scope="session")
def tiny_bert_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A BERT folder with random weights (2 layers, hidden 32) and all-MiniLM-L6-v2's WordPiece tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    from pipeline.models.registry import default_model_path

    folder = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    config = AutoConfig.for_model("bert", vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=64, max_position_embeddings=128)
    torch.manual_seed(0)
    AutoModel.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_matrix(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path
