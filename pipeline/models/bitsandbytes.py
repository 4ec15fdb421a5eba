"""bitsandbytes checkpoints (saved by transformers with a `quantization_config` of load_in_8bit, or load_in_4bit
nf4/fp4) as build inputs: de-quantized by transformers with bitsandbytes' own kernels (exact: 8-bit is
int8 * SCB / 127 per row, 4-bit is quant_map[code] * absmax per block; tests recompute both from the raw
safetensors) into a plain FP32 folder in the input cache, which then builds like any other model.

Neither 4-bit grid is affine: nf4 and fp4 each have 16 unevenly spaced levels, and ONNX Runtime's
MatMulNBits computes scale * (q - zero) on 16 evenly spaced ones. The weight-only path therefore re-rounds
every 4-bit block that does not lie on an affine grid of its own; `grid_report` counts them up front (the
quantize stage's own source_grid_blocks says the same after its blocking).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional

from pipeline.core.errors import InputError, MissingDependencyError
from pipeline.core.hashing import combined_hash
from pipeline.models.registry import TOKENIZER_FILES, folder_fingerprint

DEQUANTIZE_VERSION = 1
CACHE_ENV = "QUANTPIPE_INPUT_CACHE"


def input_cache() -> Path:
    """Where merged and de-quantized model folders are kept: $QUANTPIPE_INPUT_CACHE, else ~/.cache/quantpipe/inputs."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "quantpipe" / "inputs")


def bnb_scheme(config: dict[str, Any]) -> Optional[str]:
    """'8bit', '4bit-nf4' or '4bit-fp4' for a bitsandbytes checkpoint's config.json, None for any other folder."""
    settings = config.get("quantization_config")
    if not isinstance(settings, dict) or settings.get("quant_method") != "bitsandbytes":
        return None
    if settings.get("load_in_8bit") is True:
        return "8bit"
    if settings.get("load_in_4bit") is True:
        kind = settings.get("bnb_4bit_quant_type", "fp4")
        if kind not in ("nf4", "fp4"):
            raise InputError(f"bitsandbytes bnb_4bit_quant_type {kind!r} is not nf4 or fp4")
        return f"4bit-{kind}"
    raise InputError("a bitsandbytes quantization_config with neither load_in_8bit nor load_in_4bit set")


def resolve_bitsandbytes(folder: Path, scheme: str) -> tuple[Path, dict[str, Any]]:
    """The de-quantized FP32 folder of a bitsandbytes checkpoint, and the manifest's record of it."""
    target = dequantized_folder(folder)
    origin: dict[str, Any] = {"kind": "bitsandbytes", "base": str(folder), "quantization": scheme}
    if scheme == "8bit":
        origin["exact"] = "de-quantized exactly (int8 * SCB / 127 per output row, LLM.int8)"
    else:
        report = grid_report(target, folder)
        origin.update(report)
        origin["exact"] = (f"de-quantized exactly (quant_map[code] * absmax per block of {report['block_size']}); "
                           f"{scheme[5:]} is not an affine grid, so a 4-bit weight-only build re-rounds "
                           f"{report['blocks'] - report['affine_blocks']} of its {report['blocks']} blocks")
    return target, origin


def dequantized_folder(folder: Path) -> Path:
    key = combined_hash({"checkpoint": folder_fingerprint(folder), "version": str(DEQUANTIZE_VERSION)})
    target = input_cache() / "dequantized" / key[:20] / folder.name
    if not (target / "config.json").is_file():
        publish_folder(target, lambda scratch: _dequantize(folder, scratch))
    return target


def publish_folder(target: Path, write: Callable[[Path], None]) -> None:
    """Write a folder in a scratch directory beside `target`, then rename it into place (a concurrent build
    that got there first wins; its bytes are the same)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".writing-", dir=target.parent))
    try:
        write(scratch)
        try:
            scratch.rename(target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def copy_tokenizer_files(source: Path, target: Path) -> None:
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, target / name)


def model_class(folder: Path, config: dict[str, Any]) -> Any:
    """The transformers class named by config.json `architectures` (the head is kept as saved)."""
    import transformers

    names = config.get("architectures") or []
    name = str(names[0]) if isinstance(names, list) and names else "AutoModel"
    factory = getattr(transformers, name, None) if name.isidentifier() else None
    if factory is None or not hasattr(factory, "from_pretrained"):
        raise InputError(f"{folder / 'config.json'}: architecture {name!r} is not a transformers model class")
    return factory


def _dequantize(folder: Path, out: Path) -> None:
    import torch

    if importlib.util.find_spec("bitsandbytes") is None:
        raise MissingDependencyError(f"{folder} is a bitsandbytes checkpoint: pip install 'quantpipe[finetune]'")
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    factory = model_class(folder, config)
    if not any(folder.glob("*.safetensors")):
        raise InputError(f"{folder} holds no safetensors weights (a bitsandbytes checkpoint is read from safetensors only)")
    try:
        model = factory.from_pretrained(str(folder), device_map="cpu", dtype="float32", use_safetensors=True)
        with torch.no_grad():
            model = model.dequantize().float()
    except Exception as exc:  # a checkpoint bitsandbytes or transformers refuses: bad input
        text = str(exc).strip()
        raise InputError(f"cannot de-quantize the bitsandbytes checkpoint {folder}: "
                         f"{text.splitlines()[0] if text else type(exc).__name__}") from None
    model.config.quantization_config = None
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")
    model.save_pretrained(str(out))
    saved = json.loads((out / "config.json").read_text(encoding="utf-8"))
    if "quantization_config" in saved:
        saved.pop("quantization_config")
        (out / "config.json").write_text(json.dumps(saved, indent=2), encoding="utf-8")
    copy_tokenizer_files(folder, out)


def grid_report(dequantized: Path, checkpoint: Path) -> dict[str, Any]:
    """The 4-bit blocks of the checkpoint (from its absmax tensors), and how many of their de-quantized values
    lie on an affine 16-level grid (what MatMulNBits can hold without rounding again)."""
    import numpy as np
    from safetensors import safe_open

    from engines.cpu.block_offset import source_grid_steps

    blocks = affine = 0
    block_size = 0
    weights = {}
    for file in sorted(checkpoint.glob("*.safetensors")):
        with safe_open(str(file), framework="np") as handle:
            for key in handle.keys():
                if key.endswith(".weight.absmax"):
                    weights[key[: -len(".absmax")]] = int(handle.get_slice(key).get_shape()[0])
    for file in sorted(dequantized.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                if key not in weights:
                    continue
                values = handle.get_tensor(key).float().numpy()
                size = values.size // weights[key]
                block_size = block_size or size
                steps = source_grid_steps(values.reshape(-1, size).astype(np.float32))
                blocks += steps.size
                affine += int(np.count_nonzero(~np.isnan(steps)))
    return {"blocks": blocks, "affine_blocks": affine, "block_size": block_size}
