"""Sentence-embedding folders are exported exactly as sentence-transformers computes them: pooling from
1_Pooling/config.json, Dense layers, Normalize; sentence-transformers' own `encode` is the reference."""

from __future__ import annotations

import numpy as np
import pytest

from tests.tiny_encoders import write_sentence_transformer

SENTENCES = [
    "The central bank left interest rates unchanged.",
    "A short one.",
    "Scientists found water ice in craters near the moon's south pole, the agency said on Friday.",
    "Wales beat Italy in Rome.",
    "The film's director thanked the cast and crew.",
]
ENCODE_MAX_ABS = 1e-5


def _export(folder, tmp_path):
    from pipeline.build.runner import run_build
    from pipeline.config import load_config
    from pipeline.core.progress import Progress

    config = load_config(None, {"output_dir": str(tmp_path / "build"), "model": {"path": str(folder)}})
    return run_build(config, Progress(quiet=True), stop_after="export").outputs["export"]


def _onnx_embeddings(export, folder) -> np.ndarray:
    from transformers import AutoTokenizer

    from engines.ort_session import OrtRunner

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    with OrtRunner(export.path("model.onnx"), output_names=["sentence_embedding"]) as runner:
        feed = {k: v.astype(np.int64) for k, v in tokenizer(SENTENCES, padding=True, return_tensors="np").items()}
        return runner.infer(feed)["sentence_embedding"]


def _encode(folder) -> np.ndarray:
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(folder), device="cpu").encode(SENTENCES, convert_to_numpy=True)


@pytest.mark.parametrize("pooling, dense, normalize", [
    ("cls", None, False),  # the acceptance case: CLS pooling (mean pooling here has cosine ~0.6 to it)
    ("mean", 16, True),  # the acceptance case: a Dense layer (then Normalize)
    ("max", None, False),
    ("lasttoken", None, False),
    ("weightedmean", None, True),
    ("mean_sqrt_len_tokens", None, False),
])
def test_fp32_graph_matches_sentence_transformers_encode(tmp_path, pooling, dense, normalize) -> None:
    folder = write_sentence_transformer(tmp_path / "st", pooling=pooling, dense=dense, normalize=normalize)
    export = _export(folder, tmp_path)
    expected = _encode(folder)
    actual = _onnx_embeddings(export, folder)
    assert actual.shape == expected.shape == (len(SENTENCES), dense or 32)
    assert float(np.max(np.abs(actual - expected))) <= ENCODE_MAX_ABS
    # The export's own check ran against sentence-transformers and recorded what it compared.
    assert export.metrics["sentence_transformers_max_abs"] <= ENCODE_MAX_ABS
    assert pooling in export.metrics["sentence_modules"]


def test_export_check_catches_a_pooling_mistake(tmp_path, monkeypatch) -> None:
    """Were the graph mean-pooled while the folder says CLS (the bug this check exists for), export fails."""
    from pipeline.core.errors import StageError
    from pipeline.models import sentence_modules

    folder = write_sentence_transformer(tmp_path / "st", pooling="cls")
    real_pool = sentence_modules.pool
    monkeypatch.setattr(sentence_modules, "pool", lambda modes, hidden, mask: real_pool(("mean",), hidden, mask))
    with pytest.raises(StageError, match="SentenceTransformer.encode"):
        _export(folder, tmp_path)


def test_unsupported_module_is_refused_in_one_line(tmp_path) -> None:
    import json

    from pipeline.core.errors import InputError
    from pipeline.models.registry import inspect_model

    folder = write_sentence_transformer(tmp_path / "st", pooling="mean")
    modules = json.loads((folder / "modules.json").read_text())
    modules.append({"idx": len(modules), "name": "3", "path": "3_LSTM", "type": "sentence_transformers.models.LSTM"})
    (folder / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(InputError, match="LSTM.*not supported"):
        inspect_model(str(folder), None)
