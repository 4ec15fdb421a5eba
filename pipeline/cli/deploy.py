"""Deployment commands: `pipeline export-triton`, `pipeline serve`, `pipeline bench-serve`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import click

BUILD_DIR = click.Path(exists=True, file_okay=False, path_type=Path)
PADDING = click.Choice(["longest", "max_length"])  # pipeline.deploy.serve.PADDINGS (not imported: CLI start-up)


@click.command("export-triton")
@click.argument("build_dir", type=BUILD_DIR)
@click.argument("repo_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--name", "model_name", help="Model name in the repository. [default: the build's model name]")
@click.option("--backend", type=click.Choice(["auto", "onnxruntime", "tensorrt"]), default="auto", show_default=True,
              help="auto: onnxruntime for CPU builds, tensorrt for TensorRT builds (refused without an engine).")
@click.option("--max-batch-size", type=int,
              help="Triton max_batch_size. [default: the TensorRT profile's largest batch, else 32]")
@click.option("--instances", type=click.IntRange(min=1), default=1, show_default=True, help="Model instances.")
@click.option("--threads", "--intra-op-threads", "intra_op_threads", type=click.IntRange(min=0), default=0, show_default=True,
              help="ONNX Runtime intra-op threads per instance (0: one per core).")
@click.option("--inter-op-threads", type=click.IntRange(min=0), default=1, show_default=True,
              help="ONNX Runtime inter-op threads per instance.")
@click.option("--max-queue-delay-us", type=click.IntRange(min=0), default=1000, show_default=True,
              help="Dynamic batching: longest wait to fill a batch, in microseconds.")
@click.option("--with-tokenizer", is_flag=True,
              help="Add a Python-backend tokenizer and an ensemble <name>_text that takes text.")
@click.option("--outputs", "ensemble_outputs", multiple=True,
              help="Output the text ensemble returns (repeatable), e.g. --outputs sentence_embedding. "
                   "[default: every output of the graph]")
def export_triton(build_dir: Path, repo_dir: Path, model_name: Optional[str], backend: str,
                  max_batch_size: Optional[int], instances: int, intra_op_threads: int, inter_op_threads: int,
                  max_queue_delay_us: int, with_tokenizer: bool, ensemble_outputs: tuple[str, ...] = ()) -> None:
    """Write a Triton Inference Server model repository for a finished build.

    \b
    Example:
      pipeline export-triton build/all-MiniLM-L6-v2-cpu triton-repo --with-tokenizer
      tritonserver --model-repository triton-repo
    """
    from pipeline.build.manifest import read_manifest
    from pipeline.deploy.triton import export_triton as export

    if model_name is None:
        manifest = read_manifest(build_dir) if (build_dir / "manifest.json").is_file() else {}
        model_name = manifest.get("model", {}).get("name", build_dir.name).replace("/", "_")
    written = export(build_dir, repo_dir, model_name, backend, max_batch_size, instances, intra_op_threads,
                     inter_op_threads, max_queue_delay_us, with_tokenizer, list(ensemble_outputs) or None)
    click.echo(f"wrote {', '.join(written)} to {repo_dir}")


@click.command()
@click.argument("build_dir", type=BUILD_DIR)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option("--threads", type=click.IntRange(min=0), default=0, show_default=True,
              help="ONNX Runtime intra-op threads (0: one per core).")
@click.option("--max-batch-size", "--max-batch", "max_batch", type=click.IntRange(min=1), default=32, show_default=True,
              help="Most texts run in one batch.")
@click.option("--max-wait-ms", type=click.FloatRange(min=0), default=5.0, show_default=True,
              help="Longest wait for more requests before a batch runs.")
@click.option("--max-body-bytes", type=click.IntRange(min=1), default=1 << 20, show_default=True,
              help="Largest request body (413 beyond).")
@click.option("--max-texts", type=click.IntRange(min=1), default=64, show_default=True,
              help="Most texts in one request (422 beyond).")
@click.option("--max-chars", type=click.IntRange(min=1), default=20_000, show_default=True,
              help="Most characters in one text (413 beyond).")
@click.option("--padding", type=PADDING, default="longest", show_default=True,
              help="longest: texts of similar length run together, padded to their longest; max_length: every "
                   "batch padded to the build's max_length (what a naive deployment does; for comparison).")
def serve(build_dir: Path, host: str, port: int, threads: int, max_batch: int, max_wait_ms: float,
          max_body_bytes: int, max_texts: int, max_chars: int, padding: str = "longest") -> None:
    """Serve a CPU build over HTTP: POST /v1/predict {"texts": [...]}, OpenAI's POST /v1/embeddings (embedding
    builds) and POST /v1/completions (LLM builds, streaming), GET /metrics (Prometheus), /health, /v1/stats.

    \b
    Example:
      pipeline serve build/all-MiniLM-L6-v2-cpu --port 8000
      curl -s localhost:8000/v1/predict -H 'content-type: application/json' -d '{"text": "hello"}'
    """
    from pipeline.core.logs import quiet_libraries
    from pipeline.deploy.limits import RequestLimits
    from pipeline.deploy.serve import serve as run

    quiet_libraries()
    run(build_dir, host, port, threads, max_batch, max_wait_ms, RequestLimits(max_body_bytes, max_texts, max_chars),
        padding)


@click.command("bench-serve")
@click.argument("build_dir", type=BUILD_DIR)
@click.option("--clients", type=click.IntRange(1, 256), default=16, show_default=True, help="Concurrent clients.")
@click.option("--duration", type=click.FloatRange(0.5, 600), default=30.0, show_default=True, help="Seconds of load.")
@click.option("--threads", type=click.IntRange(min=0), default=0, show_default=True,
              help="Server: ONNX Runtime intra-op threads (0: one per core).")
@click.option("--max-batch-size", "--max-batch", "max_batch", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--max-wait-ms", type=click.FloatRange(min=0), default=5.0, show_default=True)
@click.option("--sentences", "source", type=click.Choice(["bbc", "out-of-domain"]), default="bbc", show_default=True,
              help="Real text sent: BBC News sentences, or tweets and Amazon review snippets.")
@click.option("--texts-per-request", type=click.IntRange(1, 64), default=8, show_default=True,
              help="Each request carries 1..N sentences (sizes drawn with a fixed seed).")
@click.option("--padding", type=PADDING, default="longest", show_default=True,
              help="The server's --padding.")
@click.option("--compare-padding", is_flag=True,
              help="Run the same load against a --padding longest and a --padding max_length server, in "
                   "alternating blocks of --block-seconds, and print the ratio of sentences/s.")
@click.option("--block-seconds", type=click.FloatRange(0.2, 60), default=3.0, show_default=True,
              help="With --compare-padding: length of one block of load on one server.")
@click.option("--output", "-o", type=click.Path(dir_okay=False, path_type=Path), help="Also write the result as JSON.")
def bench_serve(build_dir: Path, clients: int, duration: float, threads: int, max_batch: int, max_wait_ms: float,
                source: str, texts_per_request: int, padding: str, compare_padding: bool, block_seconds: float,
                output: Optional[Path]) -> None:
    """Load-test `pipeline serve` on loopback: requests and sentences per second, p50/p99 latency, errors
    (exit 3 if any request failed).

    \b
    Example:
      pipeline bench-serve build/all-MiniLM-L6-v2-cpu --clients 16 --duration 30
      pipeline bench-serve build/all-MiniLM-L6-v2-cpu --sentences out-of-domain --compare-padding --duration 60
    """
    from pipeline.bench.serve_load import LoadSpec, run_cli

    spec = LoadSpec(clients, duration, source, texts_per_request)
    run_cli(build_dir, spec, threads, max_batch, max_wait_ms, padding, compare_padding, block_seconds, output)
