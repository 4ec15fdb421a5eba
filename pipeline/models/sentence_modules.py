"""A sentence-transformers folder's modules (modules.json) as sentence-transformers computes them.

The module list is read without importing sentence-transformers: the Transformer, then Pooling
(`1_Pooling/config.json`: cls, max, mean, mean_sqrt_len_tokens, weightedmean, lasttoken, several of them
concatenated in the listed order), Dense layers (`2_Dense`: a linear layer and a torch activation) and
Normalize. The pooling head built here is exported into the ONNX graph; the export stage then checks the
graph against `SentenceTransformer(folder).encode` itself, the independent reference.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

from pipeline.core.errors import InputError

POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")
# sentence-transformers < 6 wrote one boolean per mode.
_LEGACY_MODE_KEYS = {
    "pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max", "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean", "pooling_mode_lasttoken": "lasttoken",
}


@dataclass(frozen=True)
class Pooling:
    modes: tuple[str, ...]


@dataclass(frozen=True)
class Dense:
    path: Path
    in_features: int
    out_features: int
    bias: bool
    activation: str  # a torch.nn module class path, as sentence-transformers saves it
    residual: bool = False


@dataclass(frozen=True)
class Normalize:
    pass


Step = Union[Pooling, Dense, Normalize]


@dataclass(frozen=True)
class SentenceModules:
    """What follows the transformer in a sentence-transformers folder, in order."""

    steps: tuple[Step, ...]

    @property
    def pooling(self) -> Pooling:
        return next(step for step in self.steps if isinstance(step, Pooling))

    @property
    def normalizes(self) -> bool:
        return any(isinstance(step, Normalize) for step in self.steps)

    def describe(self) -> str:
        parts = []
        for step in self.steps:
            if isinstance(step, Pooling):
                parts.append("+".join(step.modes) + " pooling")
            elif isinstance(step, Dense):
                parts.append(f"Dense {step.in_features}->{step.out_features} ({step.activation.rsplit('.', 1)[-1]})")
            else:
                parts.append("Normalize")
        return ", ".join(parts)


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"cannot read {path}: {exc}") from None


def _pooling(folder: Path) -> Pooling:
    config = _json(folder / "config.json")
    if not isinstance(config, dict):
        raise InputError(f"{folder / 'config.json'} must hold a JSON object")
    if config.get("include_prompt") is False:
        raise InputError(f"{folder}: pooling with include_prompt false (prompt tokens excluded) is not supported")
    mode = config.get("pooling_mode")
    if mode is None:
        modes = tuple(name for key, name in _LEGACY_MODE_KEYS.items() if config.get(key)) or ("mean",)
    else:
        modes = (mode,) if isinstance(mode, str) else tuple(mode) if isinstance(mode, list) else ()
    unknown = [m for m in modes if m not in POOLING_MODES]
    if not modes or unknown:
        raise InputError(f"{folder}: pooling mode {unknown or mode!r} is not one of {', '.join(POOLING_MODES)}")
    return Pooling(modes)


def _dense(folder: Path) -> Dense:
    config = _json(folder / "config.json")
    activation = str(config.get("activation_function") or "torch.nn.modules.activation.Tanh")
    if not activation.startswith("torch.nn."):
        raise InputError(f"{folder}: activation {activation!r} is not a torch.nn module (code outside torch is never imported)")
    if config.get("module_input_name", "sentence_embedding") != "sentence_embedding":
        raise InputError(f"{folder}: a Dense layer on {config.get('module_input_name')!r} is not supported")
    try:
        return Dense(folder, int(config["in_features"]), int(config["out_features"]), bool(config.get("bias", True)),
                     activation, bool(config.get("use_residual", False)))
    except (KeyError, TypeError, ValueError):
        raise InputError(f"{folder / 'config.json'}: a Dense layer needs whole-number in_features and out_features") from None


def read_sentence_modules(folder: Path) -> Optional[SentenceModules]:
    """The folder's modules after the transformer, or None when it is not a sentence-transformers folder."""
    listing = folder / "modules.json"
    if not listing.is_file():
        return None
    entries = _json(listing)
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise InputError(f"{listing} must hold a list of modules")
    steps: list[Step] = []
    for index, entry in enumerate(entries):
        kind = str(entry.get("type", "")).rsplit(".", 1)[-1]
        where = folder / str(entry.get("path", ""))
        if kind == "Transformer" and index == 0:
            continue
        if kind == "Pooling" and not any(isinstance(step, Pooling) for step in steps):
            steps.append(_pooling(where))
        elif kind == "Dense" and steps:
            steps.append(_dense(where))
        elif kind == "Normalize" and steps:
            steps.append(Normalize())
        else:
            raise InputError(f"{listing}: module {index} ({entry.get('type')!r}) is not supported here "
                             "(supported: Transformer, then Pooling, Dense, Normalize)")
    if not steps or not isinstance(steps[0], Pooling):
        raise InputError(f"{listing}: no Pooling module after the Transformer")
    return SentenceModules(tuple(steps))


