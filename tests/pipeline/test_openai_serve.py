"""`pipeline serve` answers the OpenAI Python client (embeddings, streamed completions) and Prometheus."""

from __future__ import annotations

import numpy as np
import pytest

import pipeline
from pipeline.bench.serve_load import HOST, ServerProcess, request

openai = pytest.importorskip("openai")


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def _client(server: ServerProcess):
    return openai.OpenAI(base_url=f"http://{HOST}:{server.port}/v1", api_key="unused", max_retries=0, timeout=60)


def test_openai_client_gets_the_builds_embeddings_and_metrics_count_them(default_build) -> None:
    texts = ["The central bank raised interest rates.", "The striker scored twice."]
    runner = pipeline.load(default_build.build_dir, threads=1)
    expected, alone = runner.encode(texts), runner.encode(texts[0])
    with ServerProcess(default_build.build_dir, threads=1, max_batch=8, max_wait_ms=1.0) as server:
        client = _client(server)
        answer = client.embeddings.create(model="all-MiniLM-L6-v2", input=texts)  # the client asks for base64
        floats = client.embeddings.create(model="all-MiniLM-L6-v2", input=texts[0], encoding_format="float")
        completion_status, _ = request(server.connect(), "POST", "/v1/completions", {"prompt": "hi"})
        connection = server.connect()
        connection.request("GET", "/metrics")
        metrics = connection.getresponse().read().decode()
    served = np.array([item.embedding for item in answer.data], dtype=np.float32)
    assert served.shape == (2, 384) and [item.index for item in answer.data] == [0, 1]
    # A lone text is what the loaded build computes for it; dynamic INT8 quantizes activations per batch, so
    # how the server grouped two texts moves them slightly (measured cosine 0.992 against a lone run).
    np.testing.assert_allclose(np.array([floats.data[0].embedding]), alone, atol=1e-5)
    assert _cosines(served, expected).min() > 0.98
    assert not np.allclose(served[0], served[1], atol=1e-3)
    assert answer.usage.prompt_tokens > 0
    assert completion_status == 404  # an embedding build has no completions
    assert 'quantpipe_requests_total{route="/v1/embeddings",status="200"} 2.0' in metrics
    assert "quantpipe_texts_total 3.0" in metrics


def test_openai_client_streams_a_completion_with_the_greedy_tokens_of_pipeline_generate(tiny_llm_build) -> None:
    prompt = "The government said on Tuesday that"
    expected = pipeline.load(tiny_llm_build.build_dir, threads=1).generate(prompt, max_new_tokens=8)
    with ServerProcess(tiny_llm_build.build_dir, threads=1, max_batch=8, max_wait_ms=1.0) as server:
        client = _client(server)
        stream = client.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0, stream=True)
        chunks = list(stream)
        whole = client.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0)
        connection = server.connect()
        connection.request("GET", "/metrics")
        metrics = connection.getresponse().read().decode()
    pieces = [chunk.choices[0].text for chunk in chunks]
    assert len([piece for piece in pieces if piece]) >= 2  # streamed token by token, not in one piece
    assert "".join(pieces) == expected == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")
    assert "quantpipe_generated_tokens_total 16.0" in metrics
