"""`pipeline build --help` in sections (model, calibration, CPU INT8, LLM, TensorRT, gates, run), with
defaults read from the configuration schema (pipeline/config.py), not typed by hand beside each flag."""

from __future__ import annotations

from typing import Any, Optional

import click
from pydantic import BaseModel

from pipeline.api.options import FLAG_KEYS
from pipeline.config import BuildConfig

# Section -> option names (click parameter names), in the order shown.
GROUPS: dict[str, tuple[str, ...]] = {
    "Model": ("config_file", "target", "model", "adapter", "task", "output", "opset", "trust_remote_code"),
    "Calibration": ("calib_source", "calib_format", "text_field", "text_pair_field", "label_field", "calib_samples",
                    "heldout_samples", "seed", "batch_size", "max_length", "stratify", "padding", "long_samples",
                    "calib_method", "percentile"),
    "CPU INT8 (encoders)": ("quant", "cpu_isa", "per_channel", "exclude", "quant_format", "smoothquant", "smoothquant_alpha",
                            "outlier_threshold", "fallback", "tolerable_loss"),
    "LLM weight-only (decoders)": ("weight_bits", "block_size", "lm_head", "vocab_block_size", "symmetric", "zero_point", "embeddings", "llm_graph"),
    "TensorRT (--target trt)": ("precision", "min_shapes", "opt_shapes", "max_shapes", "require_engine"),
    "Parity gates": ("min_cosine", "max_abs", "localize", "eval_file", "max_perplexity_increase",
                     "min_token_agreement"),
    "Run": ("stop_after", "force", "print_config", "json_summary", "quiet", "verbose", "log_file", "lock_timeout"),
}


def int_list(value: str) -> list[int]:
    """A comma-separated list of positive whole numbers (--batch 1,8,32), or click's usage error."""
    try:
        numbers = [int(part) for part in value.split(",") if part.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated whole numbers, got '{value}'") from None
    if not numbers or min(numbers) < 1:
        raise click.BadParameter(f"expected positive whole numbers, got '{value}'")
    return numbers


def schema_default(dotted: str) -> Any:
    """The schema's default of a dotted configuration key (None when it has none)."""
    model: Any = BuildConfig
    *sections, leaf = dotted.split(".")
    for section in sections:
        model = model.model_fields[section].annotation
    field = model.model_fields[leaf]
    if field.default_factory is not None:
        value = field.default_factory()
        return value if not isinstance(value, BaseModel) else None
    return field.default


def _shown(value: Any) -> Optional[str]:
    if value is None or value == [] or value is False:
        return None if value is not False else "off"
    if value is True:
        return "on"
    return str(value)


class GroupedCommand(click.Command):
    """A click command whose --help lists its options in GROUPS' sections; the options of FLAG_KEYS
    get `[default: ...]` from the schema unless their help already explains a default that depends
    on the model (e.g. --quant: dynamic for encoders, rtn for decoder LLMs)."""

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        records: dict[str, tuple[str, str]] = {}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is None:
                continue
            text = record[1]
            if param.name in FLAG_KEYS and "[default:" not in text:
                shown = _shown(schema_default(FLAG_KEYS[param.name]))
                if shown is not None:
                    text = f"{text}  [default: {shown}]"
            records[str(param.name)] = (record[0], text)
        placed = set()
        for title, names in GROUPS.items():
            rows = [records[name] for name in names if name in records]
            placed.update(names)
            if rows:
                with formatter.section(title):
                    formatter.write_dl(rows)
        rest = [record for name, record in records.items() if name not in placed]
        if rest:
            with formatter.section("Other"):
                formatter.write_dl(rest)
