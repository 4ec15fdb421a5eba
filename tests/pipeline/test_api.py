"""The Python API: `pipeline.build()` on the default model (the session's default_build fixture is that
call), `pipeline.load(...).encode/predict/generate`, a parity failure returned as a result, and build
folders that stand alone (a moved classifier keeps its labels; onnxruntime-genai opens an LLM build)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import pipeline
from engines.ort_session import create_session
from pipeline.bench.serve_load import ServerProcess, request
from pipeline.core.errors import ConfigError, InputError

TEXTS = ["The central bank raised interest rates by half a point.",
         "The striker scored twice in the second half.",
         "Shares fell sharply after the results were published on Tuesday morning in London."]


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_import_pipeline_stays_light() -> None:
    code = "import sys, pipeline; print(sorted(m for m in ('torch', 'onnxruntime', 'transformers', 'pipeline.api') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_build_returns_paths_manifest_and_report(default_build) -> None:
    assert default_build.status == "passed" and default_build.passed is True
    assert default_build.report is not None and default_build.report.status == "pass" and default_build.failures == []
    paths = default_build.paths
    assert {"model", "model_fp32", "tokenizer", "manifest", "parity_json", "config"} <= set(paths)
    assert default_build.manifest["runtime"]["disabled_optimizers"] == ["SkipLayerNormFusion"]
    assert json.loads(paths["config"].read_text())["model_type"] == "bert"


def test_loaded_build_encodes_like_the_fp32_graph_with_the_recorded_session_settings(default_build) -> None:
    runner = pipeline.load(default_build.build_dir, threads=2)
    assert runner.settings.disabled_optimizers == ("SkipLayerNormFusion",)  # read back from manifest.json
    embeddings = runner.encode(TEXTS, batch_size=2)
    assert embeddings.shape == (3, 384)
    # The reference: the FP32 graph in a plain ONNX Runtime session, fed by the build's tokenizer.
    fp32 = create_session(default_build.paths["model_fp32"], threads=2)
    reference = fp32.run(["sentence_embedding"], runner.feed(TEXTS))[0]
    cosines = _cosines(embeddings, reference)
    assert cosines.min() > 0.95, cosines
    assert not np.allclose(embeddings, reference, atol=1e-6)  # it is the INT8 graph, not the FP32 one
    # One text at a time: padding does not leak into the pooled embedding. Exact in the FP32 graph; the INT8 rows
    # differ by their activation scale (dynamic INT8 takes one per batch), so each is held to the FP32 bound above.
    single_feeds = [runner.feed([text]) for text in TEXTS]
    fp32_single = np.concatenate([fp32.run(["sentence_embedding"], feed)[0] for feed in single_feeds])
    np.testing.assert_allclose(fp32_single, reference, atol=1e-5)
    single = np.concatenate([runner.encode(text) for text in TEXTS])
    assert _cosines(single, fp32_single).min() > 0.95


def test_unknown_option_and_missing_build_are_typed_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown build option 'calib_sample'"):
        pipeline.build(calib_sample=8, output=tmp_path / "x")
    with pytest.raises(InputError, match="no manifest.json"):
        pipeline.load(tmp_path)


def test_parity_failure_is_returned_with_its_report(default_build, tmp_path: Path) -> None:
    from tests.helpers import seed_stage_cache

    build_dir = tmp_path / "strict"
    seed_stage_cache(build_dir, default_build.outputs, ("export", "optimize", "calibrate", "quantize"))
    result = pipeline.build(output=build_dir, min_cosine=0.99999, localize="never")
    assert result.status == "parity_failed" and result.passed is False
    assert result.report is not None and any("cosine" in failure for failure in result.failures)
    assert "model" not in result.paths and "parity_json" in result.paths  # reports published, model not
    assert [stage for stage, output in result.outputs.items() if not output.reused] == ["verify"]


@pytest.fixture(scope="module")
def tiny_classifier_build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight two-layer BERT classifier with named labels, built through the API; the model
    folder is deleted afterwards, as when a build is copied to another host."""
    import torch
    from transformers import AutoConfig, AutoTokenizer, BertForSequenceClassification

    from pipeline.models.registry import default_model_path

    folder = tmp_path_factory.mktemp("tiny-classifier")
    tokenizer = AutoTokenizer.from_pretrained(str(default_model_path()))
    config = AutoConfig.for_model("bert", vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=512,
                                  id2label={0: "world", 1: "sport", 2: "business"},
                                  label2id={"world": 0, "sport": 1, "business": 2})
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    result = pipeline.build(model=str(folder), output=tmp_path_factory.mktemp("tiny-classifier-build"),
                            calib_samples=16, heldout_samples=16, localize="never")
    assert result.status == "passed", result.failures
    moved = tmp_path_factory.mktemp("moved") / "build"
    shutil.copytree(result.build_dir, moved, ignore=shutil.ignore_patterns(".stages", ".lock"))
    shutil.rmtree(folder)
    return moved


def test_moved_classifier_build_predicts_and_serves_its_labels(tiny_classifier_build: Path) -> None:
    runner = pipeline.load(tiny_classifier_build)
    predictions = runner.predict(TEXTS)
    logits = runner.logits(TEXTS)
    assert [p.index for p in predictions] == list(logits.argmax(axis=1))
    assert {p.label for p in predictions} <= {"world", "sport", "business"}
    assert all(0 < p.score <= 1 for p in predictions)
    with ServerProcess(tiny_classifier_build, threads=1, max_batch=8, max_wait_ms=1.0) as server:
        connection = server.connect()
        status, answer = request(connection, "POST", "/v1/predict", {"texts": TEXTS})
        connection.close()
    assert status == 200, answer
    assert answer["labels"] == [p.label for p in predictions]


def test_generate_on_an_llm_build_matches_pipeline_generate(tiny_llm_build) -> None:
    from tests.helpers import run_cli

    prompt = "The government said on Tuesday that"
    text = pipeline.load(tiny_llm_build.build_dir).generate(prompt, max_new_tokens=6)
    assert text.strip()
    cli = run_cli("generate", str(tiny_llm_build.build_dir), prompt, "--max-new-tokens", "6")
    assert cli.returncode == 0, cli.stderr
    assert cli.stdout.rstrip("\n") == prompt + text


def test_onnxruntime_genai_opens_the_llm_build_and_decodes_the_same_greedy_tokens(tiny_llm_build) -> None:
    import onnxruntime_genai as og
    runner = pipeline.load(tiny_llm_build.build_dir, threads=1)
    for prompt in ("The government said on Tuesday that", "Shares in the bank fell"):
        ids, ours = runner.generate_ids(prompt, 6)
        ours_logits = _step_logits(runner, ids, 6)
        model = og.Model(str(tiny_llm_build.build_dir))
        assert list(og.Tokenizer(model).encode(prompt)) == ids  # its tokenizer reads the build's files too
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, max_length=len(ids) + 6)
        generator = og.Generator(model, params)
        generator.append_tokens(ids)
        tokens, differences = [], []
        while not generator.is_done() and len(tokens) < 6:
            generator.generate_next_token()  # picks from the logits get_output returns after it
            tokens.append(int(generator.get_next_tokens()[0]))
            logits = np.asarray(generator.get_output("logits"))
            differences.append(np.abs(logits.reshape(-1, logits.shape[-1])[-1] - ours_logits[len(tokens) - 1]).max())
        assert tokens == ours.tokens
        assert max(differences) < 1e-3, differences


def _step_logits(runner, ids: list[int], steps: int) -> list[np.ndarray]:
    from pipeline.models.decoding import generate

    return generate(runner.decoder, ids, steps, keep_logits=True).step_logits
