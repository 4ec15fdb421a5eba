"""A finished build, opened the way it was measured: `open_build(build_dir)` -> a runner.

The runner's ONNX Runtime session takes the settings recorded in the build's manifest ("runtime":
graph optimization level, disabled optimizers such as SkipLayerNormFusion, session config entries), so a
user gets the speed and the numbers the parity report measured, not what a plain InferenceSession does.
Labels and the model configuration come from the build folder itself (config.json), never from the
folder the model was built from, so a build copied elsewhere still names its classes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, TypeVar

import numpy as np

from pipeline.core.errors import InputError

_Runner = TypeVar("_Runner", bound="_ClosedOnExit")

@dataclass
class Prediction:
    label: str
    score: float
    index: int


def session_settings(manifest: dict[str, Any], build_dir: Path) -> Any:
    from engines.ort_session import SessionSettings

    runtime = manifest.get("runtime")
    if runtime is None:  # published before the record existed: the settings its target was measured with
        return SessionSettings.for_target(str(manifest.get("config", {}).get("target", "cpu")))
    if not isinstance(runtime, dict):
        raise InputError(f"{build_dir / 'manifest.json'}: 'runtime' must be an object")
    try:
        return SessionSettings.from_dict(runtime)
    except ValueError as exc:
        raise InputError(f"{build_dir / 'manifest.json'}: runtime: {exc}") from None


def build_labels(build_dir: Path, manifest: dict[str, Any]) -> dict[int, str]:
    """id2label from the build's config.json; builds published before it was copied in: the model folder's."""
    from pipeline.build.standalone import MODEL_CONFIG, labels_of

    for folder in (build_dir, Path(str(manifest.get("model", {}).get("path", "")))):
        try:
            config = json.loads((folder / MODEL_CONFIG).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(config, dict):
            return labels_of(config)
    return {}


class _ClosedOnExit:
    """`with pipeline.load(build) as runner:` releases the runner's ONNX Runtime session on the way out."""

    def __enter__(self: _Runner) -> _Runner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        raise NotImplementedError


class BuildRunner(_ClosedOnExit):
    """The build's model.onnx in ONNX Runtime with its recorded settings, and its tokenizer."""

    def __init__(self, build_dir: Path, manifest: dict[str, Any], threads: int = 0) -> None:
        from transformers import AutoTokenizer

        from engines.ort_session import create_session

        self.build_dir, self.manifest = build_dir, manifest
        self.task = str(manifest["model"]["task"])
        self.max_length = int(manifest["config"]["calibration"]["max_length"])
        self.settings = session_settings(manifest, build_dir)
        self.session = create_session(build_dir / "model.onnx", threads=threads, settings=self.settings)
        self.input_names = [item.name for item in self.session.get_inputs()]
        self.tokenizer = AutoTokenizer.from_pretrained(str(build_dir / "tokenizer"))

    def feed(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        encoded = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                                 return_tensors="np")
        return {name: np.asarray(encoded[name], dtype=np.int64) for name in self.input_names}

    def run(self, output: str, texts: Sequence[str], batch_size: int) -> np.ndarray:
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts or not all(isinstance(text, str) for text in texts):
            raise InputError("give one text or a non-empty list of texts")
        rows = [self.session.run([output], self.feed(texts[start:start + batch_size]))[0]
                for start in range(0, len(texts), batch_size)]
        return np.concatenate(rows)

    def close(self) -> None:
        self.session = None  # type: ignore[assignment]


class EmbeddingRunner(BuildRunner):
    def encode(self, texts: Sequence[str] | str, batch_size: int = 32) -> np.ndarray:
        """Sentence embeddings [texts, dimension] (normalized when the model's pooling normalizes)."""
        return self.run("sentence_embedding", texts, batch_size)


