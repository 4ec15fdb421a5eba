"""export on the real model: checker, dynamic axes, and ONNX Runtime against PyTorch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from engines.ort_session import OrtRunner
from pipeline.config import load_config
from pipeline.core.progress import Progress
from pipeline.models.registry import inspect_model, load_tokenizer
from pipeline.stages.base import StageContext
from pipeline.stages.export import ExportStage, build_export_module, load_torch_model


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
    assert max(export.metrics["torch_parity_max_abs"].values()) < 1e-3


def test_export_matches_pytorch_at_unseen_shapes(default_build) -> None:
    info = inspect_model(None, None)
    tokenizer = load_tokenizer(info)
    module = build_export_module(load_torch_model(info), info)
    texts = ["Shares in the firm rose sharply after the results were announced on Monday."] * 2 + [
        "The minister said the new rules would take effect next year, after a consultation."
    ]
    encoded = tokenizer(texts, padding="max_length", max_length=61, return_tensors="np")
    feed = {name: encoded[name].astype(np.int64) for name in info.architecture.input_names}
    with torch.inference_mode():
        expected = module(*(torch.from_numpy(feed[n]) for n in info.architecture.input_names))[0].numpy()
    with OrtRunner(default_build.outputs["export"].path("model.onnx")) as runner:
        actual = runner.infer(feed)["sentence_embedding"]
    assert actual.shape == (3, 384)
    np.testing.assert_allclose(actual, expected, atol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(actual, axis=1), 1.0, atol=1e-5)  # Normalize module kept


@pytest.fixture(scope="module")
def classifier_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A text classifier on the real MiniLM encoder; its 3-way head is seeded, not trained."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    source = inspect_model(None, None).path
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(str(source), num_labels=3)
    folder = tmp_path_factory.mktemp("classifier")
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(str(source)).save_pretrained(folder)
    return folder


def test_text_classification_export(classifier_folder: Path, tmp_path: Path) -> None:
    info = inspect_model(str(classifier_folder), None)
    assert info.task.name == "text-classification"
    context = StageContext(load_config(None, {}), info, Progress(quiet=True))
    metrics = ExportStage().run(context, tmp_path)
    model = onnx.load(str(tmp_path / "model.onnx"))
    assert [o.name for o in model.graph.output] == ["logits"]
    assert metrics["torch_parity_max_abs"]["logits"] < 1e-3
