"""Decoder LLM peers, measured side by side: Quantpipe's 4-bit build (through `pipeline.load`, as users run
it), its FP32 graph, llama.cpp (`llama-cpp-python`) on the same GGUF file, and onnxruntime-genai's int4
build of the same weights (its model builder, default settings, run by its own generator).

Same host, same threads, greedy, `new_tokens` new tokens after the same real BBC News prompt (no early
stop at end-of-sequence), rounds interleaved so that machine noise reaches every peer alike; medians of
the rounds. Perplexity: the build's own held-out BBC News chunks (its manifest's calibration settings),
scored with the same token ids by every peer. A peer that does not import or build is a row with
`unavailable: reason`, never a crash.
"""

from __future__ import annotations

import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Protocol, Sequence

import numpy as np

from pipeline.core.errors import InputError
from pipeline.core.host import host_facts

PROMPT_TOKENS = 96  # at most: the export check's real BBC News sentence (34 tokens with SmolLM2's tokenizer)
GENAI_FOLDER = "onnxruntime-genai-int4"


@dataclass
class PeerRow:
    name: str
    decode_tokens_per_s: Optional[float] = None
    prefill_tokens_per_s: Optional[float] = None
    perplexity: Optional[float] = None
    perplexity_vs_fp32: Optional[float] = None  # relative change against Quantpipe's FP32 graph
    decode_rounds: list[float] = field(default_factory=list)
    first_tokens: list[int] = field(default_factory=list)
    unavailable: Optional[str] = None


class Peer(Protocol):
    name: str

    def generate(self, prompt: Sequence[int], new_tokens: int) -> tuple[list[int], float, float]:
        """Greedy tokens, prefill seconds, decode seconds (new_tokens - 1 steps after the prefill's token)."""

    def log_likelihood(self, chunk: np.ndarray) -> float:
        """Summed log-probability of chunk[1:] given its prefix."""

    def close(self) -> None: ...


def _greedy(step: Callable[[list[int]], np.ndarray], prompt: Sequence[int], new_tokens: int) -> tuple[list[int], float, float]:
    """step(ids to append) -> logits of the last position; the first call is the prefill."""
    started = time.perf_counter()
    logits = step(list(prompt))
    prefill = time.perf_counter() - started
    tokens = [int(np.argmax(logits))]
    started = time.perf_counter()
    while len(tokens) < new_tokens:
        tokens.append(int(np.argmax(step(tokens[-1:]))))
    return tokens, prefill, time.perf_counter() - started


class QuantpipePeer:
    """A build through the Python API (`pipeline.load(build)`: its manifest's session settings)."""

    def __init__(self, name: str, build: Path, threads: int, fp32: bool = False) -> None:
        from pipeline.deploy.runtime import open_build
        from pipeline.models.decoding import KVDecoder

        self.name = name
        self.runner = open_build(build, threads)
        if fp32:
            self.runner.decoder = KVDecoder(build / "model.fp32.onnx", threads)
        self.decoder = self.runner.decoder

    def generate(self, prompt: Sequence[int], new_tokens: int) -> tuple[list[int], float, float]:
        from pipeline.models.decoding import generate

        result = generate(self.decoder, prompt, new_tokens)
        return result.tokens, result.prefill_s, result.decode_s

    def log_likelihood(self, chunk: np.ndarray) -> float:
        from pipeline.models.decoding import next_token_log_likelihood

        return next_token_log_likelihood(self.decoder.logits(chunk[None, :].astype(np.int64))[0], chunk)

    def close(self) -> None:
        self.runner.close()


