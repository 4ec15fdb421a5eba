"""export on the real model: checker, dynamic axes, and ONNX Runtime against the Hugging Face model loaded directly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from pipeline.config import load_config
from pipeline.core.progress import Progress
from pipeline.models.registry import inspect_model
from pipeline.stages.base import StageContext
from pipeline.stages.export import ExportStage
from tests.independent import (
    max_abs_differences,
    minilm_folder,
    onnx_outputs,
    perturbed_onnx,
    sentence_embedding_reference,
)


def test_export_is_checked_and_recorded(default_build) -> None:
    export = default_build.outputs["export"]
    model = onnx.load(str(export.path("model.onnx")))
    onnx.checker.check_model(model)
    assert model.opset_import[0].version >= 17
    assert [i.name for i in model.graph.input] == ["input_ids", "attention_mask", "token_type_ids"]
    assert {o.name for o in model.graph.output} == {"sentence_embedding", "last_hidden_state"}
    for graph_input in model.graph.input:
        dims = graph_input.type.tensor_type.shape.dim
        assert dims[0].dim_param and dims[1].dim_param, "batch and sequence axes must be dynamic"
    assert export.metrics["parameters"] == 22_713_216
    assert set(export.metrics["torch_parity_max_abs"]) == {"sentence_embedding", "last_hidden_state"}


SENTENCES = ["Shares in the firm rose sharply after the results were announced on Monday."] * 2 + [
    "The minister said the new rules would take effect next year, after a consultation."]
PERTURBED = "encoder.layer.3.output.LayerNorm.weight"  # scaled by 1.01: a broken export, 1% off in one layer
ATOL = 1e-4  # ONNX Runtime against PyTorch in FP32: float summation order only


@pytest.fixture(scope="module")
def minilm_reference():
    """all-MiniLM-L6-v2 loaded straight from its package folder by transformers (and sentence-transformers when
    installed), at a shape no build used: 3 sentences padded to 61 tokens."""
    from transformers import AutoTokenizer

    folder = minilm_folder()
    encoded = AutoTokenizer.from_pretrained(str(folder))(SENTENCES, padding="max_length", max_length=61,
                                                         return_tensors="np")
    feed = {name: encoded[name].astype(np.int64) for name in ("input_ids", "attention_mask", "token_type_ids")}
    return feed, sentence_embedding_reference(folder, SENTENCES, feed)


@pytest.mark.parametrize("stage", ["export", "optimize"])
def test_onnx_graph_matches_the_hugging_face_model(default_build, minilm_reference, stage: str) -> None:
    """The exported and the optimized FP32 graphs against the model as transformers / sentence-transformers
    compute it, not against the stage's own wrapper (whose parity the stage already gates)."""
    feed, expected = minilm_reference
    actual = onnx_outputs(default_build.outputs[stage].path("model.onnx"), feed)
    assert actual["sentence_embedding"].shape == (3, 384)
    differences = max_abs_differences(actual, expected, feed["attention_mask"])
    assert max(differences.values()) < ATOL, differences
    np.testing.assert_allclose(np.linalg.norm(actual["sentence_embedding"], axis=1), 1.0, atol=1e-5)


def test_a_perturbed_export_is_caught_by_the_reference(default_build, minilm_reference) -> None:
    """The comparison above can fail: one LayerNorm weight of the export scaled by 1.01."""
    feed, expected = minilm_reference
    broken = perturbed_onnx(default_build.outputs["export"].path("model.onnx"), PERTURBED, 1.01)
    differences = max_abs_differences(onnx_outputs(broken, feed), expected, feed["attention_mask"])
    # measured 8e-4 (embedding) and 1e-2 (hidden states): the check's tolerance is far below both
    assert min(differences.values()) > 5 * ATOL, differences


def test_text_classification_export(minilm_classifier: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    info = inspect_model(str(minilm_classifier), None)
    assert info.task.name == "text-classification"
    context = StageContext(load_config(None, {}), info, Progress(quiet=True))
    ExportStage().run(context, tmp_path)
    model = onnx.load(str(tmp_path / "model.onnx"))
    assert [o.name for o in model.graph.output] == ["logits"]
    # The logits against the saved classifier as transformers loads and runs it.
    encoded = AutoTokenizer.from_pretrained(str(minilm_classifier))(SENTENCES, padding=True, return_tensors="pt")
    with torch.inference_mode():
        expected = AutoModelForSequenceClassification.from_pretrained(str(minilm_classifier)).eval()(**encoded).logits
    actual = onnx_outputs(tmp_path / "model.onnx", {name: tensor.numpy() for name, tensor in encoded.items()})
    assert actual["logits"].shape == (3, 2)
    np.testing.assert_allclose(actual["logits"], expected.numpy(), atol=ATOL)
