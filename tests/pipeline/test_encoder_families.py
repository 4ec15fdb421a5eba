"""Every encoder family x task, as a tiny random-weight folder (tests/tiny_encoders.py), built for the CPU and
for TensorRT (int8, fp8, fp16) with parity passing, computing what the folder is, and its FP32 export
matching transformers itself to 1e-4.

One build directory per (family, task): the CPU build and the three TensorRT builds share its export, the
TensorRT builds share their calibration (as tests/conftest.py's trt_build does); each build runs once per
session and every assertion reads it.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.tiny_encoders import (
    FAMILY_CONFIGS,
    NUM_LABELS,
    TASK_FACTORIES,
    minilm_tokenizer,
    write_folder,
    write_sentences,
)

FAMILIES = list(FAMILY_CONFIGS)
TASKS = list(TASK_FACTORIES)
PRECISIONS = ("int8", "fp8", "fp16")
# Small and quick: 8 calibration and 64 held-out sentences of at most 32 tokens.
CALIBRATION = {"samples": 8, "heldout_samples": 64, "max_length": 32}
SENTENCES = ["The bank raised its rates again on Tuesday.", "Rain is expected across the north.",
             "Shares in the company fell by a third after the results."]
TORCH_MAX_ABS = 1e-4


@pytest.fixture(scope="session")
def encoder_builds(tmp_path_factory: pytest.TempPathFactory):
    """`encoder_builds(family, task, target, precision=None)`: the build result, run once per session."""
    from pipeline.build.runner import run_build
    from pipeline.config import load_config
    from pipeline.core.progress import Progress

    root = tmp_path_factory.mktemp("encoder-families")
    tokenizer = minilm_tokenizer()
    calibration = {**CALIBRATION, "source": str(write_sentences(root / "sentences.txt"))}
    folders: dict[tuple[str, str], object] = {}
    results: dict[tuple, object] = {}

    def build(family: str, task: str, target: str = "cpu", precision: str | None = None):
        key = (family, task, target, precision)
        if key not in results:
            if (family, task) not in folders:
                folders[(family, task)] = write_folder(root / f"{family}-{task}", family, task, tokenizer)
            overrides = {"output_dir": str(root / f"build-{family}-{task}"), "target": target,
                         "model": {"path": str(folders[(family, task)])}, "calibration": calibration,
                         "verify": {"localize": "never"}}
            if precision:
                overrides["trt"] = {"precision": precision}
            results[key] = run_build(load_config(None, overrides), Progress(quiet=True))
        return results[key]

    build.folder = lambda family, task: folders[(family, task)]  # type: ignore[attr-defined]
    return build


def _graph_outputs(path, feeds):
    from engines.ort_session import OrtRunner

    with OrtRunner(path) as runner:
        return runner.infer(feeds), runner.input_names


def _transformers_outputs(folder, task: str, encoded) -> np.ndarray:
    """What the folder computes, by transformers itself (not our export wrapper)."""
    import torch
    import transformers

    model = getattr(transformers, TASK_FACTORIES[task]).from_pretrained(str(folder), attn_implementation="eager").eval()
    with torch.inference_mode():
        output = model(**{name: torch.from_numpy(value) for name, value in encoded.items()})
    return (output.last_hidden_state if task == "feature-extraction" else output.logits).numpy()


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("family", FAMILIES)
def test_cpu_build_computes_what_the_folder_is(encoder_builds, family: str, task: str) -> None:
    result = encoder_builds(family, task)
    assert result.passed is True
    export = result.outputs["export"]
    assert export.metrics["torch_parity_max_abs"] and max(export.metrics["torch_parity_max_abs"].values()) <= TORCH_MAX_ABS

    tokenizer = minilm_tokenizer()
    encoded = dict(tokenizer(SENTENCES, padding=True, return_tensors="np"))
    outputs, inputs = _graph_outputs(export.path("model.onnx"), {k: v.astype(np.int64) for k, v in encoded.items()})
    # Inputs read from the exported graph: a DeBERTa-v3 (type_vocab_size 0) and DistilBERT take no token types.
    assert ("token_type_ids" in inputs) == (family in ("bert", "electra")), inputs
    reference = _transformers_outputs(encoder_builds.folder(family, task), task,
                                      {k: v.astype(np.int64) for k, v in encoded.items() if k in inputs})
    batch, sequence = encoded["input_ids"].shape
    if task == "feature-extraction":
        assert outputs["sentence_embedding"].shape == (batch, reference.shape[-1])
        actual = outputs["last_hidden_state"]
    else:
        # Sequence logits [batch, labels], per-token logits [batch, sequence, labels]: the head is in the graph.
        labels = NUM_LABELS[task]
        expected_shape = (batch, labels) if task == "text-classification" else (batch, sequence, labels)
        assert outputs["logits"].shape == expected_shape
        actual = outputs["logits"]
    assert float(np.max(np.abs(actual - reference))) <= TORCH_MAX_ABS

    # The optimize stage reports which of the family's declared fusions fused.
    optimize = result.outputs["optimize"].metrics
    assert optimize["fusions_enabled"] and optimize["fusions"], optimize


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("family", FAMILIES)
def test_trt_build_passes_parity(encoder_builds, family: str, task: str, precision: str) -> None:
    encoder_builds(family, task)  # the CPU build first: the TensorRT builds reuse its export
    result = encoder_builds(family, task, "trt", precision)
    assert result.passed is True
    assert result.outputs["export"].reused  # one export per (family, task)
    report = json.loads(result.outputs["verify"].path("parity.json").read_text())
    primary = report["outputs"][report["primary_output"]]
    if task == "token-classification":  # per-token top-1 agreement, over real tokens only
        from calibration.batches import load_batches

        heldout = load_batches(result.outputs["calibrate"].path("heldout.safetensors"))
        assert primary["rows"] == sum(int(batch["attention_mask"].sum()) for batch in heldout)
        assert primary["top1_agreement"] >= 0.98
    inputs = json.loads(result.outputs["bundle"].path("build_config.json").read_text())["profile"]
    assert set(inputs) == set(result.outputs["export"].metrics["input_names"])  # profiles for the graph's own inputs


def test_token_classification_folder_is_not_built_as_an_embedding_model(encoder_builds) -> None:
    from pipeline.models.registry import inspect_model

    encoder_builds("bert", "token-classification")
    info = inspect_model(str(encoder_builds.folder("bert", "token-classification")), None)
    assert info.task.name == "token-classification"
    with pytest.raises(Exception, match="its head is token-classification"):
        inspect_model(str(encoder_builds.folder("bert", "token-classification")), "text-classification")
