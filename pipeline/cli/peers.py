"""`pipeline bench-peers`: a build against the tools a user would pick instead, in one run on this host."""

from __future__ import annotations

from pathlib import Path

import click

from pipeline.cli.groups import int_list
from pipeline.core.progress import Progress


@click.command("bench-peers")
@click.argument("build_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("other_builds", nargs=-1, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--batch", "batches", default="1,8,32", show_default=True, help="Batch sizes, comma-separated.")
@click.option("--seq", "sequence", default=128, show_default=True, help="Tokens per row for the speed runs.")
@click.option("--threads", default=2, show_default=True, help="Threads for every contender.")
@click.option("--runs", default=20, show_default=True, help="Timed runs per contender and batch size.")
@click.option("--warmup", default=3, show_default=True, help="Untimed runs first.")
@click.option("--sentences", default=1000, show_default=True,
              help="Out-of-domain sentences (tweets, product reviews) for the cosine against FP32.")
@click.option("--peers", default="ort-by-hand,openvino-nncf", show_default=True,
              help="Peers to make and run, comma-separated.")
@click.option("--output", "-o", default="bench/peers.json", show_default=True, type=click.Path(path_type=Path),
              help="Where the JSON goes.")
@click.option("--quiet", "-q", is_flag=True, help="Print only the table.")
def bench_peers(build_dir: Path, other_builds: tuple[Path, ...], batches: str, sequence: int, threads: int,
                runs: int, warmup: int, sentences: int, peers: str, output: Path, quiet: bool) -> None:
    """Speed and out-of-domain accuracy of a CPU embedding build beside its FP32 graph, ONNX Runtime by hand
    (transformer optimizer + quantize_dynamic per channel) and OpenVINO + NNCF INT8, all made from the build's
    model folder on this host. OTHER_BUILDS (builds of the same model with other settings) run beside them. A peer that is not installed is reported as unavailable (pip install
    quantpipe[peers]).

    \b
    Example:
      pipeline bench-peers build/all-MiniLM-L6-v2-cpu --batch 1,8,32 --threads 2 -o bench/peers.json
      pipeline bench-peers build/all-MiniLM-L6-v2-cpu build/minilm-smooth --peers openvino-nncf
    """
    from pipeline.bench.peers import write_json
    from pipeline.bench.peers_encoder import PEERS, run_encoder_peers
    from pipeline.core.logs import quiet_libraries

    chosen = [name.strip() for name in peers.split(",") if name.strip()]
    unknown = sorted(set(chosen) - set(PEERS))
    if unknown:
        raise click.BadParameter(f"unknown peer {', '.join(unknown)} (known: {', '.join(PEERS)})", param_hint="--peers")
    quiet_libraries()
    payload = run_encoder_peers(build_dir, threads, int_list(batches), sequence, runs, warmup, sentences, chosen,
                                Progress(quiet=quiet), other_builds)
    write_json(output, payload)
    click.echo(payload["table"], nl=False)
    lead = payload["lead"]
    if lead:
        click.echo(f"quantpipe is {lead['speedup']:.2f}x as fast as {lead['fastest_peer']} at {lead['shape']} "
                   f"(cosine {lead['cosine']:.4f} against {lead['peer_cosine']:.4f}); JSON: {output}")
