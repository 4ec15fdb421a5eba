"""A text classifier end to end with a labelled evaluation file: accuracy of both graphs in the report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from calibration.batches import to_batches
from pipeline.core.errors import ExitCode
from tests.helpers import run_cli
from tests.independent import discrepancies, recompute

EVAL_LINES = [
    "1\tThe match was a thrilling win for the home side.",
    "0\tShares fell sharply after the profit warning.",
    '{"text": "A wonderful, moving performance.", "label": "POSITIVE"}',
    "0\tThe film was a dull disappointment.",
    "1\tVoters welcomed the new budget plans.",
    "0\tThe company reported heavy losses this year.",
]


def test_labelled_accuracy_of_both_graphs_is_reported(minilm_classifier: Path, tmp_path: Path) -> None:
    import onnxruntime as ort
    from transformers import AutoTokenizer

    eval_file = tmp_path / "eval.tsv"
    eval_file.write_text("\n".join(EVAL_LINES) + "\n", encoding="utf-8")
    build_dir = tmp_path / "build"
    result = run_cli("build", "--model", str(minilm_classifier), "--eval-file", str(eval_file), "-o", str(build_dir),
                     "--heldout-samples", "64", "--calib-samples", "16", "--quiet")
    report = json.loads((build_dir / "parity.json").read_text())
    logits = report["outputs"]["logits"]
    # top-1 agreement, cosine and max abs recomputed from plain ONNX Runtime runs of the stage cache's FP32 and
    # INT8 graphs on the held-out batches (the published files exist only when parity passed).
    stages = build_dir / ".stages"
    recomputed = recompute(next(stages.glob("optimize-*")) / "model.onnx", next(stages.glob("quantize-*")) / "model.onnx",
                           next(stages.glob("calibrate-*")) / "heldout.safetensors", ["logits"], classification=["logits"])
    assert discrepancies(report, recomputed) == []
    # A seeded, untrained head makes near ties, which INT8 may flip (measured top-1 agreement 0.953 on 64
    # held-out rows here, on AVX-512 VNNI): the gate's decision must follow the recomputed number either way.
    gate = next(check for check in report["checks"] if check["metric"] == "top1_agreement")
    assert gate["threshold"] == 0.98, "the classifier default"
    passed = recomputed["logits"]["top1_agreement"] >= gate["threshold"]
    assert gate["passed"] is passed and report["status"] == ("pass" if passed else "fail")
    assert result.returncode == (ExitCode.OK if passed else ExitCode.PARITY_FAILED), result.stderr
    assert report["task"] == "text-classification" and "top1_agreement" in logits
    assert logits["labelled_samples"] == len(EVAL_LINES)
    assert report["evaluation"] == {"file": "eval.tsv", "samples": len(EVAL_LINES)}

    # The reference accuracy, measured independently on the FP32 graph with ONNX Runtime.
    tokenizer = AutoTokenizer.from_pretrained(str(minilm_classifier))
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
