"""`pipeline bench-peers-llm`: a decoder build against llama.cpp and onnxruntime-genai, in one run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import click


@click.command("bench-peers-llm")
@click.argument("builds", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--gguf", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="The GGUF file llama.cpp and onnxruntime-genai's builder read. [default: the build's source, "
                   "else the bundled SmolLM2]")
@click.option("--threads", default=2, show_default=True, help="Threads, for every peer.")
@click.option("--new-tokens", default=64, show_default=True, help="Greedy tokens generated after the prompt.")
@click.option("--rounds", default=3, show_default=True, help="Interleaved rounds (medians are reported).")
@click.option("--chunks", default=8, show_default=True, help="Held-out chunks of the build for perplexity.")
@click.option("--output", "-o", type=click.Path(file_okay=False, path_type=Path), default=Path("bench-peers-llm"),
              show_default=True, help="Where peers_llm.json and peers_llm.md go (and the genai build, made once).")
@click.option("--peer", "peers", multiple=True, type=click.Choice(["llama.cpp", "onnxruntime-genai"]),
              help="A peer to run (repeatable). [default: both]")
@click.option("--quiet", "-q", is_flag=True, help="Print only the table.")
def bench_peers_llm(builds: tuple[Path, ...], gguf: Optional[Path], threads: int, new_tokens: int, rounds: int, chunks: int,
                    output: Path, peers: tuple[str, ...], quiet: bool) -> None:
    """Decode and prefill tokens/s and perplexity: the builds, the first one's FP32 graph, llama.cpp and
    onnxruntime-genai.

    BUILDS are LLM build folders of one model (the first gives the FP32 graph, held-out text and GGUF file).

    \b
    Example:
      pipeline bench-peers-llm build/SmolLM2-135M-Instruct-cpu --threads 2 --new-tokens 64
      pipeline bench-peers-llm build/smollm2-export build/smollm2-genai --rounds 5
    """
    from pipeline.bench.peers_llm import PEERS, format_table, run_llm_peers
    from pipeline.core.logs import quiet_libraries

    quiet_libraries()
    output.mkdir(parents=True, exist_ok=True)
    say = (lambda message: None) if quiet else (lambda message: click.echo(message, err=True))
    result = run_llm_peers(threads, new_tokens, build=builds[0], gguf=gguf, rounds=rounds, chunks=chunks,
                           work_dir=output, on_progress=say, extra_builds=builds[1:],
                           peers=peers or PEERS)
    table = format_table(result)
    (output / "peers_llm.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    (output / "peers_llm.md").write_text(table + "\n", encoding="utf-8")
    click.echo(table)