class ClassifierRunner(BuildRunner):
    def __init__(self, build_dir: Path, manifest: dict[str, Any], threads: int = 0) -> None:
        super().__init__(build_dir, manifest, threads)
        self.labels = build_labels(build_dir, manifest)

    def logits(self, texts: Sequence[str] | str, batch_size: int = 32) -> np.ndarray:
        return self.run("logits", texts, batch_size)

    def predict(self, texts: Sequence[str] | str, batch_size: int = 32) -> list[Prediction]:
        """The most probable label of each text, with its softmax probability."""
        logits = self.logits(texts, batch_size)
        shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
        probabilities = shifted / shifted.sum(axis=1, keepdims=True)
        best = probabilities.argmax(axis=1)
        return [Prediction(self.labels.get(int(i), f"LABEL_{int(i)}"), float(probabilities[row, i]), int(i))
                for row, i in enumerate(best)]


class GeneratorRunner(_ClosedOnExit):
    """A decoder LLM build: its KV-cache graph, decoded greedily (or sampled) like `pipeline generate`."""

    def __init__(self, build_dir: Path, manifest: dict[str, Any], threads: int = 0, fp32: bool = False) -> None:
        from transformers import AutoTokenizer

        from pipeline.models.decoding import KVDecoder

        self.build_dir, self.manifest = build_dir, manifest
        self.task = "text-generation"
        self.settings = session_settings(manifest, build_dir)
        model = build_dir / ("model.fp32.onnx" if fp32 else "model.onnx")
        self.decoder = KVDecoder(model, threads, settings=self.settings)
        self.tokenizer = AutoTokenizer.from_pretrained(str(build_dir / "tokenizer"))

    def generate_ids(self, prompt: str, max_new_tokens: int = 32, temperature: float = 0.0, top_k: int = 0,
                     seed: int = 0, chat: bool = False, on_token: Any = None) -> tuple[list[int], Any]:
        """(prompt token ids, Generation) of one prompt; stops at the tokenizer's end-of-sequence token."""
        from pipeline.models.decoding import generate

        if max_new_tokens < 1:
            raise InputError("max_new_tokens must be at least 1")
        text = prompt
        if chat:
            text = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                      add_generation_prompt=True)
        prompt_ids = list(self.tokenizer(text).input_ids)
        stop = [self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else []
        return prompt_ids, generate(self.decoder, prompt_ids, max_new_tokens, temperature=temperature, top_k=top_k,
                                    seed=seed, stop_ids=stop, on_token=on_token)

    def generate(self, prompt: str, max_new_tokens: int = 32, temperature: float = 0.0, top_k: int = 0,
                 seed: int = 0, chat: bool = False) -> str:
        """The continuation of `prompt` (without the prompt), greedy at temperature 0."""
        _, result = self.generate_ids(prompt, max_new_tokens, temperature, top_k, seed, chat)
        return str(self.tokenizer.decode(result.tokens, skip_special_tokens=True))

    def close(self) -> None:
        self.decoder = None  # type: ignore[assignment]


RUNNERS: dict[str, type] = {
    "feature-extraction": EmbeddingRunner,
    "text-classification": ClassifierRunner,
    "text-generation": GeneratorRunner,
}


def open_build(build_dir: Path | str, threads: int = 0, manifest: Optional[dict[str, Any]] = None) -> Any:
    """A runner for a finished build: EmbeddingRunner.encode, ClassifierRunner.predict or GeneratorRunner.generate."""
    from pipeline.build.manifest import read_manifest

    build_dir = Path(build_dir)
    manifest = read_manifest(build_dir) if manifest is None else manifest
    if manifest.get("status") not in ("passed", None) or not (build_dir / "model.onnx").is_file():
        raise InputError(f"{build_dir} holds no finished build (status {manifest.get('status')!r}, model.onnx "
                         f"{'present' if (build_dir / 'model.onnx').is_file() else 'missing'}); run `pipeline build` first")
    try:
        task = str(manifest["model"]["task"])
        runner = RUNNERS[task]
    except (KeyError, TypeError):
        raise InputError(f"{build_dir / 'manifest.json'} names no task this version can load "
                         f"(known: {', '.join(RUNNERS)})") from None
    try:
        return runner(build_dir, manifest, threads)
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"cannot open the build in {build_dir}: {type(exc).__name__}: {exc}") from None