class LlamaCppPeer:
    """llama.cpp on the GGUF file itself; logits of every position kept for perplexity."""

    name = "llama.cpp (llama-cpp-python, same GGUF)"

    def __init__(self, gguf: Path, threads: int, context: int) -> None:
        from llama_cpp import Llama

        self.llm = Llama(model_path=str(gguf), n_threads=threads, n_threads_batch=threads, n_ctx=context,
                         n_batch=context, logits_all=True, verbose=False)

    def _step(self, ids: list[int]) -> np.ndarray:
        self.llm.eval(ids)
        return np.asarray(self.llm.scores[self.llm.n_tokens - 1])

    def generate(self, prompt: Sequence[int], new_tokens: int) -> tuple[list[int], float, float]:
        self.llm.reset()
        return _greedy(self._step, prompt, new_tokens)

    def log_likelihood(self, chunk: np.ndarray) -> float:
        from pipeline.models.decoding import next_token_log_likelihood

        self.llm.reset()
        self.llm.eval([int(t) for t in chunk])
        return next_token_log_likelihood(np.asarray(self.llm.scores[:len(chunk)]), chunk)

    def close(self) -> None:
        self.llm.close()


class GenaiPeer:
    """onnxruntime-genai's own generator on its builder's int4 graph; perplexity from that graph in ONNX Runtime
    (the generator hands back the last position's logits only)."""

    name = "onnxruntime-genai int4 (model builder)"

    def __init__(self, folder: Path, threads: int) -> None:
        import onnxruntime_genai as og

        from pipeline.models.decoding import KVDecoder

        config = og.Config(str(folder))
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {
            "intra_op_num_threads": threads, "inter_op_num_threads": 1}}}}))
        self.og, self.model = og, og.Model(config)
        self.graph = KVDecoder(folder / "model.onnx", threads)
        self.generator: Any = None

    def _step(self, ids: list[int]) -> np.ndarray:
        self.generator.append_tokens(ids)
        return np.asarray(self.generator.get_logits())[0, -1]

    def generate(self, prompt: Sequence[int], new_tokens: int) -> tuple[list[int], float, float]:
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(max_length=len(prompt) + new_tokens, do_sample=False)
        self.generator = self.og.Generator(self.model, params)
        try:
            return _greedy(self._step, prompt, new_tokens)
        finally:
            self.generator = None

    def log_likelihood(self, chunk: np.ndarray) -> float:
        from pipeline.models.decoding import next_token_log_likelihood

        return next_token_log_likelihood(self.graph.logits(chunk[None, :].astype(np.int64))[0], chunk)

    def close(self) -> None:
        self.model = None
        self.graph.session = None


def genai_int4_folder(gguf: Path, work: Path) -> Path:
    """onnxruntime-genai's int4 build of the GGUF's weights (its builder's defaults), made once under `work`."""
    from pipeline.models.loading import save_hf_folder

    folder = work / GENAI_FOLDER
    if (folder / "genai_config.json").is_file() and (folder / "model.onnx").is_file():
        return folder
    with tempfile.TemporaryDirectory(prefix="quantpipe-genai-", dir=work) as scratch:
        hf = Path(scratch) / "hf"
        save_hf_folder(gguf, hf)
        done = subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf),
                               "-o", str(folder), "-p", "int4", "-e", "cpu", "-c", str(Path(scratch) / "cache")],
                              capture_output=True, text=True, check=False)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"its model builder failed: {tail[0]}")
    return folder


def heldout_chunks(build: Path, tokenizer: Any, count: int) -> list[np.ndarray]:
    """The build's own held-out chunks: its manifest's calibration settings, selected and cut the same way."""
    from calibration.selection import select_samples
    from pipeline.build.manifest import read_manifest
    from pipeline.config import CalibrationConfig
    from pipeline.stages.calibrate import source_for
    from pipeline.stages.llm_calibrate import token_chunks

    settings = CalibrationConfig(**read_manifest(build)["config"]["calibration"])
    source = source_for(settings)
    _, heldout = select_samples(source, settings.samples, settings.heldout_samples, settings.seed, source.name, None)
    return token_chunks([sample.text for sample in heldout], tokenizer, settings.max_length)[:count]


def bench_prompt(tokenizer: Any) -> list[int]:
    from pipeline.stages.llm_export import probe_prompt

    ids = list(tokenizer(probe_prompt()).input_ids)
    return ids[:PROMPT_TOKENS]


PEERS = ("llama.cpp", "onnxruntime-genai")


