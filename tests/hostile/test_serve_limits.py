"""`pipeline serve` under hostile requests: each refused alone with 413/422, normal traffic unaffected."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")


@pytest.fixture(scope="module")
def server(tiny_build: Path) -> Iterator[str]:
    import uvicorn

    from pipeline.deploy.limits import RequestLimits
    from pipeline.deploy.serve import create_app

    app = create_app(tiny_build, threads=1, max_batch=32, max_wait_ms=20.0,
                     limits=RequestLimits(max_body_bytes=64_000, max_texts=8, max_chars=2_000))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    instance = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=instance.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not instance.started and time.monotonic() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    instance.should_exit = True
    thread.join(10)


def post(url: str, body: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(f"{url}/v1/predict", data=body, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        text = error.read()
        try:
            return error.code, json.loads(text or b"{}")
        except ValueError:  # a plain-text 500 from the server
            return error.code, {"detail": text.decode(errors="replace")}


LONE_SURROGATE = b'{"texts": ["fine text", "bad \\ud800 text"]}'

HOSTILE = {
    "body-too-large": (b'{"texts": ["' + b"a" * 70_000 + b'"]}', 413),
    "too-many-texts": (json.dumps({"texts": ["hi"] * 9}).encode(), 422),
    "text-too-long": (json.dumps({"text": "word " * 500}).encode(), 413),
    "lone-surrogate": (LONE_SURROGATE, 422),
    "empty-texts": (b'{"texts": []}', 422),
    "not-a-string": (b'{"texts": [5]}', 422),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_hostile_request_gets_its_status_and_a_message(server: str, case: str) -> None:
    body, status = HOSTILE[case]
    code, answer = post(server, body)
    assert code == status, answer
    assert answer.get("detail"), answer


def test_hostile_requests_mixed_into_normal_traffic_fail_no_normal_one(server: str) -> None:
    normal = [json.dumps({"texts": [f"request {i} about the weather", "and markets"]}).encode() for i in range(120)]
    hostile = [LONE_SURROGATE] * 40 + [HOSTILE["text-too-long"][0]] * 10
    mixed = [(body, True) for body in normal] + [(body, False) for body in hostile]
    mixed = [mixed[(i * 37) % len(mixed)] for i in range(len(mixed))]  # interleaved, deterministic
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda item: (post(server, item[0])[0], item[1]), mixed))
    normal_failures = sum(1 for code, is_normal in results if is_normal and code != 200)
    hostile_passed = sum(1 for code, is_normal in results if not is_normal and code == 200)
    assert (normal_failures, hostile_passed) == (0, 0), f"{normal_failures} of 120 normal requests failed"
    assert sum(1 for _, is_normal in results if is_normal) == 120
