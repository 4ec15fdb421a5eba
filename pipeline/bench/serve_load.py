"""Bounded loopback load test of `pipeline serve`: requests and sentences per second, latency, errors.

Starts the server as a child process on 127.0.0.1 (a free port), waits for /health, sends
warm-up requests, then runs N clients for D seconds. Each client posts requests of 1..K real
sentences (BBC News, or out-of-domain tweets and review snippets; sizes drawn with a fixed seed)
over a kept-alive connection and counts any non-200 answer, any answer without one row per
sentence, and any transport error as an error. The server is always stopped. Only loopback is
ever contacted; clients and duration are bounded (256, 600 s).

`compare_padding` runs the same load against two servers, `--padding longest` and `--padding
max_length`, started side by side and loaded in turn: blocks of a few seconds in the order A B, B A,
A B, ... (as `pipeline.bench.latency.timed_blocks` takes turns between sessions), so that load on a
shared host hits both alike; the first request of each block, while the other server's threads
settle, is not counted.
"""

from __future__ import annotations

import http.client
import itertools
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from pipeline.deploy.serve import PADDINGS

HOST = "127.0.0.1"
MAX_CLIENTS = 256
MAX_DURATION_S = 600.0
STARTUP_TIMEOUT_S = 180.0
REQUEST_TIMEOUT_S = 30.0
SOURCES = ("bbc", "out-of-domain")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def sentences(count: int = 256) -> list[str]:
    """Real text: the first distinct BBC News sentences of the default calibration source."""
    from calibration.sources import default_source

    seen: dict[str, None] = {}
    for sample in default_source():
        seen.setdefault(sample.text, None)
        if len(seen) >= count:
            break
    return list(seen)


def load_sentences(source: str, count: int = 256) -> list[str]:
    if source == "bbc":
        return sentences(count)
    if source == "out-of-domain":
        from pipeline.bench.peers import out_of_domain_sentences

        return out_of_domain_sentences(count)
    raise ValueError(f"sentences must be one of {', '.join(SOURCES)}, got {source!r}")


def request_bodies(texts: list[str], per_request: int, count: int = 512, seed: int = 0) -> list[list[str]]:
    """`count` requests of 1..per_request consecutive sentences each (sizes seeded), cycling over `texts`."""
    rng = random.Random(seed)
    bodies, cursor = [], 0
    for _ in range(count):
        size = rng.randint(1, per_request)
        bodies.append([texts[(cursor + i) % len(texts)] for i in range(size)])
        cursor += size
    return bodies


@dataclass(frozen=True)
class LoadSpec:
    """What the clients send: `clients` threads for `duration` seconds of requests of 1..texts_per_request."""

    clients: int = 16
    duration: float = 30.0
    source: str = "bbc"
    texts_per_request: int = 8
    seed: int = 0

    def check(self) -> None:
        if not 1 <= self.clients <= MAX_CLIENTS or not 0 < self.duration <= MAX_DURATION_S:
            raise ValueError(f"clients must be 1..{MAX_CLIENTS} and duration 0..{MAX_DURATION_S:.0f}s")
        if self.source not in SOURCES or not 1 <= self.texts_per_request <= 64:
            raise ValueError(f"sentences must be one of {', '.join(SOURCES)} and texts per request 1..64")

    def bodies(self) -> list[list[str]]:
        return request_bodies(load_sentences(self.source), self.texts_per_request, seed=self.seed)


def request(connection: http.client.HTTPConnection, method: str, path: str,
            body: Optional[dict[str, Any]] = None) -> tuple[int, Any]:
    payload = json.dumps(body).encode() if body is not None else None
    headers = {"content-type": "application/json"} if payload is not None else {}
    connection.request(method, path, body=payload, headers=headers)
    response = connection.getresponse()
    data = response.read()
    return response.status, json.loads(data) if data else None


def has_result(answer: Any, count: int = 1) -> bool:
    rows = (answer or {}).get("embeddings") or (answer or {}).get("labels")
    return bool(rows) and len(rows) == count