def _open_peers(build: Path, extra_builds: Sequence[Path], gguf: Path, peers: Sequence[str], threads: int,
                work: Path, context: int, on_progress: Callable[[str], None]) -> tuple[list[Any], list[PeerRow]]:
    def ours(folder: Path) -> tuple[str, Callable[[], Any]]:
        name = f"quantpipe 4-bit {folder.name} (pipeline.load)"
        return name, lambda: QuantpipePeer(name, folder, threads)

    openers: list[tuple[str, Callable[[], Any]]] = [
        ours(build), *(ours(folder) for folder in extra_builds),
        ("quantpipe FP32 graph", lambda: QuantpipePeer("quantpipe FP32 graph", build, threads, fp32=True)),
    ]
    if "llama.cpp" in peers:
        openers.append((LlamaCppPeer.name, lambda: LlamaCppPeer(gguf, threads, context)))
    if "onnxruntime-genai" in peers:
        openers.append((GenaiPeer.name, lambda: GenaiPeer(genai_int4_folder(gguf, work), threads)))
    opened, missing = [], []
    for name, opener in openers:
        on_progress(f"opening {name}")
        try:
            opened.append(opener())
        except ImportError as exc:
            missing.append(PeerRow(name, unavailable=f"not installed ({exc.name or exc}): pip install 'quantpipe[peers]', "
                                                     "README 'pipeline bench-peers' for a faster llama.cpp build"))
        except (RuntimeError, OSError, ValueError) as exc:
            missing.append(PeerRow(name, unavailable=str(exc).splitlines()[0] if str(exc) else type(exc).__name__))
    return opened, missing


def round_order(items: Sequence[Any], turn: int) -> list[Any]:
    """Round `turn`'s order of the contenders: a shuffle seeded by the round (the same in every run), so that over
    the rounds each contender follows each of the others."""
    order = list(items)
    random.Random(turn).shuffle(order)
    return order


