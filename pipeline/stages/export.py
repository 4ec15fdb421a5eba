"""export: PyTorch -> ONNX (dynamic batch and sequence axes), checked against PyTorch on real text."""

from __future__ import annotations

import inspect
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from calibration.batches import to_batches, token_lengths
from calibration.sources import default_source
from engines.onnx_io import graph_input_names
from pipeline.config import BuildConfig
from pipeline.core.errors import InputError, StageError
from pipeline.models.adapters import adapter_inputs, is_adapted, peft_reference
from pipeline.models.registry import ModelInfo, check_pickled_weights, folder_fingerprint, load_tokenizer
from pipeline.models.sentence_modules import pool, sentence_head
from pipeline.models.validation import check_loaded_weights
from pipeline.stages.base import Stage, StageContext
from pipeline.stages.facts import ExportFacts

PROBE_SENTENCES = 16
EXPORT_MAX_ABS = 1e-3


def load_torch_model(info: ModelInfo) -> Any:
    """Weights from safetensors when present; pickled .bin only through weights-only loading."""
    import transformers

    factory = getattr(transformers, info.task.auto_class)
    has_safetensors = any(info.path.glob("*.safetensors"))
    if not has_safetensors:
        check_pickled_weights(info.path)
    try:
        # Eager attention exports the pattern ONNX Runtime's attention fusion matches (SDPA's does not).
        model, loading_info = factory.from_pretrained(
            str(info.path), attn_implementation="eager", use_safetensors=has_safetensors,
            trust_remote_code=info.trust_remote_code, weights_only=True, dtype="float32", output_loading_info=True,
        )
    except Exception as exc:  # a folder that is not a loadable model: bad input, whatever the library raises
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"cannot load the model in {info.path}: {message}") from None
    # Missing/unexpected tensors, NaN weights: exit 2. Embeddings do not use the pooler or a classifier head.
    unused = ("pooler.", "classifier.", "pre_classifier.", "cls.") if info.task.name == "feature-extraction" else ()
    check_loaded_weights(info.path, model, loading_info, unused)
    return model.eval()


def candidate_inputs(model: Any, info: ModelInfo) -> list[str]:
    """The family's inputs that the model's forward takes (DistilBERT takes no token_type_ids); the exported
    graph then keeps those the model reads."""
    parameters = inspect.signature(model.forward).parameters
    return [name for name in info.architecture.input_names if name in parameters]


def build_export_module(model: Any, info: ModelInfo, input_names: Optional[Sequence[str]] = None) -> Any:
    import torch

    names = list(input_names or candidate_inputs(model, info))
    head = sentence_head(info.sentence_modules) if info.sentence_modules else None

    class FeatureExtraction(torch.nn.Module):
        """The sentence embedding as the folder's sentence-transformers modules compute it (mean pooling over
        real tokens when the folder has none), and the token embeddings."""

        def __init__(self) -> None:
            super().__init__()
            self.model = model
            self.head = head

        def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            kwargs = dict(zip(names, inputs))
            hidden = self.model(**kwargs).last_hidden_state
            if self.head is not None:
                return self.head(hidden, kwargs["attention_mask"]), hidden
            embedding = pool(("mean",), hidden, kwargs["attention_mask"])
            return embedding, hidden

    class Logits(torch.nn.Module):
        """Sequence logits [batch, labels] or per-token logits [batch, sequence, labels]."""

        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
            return self.model(**dict(zip(names, inputs))).logits

    wrapper = FeatureExtraction() if info.task.name == "feature-extraction" else Logits()
    # eval() on the wrapper too: the exporter restores the wrapper's mode recursively afterwards,
    # and a wrapper left in training mode would switch dropout back on in the model it wraps.
    return wrapper.eval()


def sentence_transformers_check(info: ModelInfo, onnx_path: Path, tokenizer: Any) -> float:
    """Largest difference between the graph's sentence_embedding and `SentenceTransformer(folder).encode` on
    the probe sentences: the reference is sentence-transformers itself, not our pooling code."""
    from sentence_transformers import SentenceTransformer

    from engines.ort_session import OrtRunner

    reference = SentenceTransformer(str(info.path), device="cpu", trust_remote_code=info.trust_remote_code)
    # Truncated where sentence-transformers truncates (its max_seq_length), so both see the same tokens; in
    # to_batches' order (by token length), so row i of both is sentence i.
    max_length = int(reference.max_seq_length or 128)
    unsorted = probe_sentences()
    lengths = token_lengths(unsorted, tokenizer, max_length).lengths
    sentences = [unsorted[i] for i in sorted(range(len(unsorted)), key=lambda i: (lengths[i], i))]
    expected = reference.encode(sentences, batch_size=8, convert_to_numpy=True)
    batches = to_batches(sentences, tokenizer, info.architecture.input_names, batch_size=8, max_length=max_length)
    with OrtRunner(onnx_path, output_names=["sentence_embedding"]) as runner:
        actual = np.concatenate([runner.infer(batch)["sentence_embedding"] for batch in batches])
    return float(np.max(np.abs(actual - expected)))


