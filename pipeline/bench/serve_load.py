"""Bounded loopback load test of `pipeline serve`: requests per second, latency percentiles, errors.

Starts the server as a child process on 127.0.0.1 (a free port), waits for /health, sends
warm-up requests, then runs N clients for D seconds. Each client posts one real BBC News
sentence at a time over a kept-alive connection and counts any non-200 answer, any answer
without a result row, and any transport error as an error. The server is always stopped.
Only loopback is ever contacted; clients and duration are bounded (256, 600 s).

    python -m pipeline.bench.serve_load BUILD_DIR --clients 16 --duration 30
"""

from __future__ import annotations

import http.client
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

HOST = "127.0.0.1"
MAX_CLIENTS = 256
MAX_DURATION_S = 600.0
STARTUP_TIMEOUT_S = 180.0
REQUEST_TIMEOUT_S = 30.0


@dataclass
class ClientResult:
    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


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


def request(connection: http.client.HTTPConnection, method: str, path: str,
            body: Optional[dict[str, Any]] = None) -> tuple[int, Any]:
    payload = json.dumps(body).encode() if body is not None else None
    headers = {"content-type": "application/json"} if payload is not None else {}
    connection.request(method, path, body=payload, headers=headers)
    response = connection.getresponse()
    data = response.read()
    return response.status, json.loads(data) if data else None


def has_result(answer: Any) -> bool:
    rows = (answer or {}).get("embeddings") or (answer or {}).get("labels")
    return bool(rows) and len(rows) == 1


class ServerProcess:
    """`pipeline serve` as a child process on loopback; a context manager that always stops it."""

    def __init__(self, build_dir: Path, threads: int, max_batch: int, max_wait_ms: float) -> None:
        self.port = free_port()
        self.command = [sys.executable, "-m", "pipeline", "serve", str(build_dir), "--host", HOST,
                        "--port", str(self.port), "--threads", str(threads), "--max-batch", str(max_batch),
                        "--max-wait-ms", str(max_wait_ms)]
        self.process: Optional[subprocess.Popen[bytes]] = None

    def __enter__(self) -> "ServerProcess":
        self.process = subprocess.Popen(self.command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
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
                    return self
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


def _client(server: ServerProcess, texts: list[str], offset: int, stop_at: float, result: ClientResult) -> None:
    connection = server.connect()
    for index in itertools.count(offset):
        if time.perf_counter() >= stop_at:
            break
        started = time.perf_counter()
        try:
            status, answer = request(connection, "POST", "/v1/predict", {"text": texts[index % len(texts)]})
        except (OSError, http.client.HTTPException, json.JSONDecodeError) as exc:
            result.errors.append(f"{type(exc).__name__}: {exc}")
            connection.close()
            connection = server.connect()
            continue
        if status != 200 or not has_result(answer):
            result.errors.append(f"HTTP {status}: {str(answer)[:200]}")
            continue
        result.latencies.append(time.perf_counter() - started)
    connection.close()


def percentile(values: list[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def load_test(build_dir: Path, clients: int = 16, duration: float = 30.0, threads: int = 0, max_batch: int = 32,
              max_wait_ms: float = 5.0, warmup: int = 8) -> dict[str, Any]:
    if not 1 <= clients <= MAX_CLIENTS or not 0 < duration <= MAX_DURATION_S:
        raise ValueError(f"clients must be 1..{MAX_CLIENTS} and duration 0..{MAX_DURATION_S:.0f}s")
    if not (build_dir / "manifest.json").is_file() or not (build_dir / "model.onnx").is_file():
        from pipeline.core.errors import InputError

        raise InputError(f"{build_dir} holds no finished build (manifest.json and model.onnx)")
    texts = sentences()
    with ServerProcess(build_dir, threads, max_batch, max_wait_ms) as server:
        connection = server.connect()
        for text in texts[:warmup]:
            request(connection, "POST", "/v1/predict", {"text": text})
        connection.close()
        before = server.stats()
        results = [ClientResult() for _ in range(clients)]
        started = time.perf_counter()
        stop_at = started + duration
        workers = [threading.Thread(target=_client, args=(server, texts, i * 17, stop_at, results[i]), daemon=True)
                   for i in range(clients)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(timeout=duration + 2 * REQUEST_TIMEOUT_S)
        elapsed = time.perf_counter() - started
        after = server.stats()
    latencies = [latency for result in results for latency in result.latencies]
    errors = [error for result in results for error in result.errors]
    batches = after["batches"] - before["batches"]
    texts_run = after["texts"] - before["texts"]
    return {
        "clients": clients, "duration_s": round(elapsed, 2), "requests": len(latencies), "errors": len(errors),
        "first_errors": errors[:5], "requests_per_s": round(len(latencies) / elapsed, 1),
        "latency_ms": {name: round(1000 * percentile(latencies, q), 1)
                       for name, q in (("p50", 50), ("p90", 90), ("p99", 99), ("max", 100))},
        "server": {"batches": batches, "mean_batch": round(texts_run / batches, 2) if batches else 0.0,
                   "largest_batch": after["largest_batch"], "threads": threads, "max_batch": max_batch,
                   "max_wait_ms": max_wait_ms},
        "cpu_count": os.cpu_count(),
    }


def render(result: dict[str, Any]) -> str:
    latency, server = result["latency_ms"], result["server"]
    return (f"{result['clients']} clients, {result['duration_s']}s: {result['requests']} requests, "
            f"{result['errors']} errors, {result['requests_per_s']} req/s; latency p50 {latency['p50']} ms, "
            f"p90 {latency['p90']} ms, p99 {latency['p99']} ms, max {latency['max']} ms; "
            f"{server['batches']} batches, mean batch {server['mean_batch']}, largest {server['largest_batch']}\n")


def run_cli(build_dir: Path, clients: int, duration: float, threads: int, max_batch: int, max_wait_ms: float,
            output: Optional[Path]) -> None:
    import click

    from pipeline.core.errors import StageError

    try:
        result = load_test(build_dir, clients, duration, threads, max_batch, max_wait_ms)
    except (RuntimeError, OSError, http.client.HTTPException) as exc:
        raise StageError("bench-serve", f"{type(exc).__name__}: {exc}") from None
    click.echo(render(result), nl=False)
    if output is not None:
        output.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    if result["errors"]:
        raise StageError("bench-serve", f"{result['errors']} requests failed, first: {result['first_errors'][0]}")
