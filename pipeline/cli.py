"""The `pipeline` command: a thin layer that turns flags into a BuildConfig and calls the Python API."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any, Optional

import click
import yaml

from pipeline import __version__
from pipeline.config import STAGE_NAMES, load_config
from pipeline.errors import ExitCode, QuantpipeError
from pipeline.progress import Progress


def _set_nested(target: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for key in parents:
        target = target.setdefault(key, {})
    target[leaf] = value


# flag name -> configuration key; only flags the user gave override the build file.
FLAG_KEYS = {
    "target": "target",
    "model": "model.path",
    "task": "model.task",
    "output": "output_dir",
    "quant": "quantization.mode",
    "per_channel": "quantization.per_channel",
    "exclude": "quantization.exclude",
    "calib_source": "calibration.source",
    "calib_samples": "calibration.samples",
    "heldout_samples": "calibration.heldout_samples",
    "seed": "calibration.seed",
    "batch_size": "calibration.batch_size",
    "max_length": "calibration.max_length",
    "min_cosine": "verify.min_cosine",
    "max_abs": "verify.max_abs",
    "precision": "trt.precision",
    "require_engine": "trt.require_engine",
}


def _quiet_libraries() -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # weights come from local folders, never a hub
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    for name in ("onnx_neural_compressor", "transformers", "onnxruntime", "torch.onnx"):
        logging.getLogger(name).setLevel(logging.ERROR)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="quantpipe")
def cli() -> None:
    """Quantpipe: export, calibrate, quantize and verify transformers for deployment."""


@cli.command()
@click.option("--config", "config_file", type=click.Path(dir_okay=False, path_type=Path),
              help="Build file (YAML or TOML). Flags given on the command line override it.")
@click.option("--target", type=click.Choice(["cpu", "trt"]), help="Deployment target. [default: cpu]")
@click.option("--model", type=str, help="Local Hugging Face model folder. [default: bundled all-MiniLM-L6-v2]")
@click.option("--task", type=click.Choice(["feature-extraction", "text-classification"]),
              help="What the graph computes. [default: from the checkpoint]")
@click.option("--output", "-o", type=str, help="Build directory. [default: build/<model>-<target>]")
@click.option("--quant", type=click.Choice(["static", "dynamic"]), help="INT8 scheme. [default: dynamic]")
@click.option("--per-channel/--per-tensor", default=None, help="Weight scales per output channel. [default: per-channel]")
@click.option("--exclude", multiple=True, help="Op type or node name to keep in FP32 (repeatable).")
@click.option("--calib-source", type=str, help="Text file, one sample per line. [default: BBC News sentences]")
@click.option("--calib-samples", type=int, help="Calibration samples. [default: 128]")
@click.option("--heldout-samples", type=int, help="Held-out samples for parity. [default: 256]")
@click.option("--seed", type=int, help="Seed of the sample selection. [default: 0]")
@click.option("--batch-size", type=int, help="Samples per batch. [default: 8]")
@click.option("--max-length", type=int, help="Maximum tokens per sample. [default: 128]")
@click.option("--min-cosine", type=float, help="Parity gate: minimum mean cosine of the primary output.")
@click.option("--max-abs", type=float, help="Parity gate: maximum absolute error of the primary output.")
@click.option("--precision", type=click.Choice(["int8", "fp8", "fp16", "best"]),
              help="TensorRT precision (--target trt). [default: int8]")
@click.option("--require-engine", is_flag=True, default=None,
              help="--target trt: fail (exit 5) unless TensorRT is present to build the engine.")
@click.option("--stop-after", type=click.Choice(STAGE_NAMES), help="Stop after this stage.")
@click.option("--force", is_flag=True, help="Run every stage again, ignoring the cache.")
@click.option("--print-config", is_flag=True, help="Print the effective configuration and exit.")
@click.option("--quiet", "-q", is_flag=True, help="Print nothing but errors (for CI).")
def build(config_file: Optional[Path], stop_after: Optional[str], force: bool, print_config: bool,
          quiet: bool, **flags: Any) -> None:
    """Export, optimize, calibrate, quantize and verify a model.

    \b
    Example:
      pipeline build --target cpu
      pipeline build --model ./my-bert --quant static --calib-samples 256 -o build/my-bert
      pipeline build --target trt --precision int8
    """
    overrides: dict[str, Any] = {}
    for flag, key in FLAG_KEYS.items():
        value = flags.get(flag)
        if value is not None and value != ():
            _set_nested(overrides, key, list(value) if isinstance(value, tuple) else value)
    config = load_config(config_file, overrides)
    if print_config:
        from pipeline.models import default_model_path

        effective = config.to_dict()
        effective["model"]["path"] = effective["model"]["path"] or str(default_model_path())
        click.echo(yaml.safe_dump(effective, sort_keys=False), nl=False)
        return
    _quiet_libraries()
    from pipeline.runner import run_build

    progress = Progress(quiet=quiet)
    result = run_build(config, progress, force=force, stop_after=stop_after)
    reused = [name for name, output in result.outputs.items() if output.reused]
    if not quiet:
        verdict = {True: "parity passed", None: f"stopped after {stop_after}"}[result.passed]
        click.echo(
            f"build finished in {result.wall_time_s:.1f}s ({verdict}); "
            f"reused {len(reused)}/{len(result.outputs)} stages from cache: {result.build_dir}"
        )
        bundle = result.outputs.get("bundle")
        if bundle is not None and str(bundle.metrics.get("engine", "")).startswith("not built"):
            click.echo(f"TensorRT engine {bundle.metrics['engine']}. The deployment bundle is ready in "
                       f"{result.build_dir / 'trt'}: build the engine there on a GPU host (build_engine.py or trtexec.sh).")


def main() -> None:
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(ExitCode.INTERNAL)
    except click.ClickException as exc:
        exc.show()
        sys.exit(ExitCode.BAD_INPUT)
    except QuantpipeError as exc:
        click.echo(f"error: {exc.message}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    sys.exit(ExitCode.OK)