def pool(modes: tuple[str, ...], hidden: Any, mask: Any) -> Any:
    """sentence-transformers' padded pooling (Pooling._forward_padded), mode by mode, concatenated."""
    import torch

    vectors = []
    mask_float = mask.unsqueeze(-1).to(hidden.dtype)
    for mode in modes:
        if mode == "cls":  # the first real token
            first = mask.to(torch.int32).argmax(dim=1)
            vectors.append(torch.gather(hidden, 1, first.view(-1, 1, 1).expand(-1, 1, hidden.shape[-1])).squeeze(1))
        elif mode == "max":
            vectors.append(hidden.masked_fill(mask_float == 0, float("-inf")).max(dim=1).values)
        elif mode in ("mean", "mean_sqrt_len_tokens"):
            count = torch.clamp(mask_float.sum(dim=1), min=1e-9)
            vectors.append((hidden * mask_float).sum(dim=1) / (count if mode == "mean" else torch.sqrt(count)))
        elif mode == "weightedmean":  # position weights from the first real token
            start = mask.to(torch.int32).argmax(dim=1).to(hidden.dtype)
            positions = torch.arange(1, hidden.shape[1] + 1, dtype=hidden.dtype).view(1, -1, 1)
            weights = mask_float * (positions - start.view(-1, 1, 1))
            vectors.append((hidden * weights).sum(dim=1) / torch.clamp(weights.sum(dim=1), min=1e-9))
        elif mode == "lasttoken":
            length = hidden.shape[1]
            values, indices = mask.to(torch.int32).flip(1).max(1)
            indices = torch.where(values == 0, length - 1, indices)
            last = (length - indices - 1).view(-1, 1, 1).expand(-1, 1, hidden.shape[-1])
            vectors.append(torch.gather(hidden * mask_float, 1, last).squeeze(1))
    return torch.cat(vectors, dim=-1)


def _activation(path: str) -> Any:
    import importlib

    import torch

    module_name, _, class_name = path.rpartition(".")
    try:
        activation = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError):
        raise InputError(f"activation {path!r} is not in torch") from None
    if not (isinstance(activation, type) and issubclass(activation, torch.nn.Module)):
        raise InputError(f"activation {path!r} is not a torch.nn module")
    return activation()


def _dense_module(step: Dense) -> Any:
    import torch

    linear = torch.nn.Linear(step.in_features, step.out_features, bias=step.bias)
    residual = torch.nn.Linear(step.in_features, step.out_features, bias=False) \
        if step.residual and step.in_features != step.out_features else None
    weights = step.path / "model.safetensors"
    if weights.is_file():
        from safetensors.torch import load_file

        state = load_file(str(weights))
    elif (step.path / "pytorch_model.bin").is_file():
        state = torch.load(str(step.path / "pytorch_model.bin"), map_location="cpu", weights_only=True)
    else:
        raise InputError(f"{step.path} holds no weights (model.safetensors or pytorch_model.bin)")
    try:
        linear.load_state_dict({k.removeprefix("linear."): v for k, v in state.items() if k.startswith("linear.")})
        if residual is not None:
            residual.load_state_dict({k.removeprefix("residual."): v for k, v in state.items() if k.startswith("residual.")})
    except RuntimeError as exc:
        raise InputError(f"{step.path}: weights do not fit the layer ({str(exc).splitlines()[0]})") from None
    return linear, _activation(step.activation), residual


def sentence_head(modules: SentenceModules) -> Any:
    """A torch module (token embeddings, attention mask) -> sentence embedding, for the export."""
    import torch

    class SentenceHead(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.denses = torch.nn.ModuleList()
            self.plan: list[tuple[str, Any]] = []
            for step in modules.steps:
                if isinstance(step, Dense):
                    linear, activation, residual = _dense_module(step)
                    self.denses.append(torch.nn.ModuleList([linear, activation] + ([residual] if residual else [])))
                    self.plan.append(("dense", step))
                else:
                    self.plan.append(("pool" if isinstance(step, Pooling) else "normalize", step))

        def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            embedding = hidden
            dense = iter(self.denses)
            for kind, step in self.plan:
                if kind == "pool":
                    embedding = pool(step.modes, hidden, mask)
                elif kind == "normalize":
                    embedding = torch.nn.functional.normalize(embedding, p=2, dim=-1)
                else:
                    layers = next(dense)
                    out = layers[1](layers[0](embedding))
                    if step.residual:
                        out = out + (layers[2](embedding) if len(layers) > 2 else embedding)
                    embedding = out
            return embedding

    return SentenceHead().eval()
