"""PEFT LoRA / QLoRA adapters as build inputs: checked, merged onto their base with peft, written once as a
plain model folder that the stages build like any other.

An adapter folder is untrusted input: its config must be a LoRA config whose base is a local model folder,
its weights safetensors (a pickled adapter_model.bin is refused, never unpickled), its target modules must
name modules of the base and its tensors must fit them; each failure is one InputError line (exit 2).

QLoRA: an adapter whose base is a bitsandbytes 4-bit checkpoint was trained on the de-quantized 4-bit
weights, so it is merged onto exactly those (pipeline.models.bitsandbytes), never onto FP32 originals.
The merged folder lives in the input cache (pipeline.models.bitsandbytes.input_cache), keyed by the base's
and the adapter's fingerprints, so a second build of the same pair merges nothing.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Any, Optional

from pipeline.core.errors import InputError, MissingDependencyError
from pipeline.core.hashing import combined_hash
from pipeline.models.bitsandbytes import (bnb_scheme, copy_tokenizer_files, dequantized_folder, input_cache,
                                          model_class, publish_folder, resolve_bitsandbytes)
from pipeline.models.registry import folder_fingerprint

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
MERGE_VERSION = 1  # bump when the merged folder's bytes change for the same inputs


def is_adapter_folder(path: Path) -> bool:
    return path.is_dir() and (path / ADAPTER_CONFIG).is_file() and not (path / "config.json").is_file()


def read_adapter_config(adapter: Path) -> dict[str, Any]:
    if not adapter.exists():
        raise InputError(f"adapter folder not found: {adapter}")
    config_file = adapter / ADAPTER_CONFIG
    if not adapter.is_dir() or not config_file.is_file():
        raise InputError(f"{adapter} is not a PEFT adapter folder (no {ADAPTER_CONFIG})")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{config_file} is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise InputError(f"{config_file} must hold a JSON object, not a {type(config).__name__}")
    if config.get("peft_type") != "LORA":
        raise InputError(f"{config_file}: peft_type {config.get('peft_type')!r} is not supported (only LORA adapters)")
    if not (adapter / ADAPTER_WEIGHTS).is_file():
        pickled = (adapter / "adapter_model.bin").is_file()
        raise InputError(f"{adapter} holds no {ADAPTER_WEIGHTS}" + (
            " (its adapter_model.bin is a pickle, which is never loaded: convert it to safetensors)" if pickled else ""))
    return config


def adapter_base(adapter: Path, config: dict[str, Any], base: Optional[str]) -> Path:
    """The base folder: --model when given, else the adapter config's base_model_name_or_path (a local folder)."""
    named = base or config.get("base_model_name_or_path")
    if not isinstance(named, str) or not named:
        raise InputError(f"{adapter / ADAPTER_CONFIG} names no base model (base_model_name_or_path); pass --model BASE")
    folder = Path(named).expanduser()
    if not folder.is_absolute() and not base:
        folder = (adapter / folder) if (adapter / folder).exists() else folder
    if not (folder / "config.json").is_file():
        where = "--model" if base else f"base_model_name_or_path of {adapter / ADAPTER_CONFIG}"
        raise InputError(f"the adapter's base model {named} ({where}) is not a local model folder "
                         "(no model hub is reached: pass --model with the base folder)")
    return folder


def resolve_adapter(adapter: Path, base: Optional[str]) -> tuple[Path, dict[str, Any]]:
    """A merged model folder for (base, adapter), and the manifest's record of where it came from."""
    config = read_adapter_config(adapter)
    base_folder = adapter_base(adapter, config, base)
    base_config = _read_json(base_folder / "config.json")
    scheme = bnb_scheme(base_config)
    qlora = scheme is not None and scheme.startswith("4bit")
    key = combined_hash({"base": folder_fingerprint(base_folder), "adapter": folder_fingerprint(adapter),
                         "merge_version": str(MERGE_VERSION)})
    name = f"{base_folder.name}+{adapter.name}"
    target = input_cache() / "merged" / key[:20] / name
    if not (target / "config.json").is_file():
        merge_weights_from = dequantized_folder(base_folder) if scheme else base_folder
        publish_folder(target, lambda scratch: _merge(merge_weights_from, base_folder, adapter, scratch))
    origin = {
        "kind": "qlora" if qlora else "lora",
        "base": str(base_folder),
        "adapter": str(adapter),
        "adapter_sha256": folder_fingerprint(adapter),
        "quantization": scheme,
        "exact": "merged with peft's merge_and_unload onto the base "
                 + (f"de-quantized from its bitsandbytes {scheme} grid (the weights the 4-bit training saw)"
                    if qlora else "de-quantized from its bitsandbytes grid" if scheme else "as stored")
                 + "; the export is checked against the unmerged PeftModel",
    }
    return target, origin


def load_peft_model(base_folder: Path, adapter: Path, model: Any = None, auto_class: str = "AutoModel") -> Any:
    """The PEFT model (LoRA layers unmerged) in eval mode: the export's reference. `model`: a base already
    loaded; else the base folder is loaded (a bitsandbytes base with bitsandbytes, as QLoRA trained on it)."""
    peft = _peft()
    if model is None:
        model = _load_base(base_folder, auto_class)
    try:
        with warnings.catch_warnings():  # transformers' deprecation notes about peft's own calls
            warnings.simplefilter("ignore", FutureWarning)
            peft_model = peft.PeftModel.from_pretrained(model, str(adapter), is_trainable=False)
    except (ValueError, RuntimeError, KeyError, TypeError, OSError) as exc:
        lines = [line.strip() for line in str(exc).splitlines() if "size mismatch" in line]
        reason = lines[0] if lines else _first_line(exc)
        raise InputError(f"adapter {adapter} does not fit its base {base_folder}: {reason}") from None
    return peft_model.eval()


