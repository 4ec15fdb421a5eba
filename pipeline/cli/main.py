"""The `pipeline` command: a thin layer that turns flags into a BuildConfig and calls the Python API."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Optional

import click
import yaml

from pipeline import __version__
from pipeline.cli.architectures import architectures
from pipeline.cli.bench_llm import bench_peers_llm
from pipeline.cli.deploy import bench_serve, export_triton, serve
from pipeline.cli.matrix import bench_fallback, matrix
from pipeline.cli.peers import bench_peers
from pipeline.cli.report import report, verify
from pipeline.api.options import FLAG_KEYS, SHAPE_OPTIONS
from pipeline.config import STAGE_NAMES
from pipeline.core.errors import ExitCode, QuantpipeError
from pipeline.core.host import CPU_ISAS
from pipeline.cli.groups import GroupedCommand, int_list
from pipeline.core.logs import configure_logging, quiet_libraries
from pipeline.core.progress import Progress


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="quantpipe")
def cli() -> None:
    """Quantpipe: export, calibrate, quantize and verify transformers for deployment."""


@cli.command(cls=GroupedCommand)
@click.option("--config", "config_file", type=click.Path(dir_okay=False, path_type=Path),
              help="Build file (YAML or TOML). Flags given on the command line override it.")
@click.option("--target", type=click.Choice(["cpu", "trt"]), help="Deployment target.")
@click.option("--model", type=str, help="Local Hugging Face model folder, or a GGUF file (decoder LLMs). [default: bundled all-MiniLM-L6-v2]")
@click.option("--adapter", type=str, help="PEFT LoRA/QLoRA adapter folder, merged onto --model (its base) before "
              "export; an adapter folder given as --model names its own base.")
@click.option("--task", type=click.Choice(["feature-extraction", "text-classification", "token-classification",
                                           "text-generation"]),
              help="What the graph computes. [default: from the checkpoint]")
@click.option("--output", "-o", type=str, help="Build directory. [default: build/<model>-<target>]")
@click.option("--quant", type=click.Choice(["static", "dynamic", "rtn", "gptq", "awq", "checkpoint"]),
              help="INT8 scheme (encoders), or weight-only rtn/gptq/awq/checkpoint (decoder LLMs; checkpoint: a GPTQ/AWQ folder's own codes). [default: dynamic; rtn for decoder LLMs]")
@click.option("--weight-bits", type=click.Choice(["4", "8"]), callback=lambda c, p, v: int(v) if v else None,
              help="LLM weight-only bits (8: rtn only).")
@click.option("--block-size", type=int, help="LLM weight-only block size (power of two).")
@click.option("--lm-head", type=click.Choice(["fp32", "int8", "int4"]), help="LLM lm_head precision.")
@click.option("--vocab-block-size", type=int, help="LLM block size of the lm_head and token embedding (power of two). [default: 64]")
@click.option("--symmetric/--asymmetric", default=None, help="LLM weight-only blocks with or without zero points. [default: asymmetric]")
@click.option("--zero-point", type=click.Choice(["int", "float"]),
              help="LLM asymmetric 4-bit rtn: float block minimums (GGUF Q4_1 grid) or integer zero points.")
@click.option("--llm-graph", type=click.Choice(["auto", "export", "genai"]),
              help="LLM graph quantized: our export, or onnxruntime-genai's builder's fused graph (faster); auto: the "
                   "fused graph for rtn builds of llama, qwen2 and qwen3 checkpoints, the export otherwise. [default: auto]")
@click.option("--embeddings", type=click.Choice(["fp32", "int8", "int4"]),
              help="LLM token-embedding precision (int8 tied to an int8 lm_head shares its codes). [default: int8]")
@click.option("--max-perplexity-increase", type=float, help="LLM parity gate: relative perplexity increase. [default: 0.08]")
@click.option("--min-token-agreement", type=float, help="LLM parity gate: greedy token agreement. [default: not gated]")
@click.option("--per-channel/--per-tensor", default=None, help="Weight scales per output channel. [default: per-channel]")
@click.option("--cpu-isa", type=click.Choice(["auto", *CPU_ISAS]),
              help="The deployment CPU: decides the INT8 weight storage (avx2: uint8, exact u8u8 kernels). auto: this host's.")
@click.option("--exclude", multiple=True, help="Op type or node name to keep in FP32 (repeatable).")
@click.option("--format", "quant_format", type=click.Choice(["qdq", "qoperator"]),
              help="Static INT8 graph format.")
@click.option("--smoothquant/--no-smoothquant", default=None, help="SmoothQuant first (static or dynamic INT8; reads the calibration samples).")
@click.option("--smoothquant-alpha", type=float, help="SmoothQuant migration strength, 0..1.")
@click.option("--outlier-threshold", type=float,
              help="Dynamic INT8: move input channels past this many times the median channel's calibration maximum "
                   "into the weights first; 0: off. [default: 2.0]")
@click.option("--fallback", type=click.Choice(["off", "auto"]),
              help="auto: keep the most sensitive nodes in FP32 until --tolerable-loss holds.")
@click.option("--tolerable-loss", type=float, help="Fallback: allowed drop of the tuning metric.")
@click.option("--calib-source", type=str, help="Text (one sample per line), JSONL, CSV, Parquet, a save_to_disk folder or a folder of .txt files. [default: BBC News sentences]")
@click.option("--calib-samples", type=int, help="Calibration samples.")
@click.option("--heldout-samples", type=int, help="Held-out samples for parity.")
@click.option("--seed", type=int, help="Seed of the sample selection.")
@click.option("--batch-size", type=int, help="Samples per batch.")
@click.option("--max-length", type=int, help="Maximum tokens per sample.")
@click.option("--calib-format", type=click.Choice(["auto", "text", "jsonl", "csv", "parquet", "dataset", "directory"]),
              help="Kind of --calib-source. [default: auto, from the suffix or folder]")
@click.option("--text-field", type=str, help="JSONL/CSV/Parquet/dataset field holding the text.")
@click.option("--text-pair-field", type=str, help="Field holding the second text of a sentence pair.")
@click.option("--label-field", type=str, help="Field holding a label (for --stratify label).")
@click.option("--stratify", type=click.Choice(["label", "length"]), help="Stratified selection. [default: seeded random]")
@click.option("--padding", type=click.Choice(["bucket", "max_length"]),
              help="Pad each length-sorted batch to its longest sample, or all to --max-length.")
@click.option("--long-samples", type=click.Choice(["truncate", "error"]),
              help="Samples longer than --max-length: truncate or refuse.")
@click.option("--calib-method", type=click.Choice(["minmax", "percentile", "entropy"]),
              help="Activation ranges for static INT8.")
@click.option("--percentile", type=float, help="Percentile of --calib-method percentile.")
@click.option("--min-cosine", type=float, help="Parity gate: minimum mean cosine of the primary output.")
@click.option("--max-abs", type=float, help="Parity gate: maximum absolute error of the primary output.")
@click.option("--localize", type=click.Choice(["on-failure", "always", "never"]),
              help="Layer localization in the parity report.")
@click.option("--eval-file", type=str, help="Classifiers: labelled evaluation file (JSON lines or label<TAB>text).")
@click.option("--precision", type=click.Choice(["int8", "fp8", "fp16", "best"]),
              help="TensorRT precision (--target trt).")
@click.option("--require-engine", is_flag=True, default=None,
              help="--target trt: fail (exit 5) unless TensorRT is present to build the engine.")
@click.option("--opset", type=click.IntRange(17, 21), help="ONNX opset of the export.")
@click.option("--min-shapes", type=str, help="TensorRT profile minimum, as trtexec: input_ids:1x16,attention_mask:1x16.")
@click.option("--opt-shapes", type=str, help="TensorRT profile optimum (same spelling). [default: from calibration]")
@click.option("--max-shapes", type=str, help="TensorRT profile maximum (same spelling). [default: from calibration]")
@click.option("--json", "json_summary", is_flag=True, help="Print a machine-readable summary (JSON) on stdout.")
@click.option("--verbose", "-v", is_flag=True, help="Also print the libraries' own INFO log lines, in our format.")
@click.option("--log-file", type=click.Path(dir_okay=False, path_type=Path),
              help="Write every log line (progress and libraries, DEBUG and up) to this file.")
@click.option("--stop-after", type=click.Choice(STAGE_NAMES), help="Stop after this stage.")
@click.option("--force", is_flag=True, help="Run every stage again, ignoring the cache.")
@click.option("--print-config", is_flag=True, help="Print the effective configuration and exit.")
@click.option("--quiet", "-q", is_flag=True, help="Print nothing but errors (for CI).")
@click.option("--trust-remote-code", is_flag=True, default=None,
              help="Run Python code shipped in the model folder (auto_map). Only for folders you trust.")
@click.option("--lock-timeout", type=click.FloatRange(min=0), default=None,
              help="Seconds to wait for another build holding the build directory, then fail with exit 6 "
                   "(0: fail at once). [default: wait]")
def build(config_file: Optional[Path], stop_after: Optional[str], force: bool, print_config: bool,
          quiet: bool, lock_timeout: Optional[float] = None, json_summary: bool = False, verbose: bool = False,
          log_file: Optional[Path] = None, **flags: Any) -> None:
    """Export, optimize, calibrate, quantize and verify a model.

    \b
    Example:
      pipeline build --target cpu
      pipeline build --model ./my-bert --quant static --calib-samples 256 -o build/my-bert
      pipeline build --target trt --precision int8
      pipeline build --model ./base --adapter ./my-lora -o build/my-lora
    """
    from pipeline.api import build as build_api, resolve_config

    config = resolve_config(config_file, **{flag: flags.get(flag) for flag in (*FLAG_KEYS, *SHAPE_OPTIONS)})
    if print_config:  # the configuration the build would run with: the plan's, model and defaults resolved
        from pipeline.build.plan import plan_build

        plan = plan_build(config)
        effective = plan.config.to_dict()
        effective["model"]["path"] = str(plan.model.path)
        effective["model"]["task"] = plan.model.task.name
        click.echo(yaml.safe_dump(effective, sort_keys=False), nl=False)
        click.echo(f"# {plan.model.name}: {plan.model.architecture.model_type}, {plan.model.architecture.family}; "
                   f"stages: {' -> '.join(plan.stage_names)}")
        return
    configure_logging(verbose=verbose, log_file=log_file, quiet=quiet)
    progress = Progress(quiet=quiet)
    result = build_api(config, progress=progress, force=force, stop_after=stop_after, lock_timeout=lock_timeout)
    if json_summary:
        click.echo(json.dumps(build_summary(result), indent=2))
    result.raise_for_status()
    reused = [name for name, output in result.outputs.items() if output.reused]
    if not quiet and not json_summary:
        verdict = {True: "parity passed", None: f"stopped after {stop_after}"}[result.passed]
        click.echo(
            f"build finished in {result.wall_time_s:.1f}s ({verdict}); "
            f"reused {len(reused)}/{len(result.outputs)} stages from cache: {result.build_dir}"
        )
        bundle = result.outputs.get("bundle")
        if bundle is not None and bundle.facts["engine"].startswith("not built"):
            click.echo(f"TensorRT engine {bundle.facts['engine']}. The deployment bundle is ready in "
                       f"{result.build_dir / 'trt'}: build the engine there on a GPU host (build_engine.py or trtexec.sh).")


def build_summary(result: Any) -> dict[str, Any]:
    """`pipeline build --json`: what CI reads instead of parsing the log."""
    return {"build_dir": str(result.build_dir), "status": result.status, "passed": result.passed,
            "wall_time_s": round(result.wall_time_s, 3),
            "stages": {name: {"reused": output.reused, "wall_time_s": output.wall_time_s}
                       for name, output in result.outputs.items()},
            "artifacts": {name: str(path) for name, path in result.paths.items()},
            "failures": result.failures}



@cli.command()
@click.argument("artifacts", nargs=-1, required=True)
@click.option("--batch", "batches", default="1,8,32", show_default=True, help="Batch sizes, comma-separated.")
@click.option("--seq", "sequences", default="128", show_default=True, help="Sequence lengths, comma-separated.")
@click.option("--threads", default=2, show_default=True, help="ONNX Runtime intra-op threads, for every artifact.")
@click.option("--runs", default=30, show_default=True, help="Timed runs per artifact and grid point.")
@click.option("--warmup", default=5, show_default=True, help="Untimed runs first.")
@click.option("--tokenizer", type=click.Path(exists=True, file_okay=False),
              help="Tokenizer folder. [default: the build's tokenizer/, else the default model's]")
@click.option("--output", "-o", default="bench", show_default=True, help="Where bench.json, bench.md, bench.png go.")
@click.option("--quiet", "-q", is_flag=True, help="Print only the table.")
@click.option("--profile", is_flag=True, help="Also profile each artifact (ONNX Runtime's profiler, --runs passes "
              "at every grid point): kernel time by operator type, in profile.md and profile.json.")
def bench(artifacts: tuple[str, ...], batches: str, sequences: str, threads: int, runs: int, warmup: int,
          tokenizer: Optional[str], output: str, quiet: bool, profile: bool) -> None:
    """Latency (p50/p90/p99) and throughput of artifacts side by side, with their speed ratio.

    ARTIFACTS are .onnx files or build directories (a build directory stands for its
    model.fp32.onnx and model.onnx). The first artifact is the baseline of the ratios.

    \b
    Example:
      pipeline bench build/all-MiniLM-L6-v2-cpu --batch 1,8,32 --seq 128 --threads 2
      pipeline bench a.onnx b.onnx --batch 8
      pipeline bench build/all-MiniLM-L6-v2-cpu peer.onnx --batch 8 --profile   # where the time goes
    """
    from pipeline.bench import latency

    resolved = latency.resolve_artifacts(artifacts)
    quiet_libraries()
    from pipeline.models.registry import default_model_path, tokenizer_from

    if len(resolved) < 2:
        raise click.UsageError("give at least two artifacts (or one build directory) to compare")
    folder = Path(tokenizer) if tokenizer else next(
        (p for p in (Path(a).parent / "tokenizer" for a in map(str, (r.path for r in resolved))) if p.is_dir()),
        default_model_path(),
    )
    progress = Progress(quiet=quiet)
    text_tokenizer = tokenizer_from(folder)
    results = latency.benchmark(resolved, text_tokenizer, int_list(batches),
                                int_list(sequences), threads, runs, warmup, progress)
    baseline = resolved[0].label
    speedups = latency.ratios(results, baseline)
    latency.write_results(Path(output), results, speedups, baseline, threads)
    click.echo(latency.render_table(results, speedups, baseline), nl=False)
    for point, values in speedups.items():
        click.echo(f"{point}: " + ", ".join(f"{name} is {ratio:.2f}x as fast as {baseline}"
                                           for name, ratio in values.items()))
    if profile:
        from pipeline.bench.op_profile import profile_artifacts

        click.echo(profile_artifacts(resolved, text_tokenizer, int_list(batches), int_list(sequences),
                                     threads, runs, warmup, Path(output), progress), nl=False)


cli.add_command(verify)
cli.add_command(report)
cli.add_command(export_triton)
cli.add_command(serve)
cli.add_command(bench_serve)
cli.add_command(matrix)
cli.add_command(bench_fallback)
cli.add_command(bench_peers)
cli.add_command(architectures)
cli.add_command(bench_peers_llm)


@cli.command()
@click.argument("build_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("prompt")
@click.option("--max-new-tokens", default=64, show_default=True, help="Tokens to generate.")
@click.option("--temperature", default=0.0, show_default=True, help="0: greedy; above 0: sampling.")
@click.option("--top-k", default=0, show_default=True, help="Sampling: keep the k most likely tokens (0: all).")
@click.option("--seed", default=0, show_default=True, help="Sampling seed.")
@click.option("--fp32", is_flag=True, help="Use the build's FP32 graph (model.fp32.onnx) instead of model.onnx.")
@click.option("--threads", default=0, show_default=True, help="ONNX Runtime intra-op threads (0: all cores).")
@click.option("--chat/--raw", default=False, help="Wrap the prompt in the tokenizer's chat template.")
def generate(build_dir: Path, prompt: str, max_new_tokens: int, temperature: float, top_k: int, seed: int,
             fp32: bool, threads: int, chat: bool) -> None:
    """Generate text with a built decoder LLM and its KV cache, streaming tokens, with tokens per second.

    \b
    Example:
      pipeline generate build/SmolLM2-135M-Instruct-cpu "The government said" --max-new-tokens 48
    """
    quiet_libraries()
    from pipeline.cli.generate import run_generation

    run_generation(build_dir, prompt, max_new_tokens, temperature, top_k, seed, fp32, threads, chat)


@cli.command(cls=GroupedCommand, context_settings={"help_option_names": ["-h", "--help"]})
@click.pass_context
def calibrate(ctx: click.Context, **flags: Any) -> None:
    """Run the stages up to calibrate and write the calibration cache (samples, batches, ranges).

    \b
    Example:
      pipeline calibrate --calib-source data.jsonl --text-field sentence --calib-method percentile
    """
    ctx.invoke(build, stop_after="calibrate", **flags)


calibrate.params.extend(param for param in build.params if param.name != "stop_after")


def _exit_interrupted(message: str, code: int) -> None:
    """The finally blocks have run (staging folders removed); skip interpreter shutdown, which can
    crash (SIGSEGV) when the signal landed while torch or ONNX Runtime was half imported."""
    click.echo(message, err=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main() -> None:
    import signal

    from pipeline.core.progress import on_signal

    # SIGTERM (a cancelled CI job) unwinds like Ctrl-C, so staging folders are removed on the way out.
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        _exit_interrupted("interrupted", 130)
    except SystemExit as exc:
        if exc.code == 128 + signal.SIGTERM:
            _exit_interrupted("terminated", exc.code)
        raise
    except click.UsageError as exc:  # one line, like every other error, with where to read more
        command = exc.ctx.command_path if exc.ctx else "pipeline"
        click.echo(f"error: {exc.format_message()} (see '{command} --help')", err=True)
        sys.exit(ExitCode.BAD_INPUT)
    except click.ClickException as exc:
        exc.show()
        sys.exit(ExitCode.BAD_INPUT)
    except QuantpipeError as exc:
        click.echo(f"error: {exc.message}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        _exit_interrupted("interrupted", 130)
    except OSError as exc:  # a file or folder that cannot be read or written (permissions, disk full)
        where = f": {exc.filename}" if exc.filename else ""
        click.echo(f"error: {exc.strerror or exc}{where}", err=True)
        sys.exit(ExitCode.BAD_INPUT)
    sys.exit(ExitCode.OK)