def run_llm_peers(threads: int = 2, new_tokens: int = 64, build: Optional[Path] = None, gguf: Optional[Path] = None,
                  rounds: int = 3, chunks: int = 8, work_dir: Optional[Path] = None,
                  on_progress: Callable[[str], None] = lambda message: None,
                  extra_builds: Sequence[Path] = (), peers: Sequence[str] = PEERS) -> dict[str, Any]:
    """Decode and prefill tokens/s and perplexity of every peer, in one run; rows in the order measured.
    `build` gives the FP32 graph, the held-out chunks and the GGUF; `extra_builds` are other builds of the
    same model measured beside it (e.g. --llm-graph export and genai); `peers`: which of PEERS to run."""
    from transformers import AutoTokenizer

    from pipeline.build.manifest import read_manifest
    from pipeline.models.loading import smollm2_gguf

    if build is None:
        raise InputError("give the LLM build to measure (pipeline build --task text-generation makes one)")
    for folder in (build, *extra_builds):
        if not (folder / "model.onnx").is_file() or not (folder / "tokenizer").is_dir():
            raise InputError(f"{folder} holds no finished LLM build (model.onnx and tokenizer/); run "
                             "`pipeline build --task text-generation` first")
    if new_tokens < 2 or rounds < 1 or threads < 1:
        raise InputError("new_tokens must be at least 2, rounds and threads at least 1")
    manifest = read_manifest(build)
    if gguf is None:
        source = Path(str(manifest.get("model", {}).get("path", "")))
        gguf = source if source.suffix == ".gguf" and source.is_file() else smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(str(build / "tokenizer"), trust_remote_code=False)
    prompt = bench_prompt(tokenizer)
    texts = heldout_chunks(build, tokenizer, chunks)
    context = max(len(prompt) + new_tokens, max(len(c) for c in texts)) + 8
    work = work_dir or build.parent / ".peers-llm"
    work.mkdir(parents=True, exist_ok=True)
    unknown = sorted(set(peers) - set(PEERS))
    if unknown:
        raise InputError(f"unknown peer {unknown[0]!r}; choose from {', '.join(PEERS)}")
    runners, missing = _open_peers(build, extra_builds, gguf, peers, threads, work, context, on_progress)
    rows = {peer.name: PeerRow(peer.name) for peer in runners}
    prefill: dict[str, list[float]] = {peer.name: [] for peer in runners}
    try:
        for peer in runners:  # warm-up: first-run allocations and thread pools
            peer.generate(prompt, 4)
        for index in range(rounds):
            on_progress(f"round {index + 1}/{rounds}: {new_tokens} new tokens after {len(prompt)} prompt tokens")
            # A runtime's threads keep spinning for a while after its turn and slow whoever comes next, so no
            # contender may always follow the same one: each round has its own order.
            for peer in round_order(runners, index):
                tokens, prefill_s, decode_s = peer.generate(prompt, new_tokens)
                rows[peer.name].decode_rounds.append((len(tokens) - 1) / decode_s)
                prefill[peer.name].append(len(prompt) / prefill_s)
                rows[peer.name].first_tokens = tokens[:16]
        for peer in runners:
            on_progress(f"perplexity of {peer.name} on {len(texts)} held-out chunks")
            total = sum(peer.log_likelihood(chunk) for chunk in texts)
            row = rows[peer.name]
            row.perplexity = float(np.exp(-total / sum(len(chunk) - 1 for chunk in texts)))
            row.decode_tokens_per_s = statistics.median(row.decode_rounds)
            row.prefill_tokens_per_s = statistics.median(prefill[peer.name])
    finally:
        for peer in runners:
            peer.close()
    reference = rows.get("quantpipe FP32 graph")
    for row in rows.values():
        if reference is not None and reference.perplexity and row.perplexity:
            row.perplexity_vs_fp32 = row.perplexity / reference.perplexity - 1
    host = host_facts()
    return {
        "host": {"cpu_model": host["cpu_model"], "isa": host["isa"], "isa_flags": host["isa_flags"],
                 "load_average": list(os.getloadavg()), "libraries": host["libraries"]},
        "settings": {"threads": threads, "new_tokens": new_tokens, "rounds": rounds, "prompt_tokens": len(prompt),
                     "perplexity_chunks": len(texts), "chunk_tokens": len(texts[0]) if texts else 0,
                     "build": str(build), "gguf": str(gguf),
                     # llama.cpp's OpenMP threads busy-wait by default; on a loaded host that collapses its speed
                     "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())},
        "rows": [dict(asdict(row), cpu_model=host["cpu_model"], isa=host["isa"])
                 for row in [*rows.values(), *missing]],
    }


def format_table(result: dict[str, Any]) -> str:
    """A Markdown table of the rows, with decode speed relative to llama.cpp's."""
    rows = result["rows"]
    base = next((row["decode_tokens_per_s"] for row in rows if row["name"].startswith("llama.cpp")
                 and row["decode_tokens_per_s"]), None)
    lines = ["| peer | decode tok/s | vs llama.cpp | prefill tok/s | perplexity | vs FP32 |",
             "|---|---:|---:|---:|---:|---:|"]
    for row in rows:
        if row["unavailable"]:
            lines.append(f"| {row['name']} | unavailable: {row['unavailable']} | | | | |")
            continue
        ratio = f"{row['decode_tokens_per_s'] / base:.2f}x" if base else "-"
        change = f"{row['perplexity_vs_fp32'] * 100:+.2f}%" if row["perplexity_vs_fp32"] is not None else "-"
        lines.append(f"| {row['name']} | {row['decode_tokens_per_s']:.1f} | {ratio} | {row['prefill_tokens_per_s']:.1f} "
                     f"| {row['perplexity']:.3f} | {change} |")
    host, settings = result["host"], result["settings"]
    lines.append(f"\n{host['cpu_model']} ({host['isa']}), {settings['threads']} threads, load average "
                 f"{host['load_average'][0]:.2f}, {settings['date']}; greedy, {settings['new_tokens']} new tokens "
                 f"after {settings['prompt_tokens']} prompt tokens, medians of {settings['rounds']} interleaved rounds; "
                 f"perplexity on {settings['perplexity_chunks']} held-out chunks of {settings['chunk_tokens']} tokens.")
    return "\n".join(lines)
