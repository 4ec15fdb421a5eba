"""Keyword options of `pipeline.build(...)`: the build command's flags, by their Python names.

One table for the CLI and the Python API, so `build(quant="static", calib_samples=256)` and
`pipeline build --quant static --calib-samples 256` are the same build.
"""

from __future__ import annotations

from typing import Any, Mapping

from pipeline.core.errors import ConfigError

# option (flag) name -> configuration key; only options the user gave override the build file.
FLAG_KEYS = {
    "target": "target",
    "model": "model.path",
    "adapter": "model.adapter",
    "task": "model.task",
    "output": "output_dir",
    "quant": "quantization.mode",
    "per_channel": "quantization.per_channel",
    "exclude": "quantization.exclude",
    "quant_format": "quantization.format",
    "smoothquant": "quantization.smoothquant",
    "smoothquant_alpha": "quantization.smoothquant_alpha",
    "outlier_threshold": "quantization.outlier_threshold",
    "fallback": "quantization.fallback",
    "tolerable_loss": "quantization.tolerable_loss",
    "calib_source": "calibration.source",
    "calib_samples": "calibration.samples",
    "heldout_samples": "calibration.heldout_samples",
    "seed": "calibration.seed",
    "batch_size": "calibration.batch_size",
    "max_length": "calibration.max_length",
    "calib_format": "calibration.format",
    "text_field": "calibration.text_field",
    "text_pair_field": "calibration.text_pair_field",
    "label_field": "calibration.label_field",
    "stratify": "calibration.stratify",
    "padding": "calibration.padding",
    "long_samples": "calibration.long_samples",
    "calib_method": "calibration.method",
    "percentile": "calibration.percentile",
    "min_cosine": "verify.min_cosine",
    "max_abs": "verify.max_abs",
    "localize": "verify.localize",
    "eval_file": "verify.eval_file",
    "precision": "trt.precision",
    "require_engine": "trt.require_engine",
    "trust_remote_code": "model.trust_remote_code",
    "weight_bits": "quantization.weight_bits",
    "block_size": "quantization.block_size",
    "lm_head": "quantization.lm_head",
    "vocab_block_size": "quantization.vocab_block_size",
    "symmetric": "quantization.symmetric",
    "zero_point": "quantization.zero_point",
    "llm_graph": "quantization.llm_graph",
    "embeddings": "quantization.embeddings",
    "max_perplexity_increase": "verify.max_perplexity_increase",
    "min_token_agreement": "verify.min_token_agreement",
    "opset": "model.opset",
    "cpu_isa": "quantization.cpu_isa",
}
# trtexec's spelling of an optimization profile (--minShapes=input_ids:1x16,...): all three or none.
SHAPE_OPTIONS = ("min_shapes", "opt_shapes", "max_shapes")
# Whole sections of the configuration, given as mappings: build(quantization={"mode": "static"}).
SECTIONS = ("model", "calibration", "quantization", "verify", "trt")


def set_nested(target: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for key in parents:
        target = target.setdefault(key, {})
    target[leaf] = value


def overrides_from_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """Nested configuration overrides from flag-named options (None and empty tuples: not given)."""
    overrides: dict[str, Any] = {}
    shapes = {name: options[name] for name in SHAPE_OPTIONS if options.get(name) is not None}
    if shapes:
        batch, sequence = profile_from_shapes(shapes)
        overrides["trt"] = {"batch": batch, "sequence": sequence}
    for name, value in options.items():
        if value is None or value == () or name in SHAPE_OPTIONS:
            continue
        if name in SECTIONS and isinstance(value, Mapping):
            overrides.setdefault(name, {}).update(value)
        elif name == "output_dir":
            overrides["output_dir"] = str(value)
        elif name in FLAG_KEYS:
            set_nested(overrides, FLAG_KEYS[name], list(value) if isinstance(value, (tuple, list)) else
                       (str(value) if hasattr(value, "__fspath__") else value))
        else:
            raise ConfigError(f"unknown build option '{name}' (options: {', '.join(sorted([*FLAG_KEYS, *SECTIONS, *SHAPE_OPTIONS]))})")
    return overrides


def _shape(option: str, spec: str) -> tuple[int, int]:
    """`input_ids:1x128,attention_mask:1x128` -> (1, 128); every input must have the same batch x sequence
    (the profile is one batch range and one sequence range for all text inputs)."""
    found = set()
    for part in str(spec).split(","):
        name, _, dims = part.strip().rpartition(":")
        try:
            values = tuple(int(d) for d in dims.lower().split("x"))
        except ValueError:
            values = ()
        if not name or len(values) != 2 or min(values) < 1:
            raise ConfigError(f"--{option.replace('_', '-')} {spec!r}: expected input:BATCHxSEQUENCE[,input:BATCHxSEQUENCE], "
                              "as trtexec spells it (e.g. input_ids:1x128,attention_mask:1x128)")
        found.add(values)
    if len(found) != 1:
        raise ConfigError(f"--{option.replace('_', '-')} {spec!r}: every input takes the same batch x sequence here")
    return found.pop()


def profile_from_shapes(shapes: Mapping[str, str]) -> tuple[list[int], list[int]]:
    """trt.batch and trt.sequence (min, opt, max) from --min-shapes/--opt-shapes/--max-shapes."""
    missing = [f"--{name.replace('_', '-')}" for name in SHAPE_OPTIONS if name not in shapes]
    if missing:
        raise ConfigError(f"give --min-shapes, --opt-shapes and --max-shapes together (missing {', '.join(missing)})")
    dims = [_shape(name, shapes[name]) for name in SHAPE_OPTIONS]
    return [d[0] for d in dims], [d[1] for d in dims]
