"""Serving APIs people already call: OpenAI-compatible `POST /v1/embeddings` (embedding builds) and
`POST /v1/completions` (LLM builds, streamed as server-sent events), and Prometheus `GET /metrics`.

The OpenAI client asks for base64 embeddings unless told otherwise (little-endian float32 bytes), so both
encodings are answered. A completion decodes with the build's KV-cache graph and the session settings
recorded in its manifest (pipeline/deploy/runtime.py), like `pipeline generate`.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from pathlib import Path
from typing import Any, AsyncIterator, Literal, Optional, Union

import numpy as np
from pydantic import BaseModel, Field

MAX_COMPLETION_TOKENS = 512


class EmbeddingRequest(BaseModel):
    input: Union[str, list[str]]
    model: Optional[str] = None
    encoding_format: Literal["float", "base64"] = "float"
    user: Optional[str] = None


class CompletionRequest(BaseModel):
    prompt: str
    model: Optional[str] = None
    max_tokens: int = Field(16, ge=1, le=MAX_COMPLETION_TOKENS)
    temperature: float = Field(1.0, ge=0.0, le=2.0)  # OpenAI's default; 0 is greedy, like `pipeline generate`
    top_k: int = Field(0, ge=0)
    seed: Optional[int] = None
    stream: bool = False
    user: Optional[str] = None


class Metrics:
    """Prometheus metrics of one app, in its own registry (several apps in a process do not collide)."""

    def __init__(self, task: str) -> None:
        try:
            from prometheus_client import CollectorRegistry, Counter, Histogram, Info
        except ImportError:
            from pipeline.core.errors import MissingDependencyError

            raise MissingDependencyError("serving needs prometheus-client: pip install 'quantpipe[serve]'") from None

        self.registry = CollectorRegistry()
        self.requests = Counter("quantpipe_requests", "HTTP requests answered", ["route", "status"],
                                registry=self.registry)
        self.latency = Histogram("quantpipe_request_seconds", "Time to answer a request", ["route"],
                                 registry=self.registry)
        self.texts = Counter("quantpipe_texts", "Texts embedded or classified", registry=self.registry)
        self.tokens = Counter("quantpipe_generated_tokens", "Tokens generated", registry=self.registry)
        Info("quantpipe_build", "The build being served", registry=self.registry).info({"task": task})

    def observe(self, route: str, status: int, started: float) -> None:
        self.requests.labels(route, str(status)).inc()
        self.latency.labels(route).observe(time.perf_counter() - started)

    def exposition(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def add_metrics_route(app: Any, metrics: Metrics) -> None:
    from fastapi import Request, Response

    @app.middleware("http")
    async def count(request: Request, call_next: Any) -> Any:
        started = time.perf_counter()
        response = await call_next(request)
        if request.url.path != "/metrics":
            metrics.observe(request.url.path, response.status_code, started)
        return response

    @app.get("/metrics")
    async def exposition() -> Response:
        body, content_type = metrics.exposition()
        return Response(body, media_type=content_type)


def add_embedding_routes(app: Any, model: Any, batcher: Any, metrics: Metrics, model_name: str,
                         max_texts: int) -> None:
    from fastapi import HTTPException
    from fastapi.responses import JSONResponse

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest) -> Any:
        if model.task != "feature-extraction":
            raise HTTPException(404, f"/v1/embeddings serves embedding builds; this build is {model.task}")
        texts = [body.input] if isinstance(body.input, str) else list(body.input)
        if not texts or len(texts) > max_texts or not all(texts):
            raise HTTPException(422, f"send 1..{max_texts} non-empty texts as 'input'")
        rows = np.asarray(await batcher.submit(texts), dtype=np.float32)
        metrics.texts.inc(len(texts))
        tokens = sum(len(ids) for ids in model.tokenizer(texts, truncation=True, max_length=model.max_length)["input_ids"])
        data = [{"object": "embedding", "index": index,
                 "embedding": (base64.b64encode(row.astype("<f4").tobytes()).decode("ascii")
                               if body.encoding_format == "base64" else row.astype(float).tolist())}
                for index, row in enumerate(rows)]
        return JSONResponse({"object": "list", "data": data, "model": body.model or model_name,
                             "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})


def _completion_chunk(ident: str, created: int, model_name: str, text: str, finish: Optional[str]) -> dict[str, Any]:
    return {"id": ident, "object": "text_completion", "created": created, "model": model_name,
            "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}]}


def create_llm_app(build_dir: Path, manifest: dict[str, Any], threads: int = 0) -> Any:
    """`pipeline serve` for a decoder LLM build: POST /v1/completions (streaming or not), GET /health, /metrics."""
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, StreamingResponse

    from pipeline.deploy.runtime import GeneratorRunner

    if manifest.get("status") != "passed" or not (build_dir / "model.onnx").is_file():
        from pipeline.core.errors import InputError

        raise InputError(f"{build_dir} holds no finished LLM build (status {manifest.get('status')!r}); "
                         "run `pipeline build` first")
    runner = GeneratorRunner(build_dir, manifest, threads)
    model_name = str(manifest.get("model", {}).get("name", build_dir.name))
    metrics = Metrics("text-generation")
    app = FastAPI(title="Quantpipe")
    add_metrics_route(app, metrics)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "task": "text-generation", "build": str(build_dir)}

    def run(body: CompletionRequest, on_text: Any) -> tuple[str, str]:
        pieces: list[int] = []
        printed = [""]

        def on_token(token: int) -> None:
            pieces.append(token)
            text = runner.tokenizer.decode(pieces, skip_special_tokens=True)
            if not text.endswith("\ufffd"):  # a multi-byte character waits until it is whole
                on_text(text[len(printed[0]):])
                printed[0] = text

        _, result = runner.generate_ids(body.prompt, body.max_tokens, body.temperature, body.top_k,
                                        body.seed if body.seed is not None else 0, on_token=on_token)
        metrics.tokens.inc(len(result.tokens))
        stopped = bool(result.tokens) and result.tokens[-1] == runner.tokenizer.eos_token_id
        return printed[0], "stop" if stopped else "length"

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest) -> Any:
        ident, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        name = body.model or model_name
        loop = asyncio.get_running_loop()
        if not body.stream:
            text, finish = await loop.run_in_executor(None, run, body, lambda piece: None)
            prompt_tokens = len(runner.tokenizer(body.prompt).input_ids)
            completion_tokens = len(runner.tokenizer(text).input_ids) if text else 0
            answer = _completion_chunk(ident, created, name, text, finish)
            answer["usage"] = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                               "total_tokens": prompt_tokens + completion_tokens}
            return JSONResponse(answer)
        queue: asyncio.Queue[Optional[str]] = asyncio.Queue()

        def on_text(piece: str) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, piece)

        async def events() -> AsyncIterator[str]:
            job = loop.run_in_executor(None, run, body, on_text)
            job.add_done_callback(lambda _: loop.call_soon_threadsafe(queue.put_nowait, None))
            while (piece := await queue.get()) is not None:
                if piece:
                    yield f"data: {json.dumps(_completion_chunk(ident, created, name, piece, None))}\n\n"
            _, finish = await job
            yield f"data: {json.dumps(_completion_chunk(ident, created, name, '', finish))}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app
