"""export: PyTorch -> ONNX (dynamic batch and sequence axes), checked against PyTorch on real text."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from calibration.batches import to_batches
from calibration.sources import default_source
from pipeline.config import BuildConfig
from pipeline.core.errors import InputError, StageError
from pipeline.models.registry import ModelInfo, check_pickled_weights, folder_fingerprint, load_tokenizer
from pipeline.models.validation import check_loaded_weights
from pipeline.stages.base import Stage, StageContext
from pipeline.stages.facts import ExportFacts

PROBE_SENTENCES = 16
EXPORT_MAX_ABS = 1e-3


def load_torch_model(info: ModelInfo) -> Any:
    """Weights from safetensors when present; pickled .bin only through weights-only loading."""
    from transformers import AutoModel, AutoModelForSequenceClassification

    factory = AutoModelForSequenceClassification if info.task.name == "text-classification" else AutoModel
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


def build_export_module(model: Any, info: ModelInfo) -> Any:
    import torch

    input_names = info.architecture.input_names

    class FeatureExtraction(torch.nn.Module):
        """Mean pooling over real tokens, as sentence-transformers computes it."""

        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            kwargs = dict(zip(input_names, inputs))
            hidden = self.model(**kwargs).last_hidden_state
            mask = kwargs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            embedding = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            if info.normalize_embeddings:
                embedding = torch.nn.functional.normalize(embedding, p=2, dim=1)
            return embedding, hidden

    class TextClassification(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
            return self.model(**dict(zip(input_names, inputs))).logits

    wrapper = FeatureExtraction() if info.task.name == "feature-extraction" else TextClassification()
    # eval() on the wrapper too: the exporter restores the wrapper's mode recursively afterwards,
    # and a wrapper left in training mode would switch dropout back on in the model it wraps.
    return wrapper.eval()


def probe_batches(info: ModelInfo, tokenizer: Any) -> list[dict[str, np.ndarray]]:
    sentences = []
    for sentence in default_source():
        sentences.append(sentence)
        if len(sentences) == PROBE_SENTENCES:
            break
    return to_batches(sentences, tokenizer, info.architecture.input_names, batch_size=8, max_length=128)


def max_abs_differences(reference: list[dict[str, np.ndarray]], candidate: list[dict[str, np.ndarray]]) -> dict[str, float]:
    return {
        name: float(max(np.max(np.abs(ref[name] - cand[name])) for ref, cand in zip(reference, candidate)))
        for name in reference[0]
    }


class ExportStage(Stage):
    name = "export"
    facts = ExportFacts
    outputs = ("model.onnx", "tokenizer")

    def config_slice(self, config: BuildConfig, model: ModelInfo) -> dict[str, Any]:
        keyed = {"task": model.task.name, "opset": config.model.opset}
        if model.trust_remote_code:  # only when on, so existing cache keys stay valid
            keyed["trust_remote_code"] = True
        return keyed

    def external_inputs(self, config: BuildConfig, model: ModelInfo) -> dict[str, str]:
        return {"model_folder": folder_fingerprint(model.path)}

    def run(self, context: StageContext, out: Path) -> dict[str, Any]:
        import torch

        from engines.ort_session import OrtRunner

        info = context.model
        tokenizer = load_tokenizer(info)
        model = load_torch_model(info)
        module = build_export_module(model, info)
        probes = probe_batches(info, tokenizer)
        input_names = list(info.architecture.input_names)
        output_names = list(info.task.output_names)
        axes = {name: {0: "batch", 1: "sequence"} for name in input_names}
        axes.update({name: {0: "batch"} for name in output_names})
        if "last_hidden_state" in axes:
            axes["last_hidden_state"] = {0: "batch", 1: "sequence"}
        example = tuple(torch.from_numpy(probes[0][name]) for name in input_names)
        context.progress.info(f"exporting {info.name} ({info.task.name}, opset {context.config.model.opset})")
        with warnings.catch_warnings(), torch.inference_mode():
            warnings.simplefilter("ignore")
            # The TorchScript exporter: its graphs match ONNX Runtime's transformer fusions.
            torch.onnx.export(
                module, example, str(out / "model.onnx"), input_names=input_names, output_names=output_names,
                dynamic_axes=axes, opset_version=context.config.model.opset, dynamo=False,
            )
        onnx.checker.check_model(str(out / "model.onnx"), full_check=True)
        tokenizer.save_pretrained(str(out / "tokenizer"))

        context.progress.info(f"checking ONNX Runtime against PyTorch on {PROBE_SENTENCES} real sentences")
        with torch.inference_mode():
            torch_outputs = []
            for batch in probes:
                result = module(*(torch.from_numpy(batch[name]) for name in input_names))
                result = result if isinstance(result, tuple) else (result,)
                torch_outputs.append({n: t.numpy() for n, t in zip(output_names, result)})
        with OrtRunner(out / "model.onnx", output_names=output_names) as runner:
            onnx_outputs = [runner.infer(batch) for batch in probes]
        differences = max_abs_differences(torch_outputs, onnx_outputs)
        broken = {name: diff for name, diff in differences.items() if not diff <= EXPORT_MAX_ABS}
        if broken:
            detail = ", ".join(f"{name} max |diff| {diff:.3g}" for name, diff in broken.items())
            raise StageError(self.name, f"ONNX graph disagrees with PyTorch (limit {EXPORT_MAX_ABS}): {detail}")
        return {
            "opset": context.config.model.opset,
            "parameters": int(sum(p.numel() for p in model.parameters())),
            "onnx_bytes": (out / "model.onnx").stat().st_size,
            "torch_parity_max_abs": differences,
            "probe_sentences": PROBE_SENTENCES,
        }