class ServerProcess:
    """`pipeline serve` as a child process on loopback; a context manager that always stops it."""

    def __init__(self, build_dir: Path, threads: int, max_batch: int, max_wait_ms: float,
                 padding: str = "longest") -> None:
        self.port = free_port()
        self.command = [sys.executable, "-m", "pipeline", "serve", str(build_dir), "--host", HOST,
                        "--port", str(self.port), "--threads", str(threads), "--max-batch", str(max_batch),
                        "--max-wait-ms", str(max_wait_ms), "--padding", padding]
        self.process: Optional[subprocess.Popen[bytes]] = None

    def __enter__(self) -> "ServerProcess":
        self.start()
        self.wait_ready()
        return self

    def start(self) -> "ServerProcess":
        """Launch the process without waiting (servers started together load their models in parallel)."""
        self.process = subprocess.Popen(self.command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        return self

    def wait_ready(self) -> None:
        assert self.process is not None, "ServerProcess.start() was not called"
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                stderr = self.process.stderr.read().decode(errors="replace") if self.process.stderr else ""
                raise RuntimeError(f"the server exited with code {self.process.returncode}: {stderr.strip()[-500:]}")
            try:
                connection = self.connect()
                status, _ = request(connection, "GET", "/health")
                connection.close()
                if status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        self.__exit__(None, None, None)
        raise RuntimeError(f"the server did not answer /health within {STARTUP_TIMEOUT_S:.0f}s")

    def connect(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(HOST, self.port, timeout=REQUEST_TIMEOUT_S)

    def stats(self) -> dict[str, Any]:
        """The server's batch counters, on a fresh connection (an idle kept-alive one times out)."""
        connection = self.connect()
        try:
            status, answer = request(connection, "GET", "/v1/stats")
        finally:
            connection.close()
        if status != 200:
            raise RuntimeError(f"GET /v1/stats answered HTTP {status}")
        return dict(answer)

    def __exit__(self, *exc: object) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=15)


@dataclass
class ClientResult:
    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    sentences: int = 0


def _client(server: ServerProcess, bodies: list[list[str]], offset: int, stop_at: float, result: ClientResult) -> None:
    connection = server.connect()
    for index in itertools.count(offset):
        if time.perf_counter() >= stop_at:
            break
        body = bodies[index % len(bodies)]
        started = time.perf_counter()
        try:
            status, answer = request(connection, "POST", "/v1/predict", {"texts": body})
        except (OSError, http.client.HTTPException, json.JSONDecodeError) as exc:
            result.errors.append(f"{type(exc).__name__}: {exc}")
            connection.close()
            connection = server.connect()
            continue
        if status != 200 or not has_result(answer, len(body)):
            result.errors.append(f"HTTP {status}: {str(answer)[:200]}")
            continue
        result.latencies.append(time.perf_counter() - started)
        result.sentences += len(body)
    connection.close()


def percentile(values: list[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


@dataclass
class Tally:
    """One server's load, summed over its blocks: client results, seconds, and its batch counters."""

    results: list[ClientResult] = field(default_factory=list)
    seconds: float = 0.0
    batches: int = 0
    texts: int = 0
    largest_batch: int = 0

    def block(self, server: ServerProcess, bodies: list[list[str]], spec: LoadSpec, seconds: float,
              offset: int) -> None:
        """`seconds` of load from spec.clients threads; client i starts at request offset + 17 i."""
        before = server.stats()
        results = [ClientResult() for _ in range(spec.clients)]
        started = time.perf_counter()
        workers = [threading.Thread(target=_client, args=(server, bodies, offset + i * 17, started + seconds,
                                                          results[i]), daemon=True) for i in range(spec.clients)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(timeout=seconds + 2 * REQUEST_TIMEOUT_S)
        self.seconds += time.perf_counter() - started
        after = server.stats()
        self.results += results
        self.batches += after["batches"] - before["batches"]
        self.texts += after["texts"] - before["texts"]
        self.largest_batch = max(self.largest_batch, after["largest_batch"])

    def summary(self, spec: LoadSpec) -> dict[str, Any]:
        latencies = [latency for result in self.results for latency in result.latencies]
        errors = [error for result in self.results for error in result.errors]
        sentences_run = sum(result.sentences for result in self.results)
        return {
            "clients": spec.clients, "duration_s": round(self.seconds, 2), "requests": len(latencies),
            "sentences": sentences_run, "errors": len(errors), "first_errors": errors[:5],
            "requests_per_s": round(len(latencies) / self.seconds, 1),
            "sentences_per_s": round(sentences_run / self.seconds, 1),
            "latency_ms": {name: round(1000 * percentile(latencies, q), 1)
                           for name, q in (("p50", 50), ("p90", 90), ("p99", 99), ("max", 100))},
            "server": {"batches": self.batches, "texts": self.texts, "largest_batch": self.largest_batch,
                       "mean_batch": round(self.texts / self.batches, 2) if self.batches else 0.0},
        }


def _check_build(build_dir: Path) -> None:
    if not (build_dir / "manifest.json").is_file() or not (build_dir / "model.onnx").is_file():
        from pipeline.core.errors import InputError

        raise InputError(f"{build_dir} holds no finished build (manifest.json and model.onnx)")


def _warm(server: ServerProcess, bodies: list[list[str]], count: int) -> None:
    connection = server.connect()
    for body in bodies[:count]:
        request(connection, "POST", "/v1/predict", {"texts": body})
    connection.close()


def _setting(spec: LoadSpec, threads: int, max_batch: int, max_wait_ms: float) -> dict[str, Any]:
    from pipeline.core.host import host_facts

    return {"sentence_source": spec.source, "texts_per_request": spec.texts_per_request, "seed": spec.seed,
            "threads": threads, "max_batch": max_batch, "max_wait_ms": max_wait_ms, "cpu_count": os.cpu_count(),
            "load_average": [round(value, 2) for value in os.getloadavg()], "host": host_facts()}


def load_test(build_dir: Path, spec: LoadSpec = LoadSpec(), threads: int = 0, max_batch: int = 32,
              max_wait_ms: float = 5.0, padding: str = "longest", warmup: int = 8) -> dict[str, Any]:
    spec.check()
    _check_build(build_dir)
    bodies = spec.bodies()
    tally = Tally()
    with ServerProcess(build_dir, threads, max_batch, max_wait_ms, padding) as server:
        _warm(server, bodies, warmup)
        tally.block(server, bodies, spec, spec.duration, 0)
    result = tally.summary(spec)
    result["server"]["padding"] = padding
    return {**result, **_setting(spec, threads, max_batch, max_wait_ms)}


def compare_padding(build_dir: Path, spec: LoadSpec = LoadSpec(), threads: int = 0, max_batch: int = 32,
                    max_wait_ms: float = 5.0, block_seconds: float = 3.0, warmup: int = 8) -> dict[str, Any]:
    """The same load on a `--padding longest` and a `--padding max_length` server, spec.duration seconds each,
    in blocks that take turns; `ratio` is longest's sentences/s over max_length's."""
    from contextlib import ExitStack

    spec.check()
    _check_build(build_dir)
    bodies = spec.bodies()
    blocks = max(1, round(spec.duration / block_seconds))
    tallies = {padding: Tally() for padding in PADDINGS}
    with ExitStack() as stack:
        servers = {}
        for padding in PADDINGS:
            servers[padding] = ServerProcess(build_dir, threads, max_batch, max_wait_ms, padding).start()
            stack.callback(servers[padding].__exit__, None, None, None)
        for server in servers.values():
            server.wait_ready()
            _warm(server, bodies, warmup)
        order = list(PADDINGS)
        for number in range(blocks):
            for padding in order:
                _warm(servers[padding], bodies[number:], 1)  # untimed: the other server's threads settle
                tallies[padding].block(servers[padding], bodies, spec, spec.duration / blocks, number * 7)
            order.reverse()
    summaries = {padding: tally.summary(spec) for padding, tally in tallies.items()}
    longest, padded = summaries["longest"]["sentences_per_s"], summaries["max_length"]["sentences_per_s"]
    return {"compare_padding": True, "blocks_per_server": blocks, "block_s": round(spec.duration / blocks, 2),
            **summaries, "ratio_sentences_per_s": round(longest / padded, 2) if padded else None,
            **_setting(spec, threads, max_batch, max_wait_ms)}


def render(result: dict[str, Any]) -> str:
    latency, server = result["latency_ms"], result["server"]
    return (f"{result['clients']} clients, {result['duration_s']}s: {result['requests']} requests "
            f"({result['sentences']} sentences), {result['errors']} errors, {result['requests_per_s']} req/s, "
            f"{result['sentences_per_s']} sentences/s; latency p50 {latency['p50']} ms, "
            f"p90 {latency['p90']} ms, p99 {latency['p99']} ms, max {latency['max']} ms; "
            f"{server['batches']} batches, mean batch {server['mean_batch']}, largest {server['largest_batch']}\n")


def render_comparison(result: dict[str, Any]) -> str:
    host = result["host"]
    lines = [(f"{result['sentence_source']} sentences, 1..{result['texts_per_request']} per request, "
              f"{result['blocks_per_server']} blocks of {result['block_s']}s per server, taking turns; "
              f"{host['cpu_model']} ({host['isa']}), load average {result['load_average'][0]}")]
    for padding in PADDINGS:
        lines.append(f"--padding {padding}: " + render(result[padding]).rstrip("\n"))
    lines.append(f"length batching / padding to max_length: {result['ratio_sentences_per_s']}x sentences/s")
    return "\n".join(lines) + "\n"


def run_cli(build_dir: Path, spec: LoadSpec, threads: int, max_batch: int, max_wait_ms: float, padding: str,
            compare: bool, block_seconds: float, output: Optional[Path]) -> None:
    import click

    from pipeline.core.errors import InputError, StageError

    try:
        if compare:
            result = compare_padding(build_dir, spec, threads, max_batch, max_wait_ms, block_seconds)
            runs = [result[padding] for padding in PADDINGS]
            click.echo(render_comparison(result), nl=False)
        else:
            result = load_test(build_dir, spec, threads, max_batch, max_wait_ms, padding)
            runs = [result]
            click.echo(render(result), nl=False)
    except ValueError as exc:
        raise InputError(str(exc)) from None
    except (RuntimeError, OSError, http.client.HTTPException) as exc:
        raise StageError("bench-serve", f"{type(exc).__name__}: {exc}") from None
    if output is not None:
        output.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    failed = [run for run in runs if run["errors"]]
    if failed:
        raise StageError("bench-serve", f"{sum(r['errors'] for r in failed)} requests failed, "
                                        f"first: {failed[0]['first_errors'][0]}")