def _merge(weights_from: Path, base_folder: Path, adapter: Path, out: Path) -> None:
    import torch

    with torch.no_grad():
        model = _load_base(weights_from, None)
        _check_targets(model, adapter)
        peft_model = load_peft_model(base_folder, adapter, model)
        _check_loaded(peft_model, adapter)
        merged = peft_model.merge_and_unload()
        merged.save_pretrained(str(out))
    copy_tokenizer_files(base_folder, out)
    for extra in ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json"):
        if (base_folder / extra).is_file():
            shutil.copy2(base_folder / extra, out / extra)
    for module in sorted(p for p in base_folder.iterdir() if p.is_dir() and p.name[:1].isdigit()):
        shutil.copytree(module, out / module.name)  # sentence-transformers modules (1_Pooling, 2_Normalize)


def _load_base(folder: Path, auto_class: Optional[str]) -> Any:
    config = _read_json(folder / "config.json")
    factory = model_class(folder, config) if auto_class is None else _auto(auto_class, config)
    extra: dict[str, Any] = {}
    if bnb_scheme(config):
        extra["device_map"] = "cpu"
    try:
        return factory.from_pretrained(str(folder), dtype="float32", attn_implementation="eager",
                                       use_safetensors=True, **extra).eval()
    except Exception as exc:  # a base that does not load: bad input whatever the library raises
        raise InputError(f"cannot load the adapter's base {folder}: {_first_line(exc)}") from None


def _auto(auto_class: str, config: dict[str, Any]) -> Any:
    import transformers

    return getattr(transformers, auto_class)


def is_adapted(info: Any) -> bool:
    return bool(info.origin) and info.origin.get("kind") in ("lora", "qlora")


def adapter_inputs(info: Any) -> dict[str, str]:
    """The export's extra cache-key input: the adapter its check runs (the merged folder is keyed already)."""
    return {"adapter": info.origin["adapter_sha256"]} if is_adapted(info) else {}


def peft_reference(info: Any, auto_class: str) -> Any:
    """The export check's reference for an adapted model: the PEFT model, LoRA layers unmerged, on the base as
    the adapter was trained on it. A bitsandbytes base (QLoRA) is its exact de-quantized weights: bitsandbytes'
    own CPU kernels compute in lower precision that varies with the host (bf16 where the CPU has it), which
    would make the 1e-3 export check pass on one machine and fail on another."""
    base = Path(info.origin["base"])
    weights = dequantized_folder(base) if info.origin.get("quantization") else base
    model = _load_base(weights, auto_class)
    return load_peft_model(base, Path(info.origin["adapter"]), model)


def _check_targets(model: Any, adapter: Path) -> None:
    """target_modules that name no module of the base are refused (peft would raise, or silently adapt less)."""
    config = _read_json(adapter / ADAPTER_CONFIG)
    targets = config.get("target_modules")
    names = [name for name, _ in model.named_modules()]
    if targets == "all-linear":  # peft's own shorthand: every linear layer but the output head
        return
    if isinstance(targets, str):  # a regular expression: peft matches it against full names
        import re

        if not any(re.fullmatch(targets, name) for name in names):
            raise InputError(f"{adapter / ADAPTER_CONFIG}: target_modules {targets!r} matches no module of the base")
        return
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
        raise InputError(f"{adapter / ADAPTER_CONFIG}: target_modules must be a non-empty list of module names")
    leaves = {name.rsplit(".", 1)[-1] for name in names} | set(names)
    unknown = sorted(t for t in targets if t not in leaves and not any(n.endswith("." + t) for n in names))
    if unknown:
        raise InputError(f"{adapter / ADAPTER_CONFIG}: target_modules {', '.join(unknown)} name no module of the base")


def _check_loaded(peft_model: Any, adapter: Path) -> None:
    """Every adapter tensor must land on a LoRA layer (peft only warns about the rest)."""
    from safetensors import safe_open

    expected = set()
    for name, _ in peft_model.named_parameters():
        if "lora_" in name:
            expected.add(name.replace(".default", "").split("base_model.model.", 1)[-1])
    with safe_open(str(adapter / ADAPTER_WEIGHTS), framework="pt") as handle:
        stored = {key.split("base_model.model.", 1)[-1] for key in handle.keys()}
    stray = sorted(stored - expected)
    if stray:
        raise InputError(f"{adapter / ADAPTER_WEIGHTS}: {len(stray)} tensors fit no LoRA layer of the base "
                         f"(first: {stray[0]})")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise InputError(f"{path} must hold a JSON object")
    return data


def _peft() -> Any:
    try:
        import peft
    except ImportError:
        raise MissingDependencyError("LoRA adapters need peft: pip install 'quantpipe[finetune]'") from None
    return peft


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def prepare_input(path: Optional[str], adapter: Optional[str]) -> tuple[Optional[str], Optional[dict[str, Any]]]:
    """The model folder the stages build, and where it came from: a PEFT adapter (given with --adapter, or as
    --model when the folder is an adapter) merged onto its base, or a bitsandbytes checkpoint de-quantized;
    any other model is returned as given, with no origin."""
    if adapter is not None:
        merged, origin = resolve_adapter(Path(adapter).expanduser(), path)
        return str(merged), origin
    if path is None or not Path(path).is_dir():
        return path, None
    folder = Path(path)
    if is_adapter_folder(folder):
        merged, origin = resolve_adapter(folder, None)
        return str(merged), origin
    if not (folder / "config.json").is_file():
        return path, None
    scheme = bnb_scheme(_read_json(folder / "config.json"))
    if scheme is None:
        return path, None
    dequantized, origin = resolve_bitsandbytes(folder, scheme)
    return str(dequantized), origin
