"""A text classifier end to end with a labelled evaluation file: accuracy of both graphs in the report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from calibration.batches import to_batches
from pipeline.core.errors import ExitCode
from tests.helpers import run_cli

EVAL_LINES = [
    "1\tThe match was a thrilling win for the home side.",
    "0\tShares fell sharply after the profit warning.",
    '{"text": "A wonderful, moving performance.", "label": "POSITIVE"}',
    "0\tThe film was a dull disappointment.",
    "1\tVoters welcomed the new budget plans.",
    "0\tThe company reported heavy losses this year.",
]


@pytest.fixture(scope="module")
def classifier(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """all-MiniLM-L6-v2 with a seeded two-label head (no fine-tuned classifier installs offline)."""
    import torch
    from transformers import AutoTokenizer, BertForSequenceClassification

    from pipeline.models.registry import default_model_path

    folder = tmp_path_factory.mktemp("classifier")
    torch.manual_seed(0)
    model = BertForSequenceClassification.from_pretrained(
        str(default_model_path()), num_labels=2, id2label={0: "NEGATIVE", 1: "POSITIVE"},
        label2id={"NEGATIVE": 0, "POSITIVE": 1},
    )
    model.save_pretrained(str(folder))
    AutoTokenizer.from_pretrained(str(default_model_path())).save_pretrained(str(folder))
    return folder


def test_labelled_accuracy_of_both_graphs_is_reported(classifier: Path, tmp_path: Path) -> None:
    import onnxruntime as ort
    from transformers import AutoTokenizer

    eval_file = tmp_path / "eval.tsv"
    eval_file.write_text("\n".join(EVAL_LINES) + "\n", encoding="utf-8")
    build_dir = tmp_path / "build"
    result = run_cli("build", "--model", str(classifier), "--eval-file", str(eval_file), "-o", str(build_dir),
                     "--heldout-samples", "64", "--calib-samples", "16", "--quiet")
    assert result.returncode in (ExitCode.OK, ExitCode.PARITY_FAILED), result.stderr
    report = json.loads((build_dir / "parity.json").read_text())
    logits = report["outputs"]["logits"]
    assert report["task"] == "text-classification" and "top1_agreement" in logits
    assert logits["labelled_samples"] == len(EVAL_LINES)
    assert report["evaluation"] == {"file": "eval.tsv", "samples": len(EVAL_LINES)}

    # The reference accuracy, measured independently on the FP32 graph with ONNX Runtime.
    tokenizer = AutoTokenizer.from_pretrained(str(classifier))
    texts = ["The match was a thrilling win for the home side.", "Shares fell sharply after the profit warning.",
             "A wonderful, moving performance.", "The film was a dull disappointment.",
             "Voters welcomed the new budget plans.", "The company reported heavy losses this year."]
    labels = np.array([1, 0, 1, 0, 1, 0])
    fp32 = next((build_dir / ".stages").glob("optimize-*")) / "model.onnx"
    session = ort.InferenceSession(str(fp32), providers=["CPUExecutionProvider"])
    predictions = np.concatenate([
        session.run(["logits"], batch)[0].argmax(axis=1)
        for batch in to_batches(texts, tokenizer, ("input_ids", "attention_mask", "token_type_ids"), 8, 128)
    ])
    assert logits["accuracy_reference"] == pytest.approx(float(np.mean(predictions == labels)))
    assert logits["accuracy_drop"] == pytest.approx(logits["accuracy_reference"] - logits["accuracy_candidate"])