def probe_sentences() -> list[str]:
    sentences = []
    for sample in default_source():
        sentences.append(sample.text)
        if len(sentences) == PROBE_SENTENCES:
            break
    return sentences


def probe_batches(info: ModelInfo, tokenizer: Any) -> list[dict[str, np.ndarray]]:
    return to_batches(probe_sentences(), tokenizer, info.architecture.input_names, batch_size=8, max_length=128)


def max_abs_differences(reference: list[dict[str, np.ndarray]], candidate: list[dict[str, np.ndarray]]) -> dict[str, float]:
    return {
        name: float(max(np.max(np.abs(ref[name] - cand[name])) for ref, cand in zip(reference, candidate)))
        for name in reference[0]
    }


class ExportStage(Stage):
    name = "export"
    version = 2  # 2: sentence-transformers pooling, Dense and Normalize from modules.json; token-classification
    facts = ExportFacts
    outputs = ("model.onnx", "tokenizer")

    def config_slice(self, config: BuildConfig, model: ModelInfo) -> dict[str, Any]:
        keyed = {"task": model.task.name, "opset": config.model.opset}
        if model.trust_remote_code:  # only when on, so existing cache keys stay valid
            keyed["trust_remote_code"] = True
        return keyed

    def external_inputs(self, config: BuildConfig, model: ModelInfo) -> dict[str, str]:
        return {"model_folder": folder_fingerprint(model.path), **adapter_inputs(model)}

    def run(self, context: StageContext, out: Path) -> dict[str, Any]:
        import torch

        from engines.ort_session import OrtRunner

        info = context.model
        tokenizer = load_tokenizer(info)
        model = load_torch_model(info)
        candidates = candidate_inputs(model, info)
        module = build_export_module(model, info, candidates)
        probes = probe_batches(info, tokenizer)
        output_names = list(info.task.output_names)
        axes = {name: {0: "batch", 1: "sequence"} for name in candidates}
        axes.update({name: {0: "batch"} for name in output_names})
        if "last_hidden_state" in axes or info.task.per_token:
            axes["last_hidden_state" if "last_hidden_state" in axes else "logits"] = {0: "batch", 1: "sequence"}
        example = tuple(torch.from_numpy(probes[0][name]) for name in candidates)
        context.progress.info(f"exporting {info.name} ({info.task.name}, opset {context.config.model.opset})")
        with warnings.catch_warnings(), torch.inference_mode():
            warnings.simplefilter("ignore")
            # The TorchScript exporter: its graphs match ONNX Runtime's transformer fusions. It drops the
            # inputs the model never reads, so the graph's own inputs are the model's.
            torch.onnx.export(
                module, example, str(out / "model.onnx"), input_names=candidates, output_names=output_names,
                dynamic_axes=axes, opset_version=context.config.model.opset, dynamo=False,
            )
        input_names = graph_input_names(out / "model.onnx")
        tokenizer.save_pretrained(str(out / "tokenizer"))

        reference_module = module
        if is_adapted(info):  # the PEFT model (LoRA unmerged), not the merged weights the graph was traced from
            context.progress.info(f"reference: the PEFT model of {info.origin['adapter']} on its base, unmerged")
            reference_module = build_export_module(peft_reference(info, info.task.auto_class), info, candidates)
        context.progress.info(f"checking ONNX Runtime against PyTorch on {PROBE_SENTENCES} real sentences")
        with torch.inference_mode():
            torch_outputs = []
            for batch in probes:
                result = reference_module(*(torch.from_numpy(batch[name]) for name in candidates))
                result = result if isinstance(result, tuple) else (result,)
                torch_outputs.append({n: t.numpy() for n, t in zip(output_names, result)})
        with OrtRunner(out / "model.onnx", output_names=output_names) as runner:
            onnx_outputs = [runner.infer(batch) for batch in probes]
        differences = max_abs_differences(torch_outputs, onnx_outputs)
        broken = {name: diff for name, diff in differences.items() if not diff <= EXPORT_MAX_ABS}
        reference: dict[str, Any] = {}
        if info.sentence_modules is not None:
            context.progress.info(f"checking the sentence embedding against sentence-transformers' encode "
                                  f"({info.sentence_modules.describe()})")
            diff = sentence_transformers_check(info, out / "model.onnx", tokenizer)
            reference = {"sentence_transformers_max_abs": diff, "sentence_modules": info.sentence_modules.describe()}
            if not diff <= EXPORT_MAX_ABS:
                broken["sentence_embedding against SentenceTransformer.encode"] = diff
        if broken:
            detail = ", ".join(f"{name} max |diff| {diff:.3g}" for name, diff in broken.items())
            raise StageError(self.name, f"ONNX graph disagrees with PyTorch (limit {EXPORT_MAX_ABS}): {detail}")
        return {
            "opset": context.config.model.opset,
            "parameters": int(sum(p.numel() for p in model.parameters())),
            "onnx_bytes": (out / "model.onnx").stat().st_size,
            "input_names": input_names,
            "torch_parity_max_abs": differences,
            "probe_sentences": PROBE_SENTENCES,
            **reference,
        }
