"""`pipeline serve`: a CPU build behind a small HTTP endpoint, with a micro-batcher.

POST /v1/predict {"texts": [...]} (or {"text": "..."}) returns
{"embeddings": [[...]]} for feature-extraction builds and {"labels": [...], "scores": [...]}
for text-classification builds. Concurrent requests are collected for up to `max_wait_ms`
(or until `max_batch` texts are waiting), tokenized together and run in one ONNX Runtime call
off the event loop; GET /v1/stats says how many batches ran and how large they were.
`padding` "longest" (the default) pads each group of similar-length texts to its longest text;
"max_length" pads every batch to the build's max_length, as a naive deployment does (kept to
measure what length batching saves: `pipeline bench-serve --compare-padding`).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
from pydantic import BaseModel

from pipeline.core.errors import InputError, MissingDependencyError
from pipeline.deploy.limits import BodyLimit, RequestLimits, RequestRefused, check_texts

PADDINGS = ("longest", "max_length")


class Predict(BaseModel):
    """Request body of POST /v1/predict: one text or a list of texts."""

    text: Optional[str] = None
    texts: Optional[list[str]] = None


@dataclass
class BatchStats:
    requests: int = 0
    texts: int = 0
    batches: int = 0
    largest_batch: int = 0
    busy_seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        mean = self.texts / self.batches if self.batches else 0.0
        return {"requests": self.requests, "texts": self.texts, "batches": self.batches,
                "mean_batch": round(mean, 2), "largest_batch": self.largest_batch,
                "busy_seconds": round(self.busy_seconds, 3)}


class BuildModel:
    """A finished CPU build: its INT8 graph in ONNX Runtime and its tokenizer."""

    def __init__(self, build_dir: Path, threads: int = 0, padding_slack: float = 0.25,
                 padding: str = "longest") -> None:
        from transformers import AutoTokenizer

        from engines.ort_session import create_session
        from pipeline.build.readback import checked_file, checked_tree, load_manifest
        from pipeline.deploy.runtime import build_labels, session_settings

        if padding not in PADDINGS:
            raise InputError(f"padding must be one of {', '.join(PADDINGS)}, got {padding!r}")
        if not (build_dir / "manifest.json").is_file() or not (build_dir / "model.onnx").is_file():
            raise InputError(f"{build_dir} holds no finished build (manifest.json and model.onnx); "
                             "run `pipeline build --target cpu` first")
        manifest = load_manifest(build_dir)  # schema-checked; its files are hash-checked below
        if manifest.config.target != "cpu":
            raise InputError(f"{build_dir} is a '{manifest.config.target}' build; `pipeline serve` serves "
                             "CPU builds (use `pipeline export-triton` for TensorRT)")
        if manifest.model.task not in ("feature-extraction", "text-classification"):
            raise InputError(f"{build_dir} is a '{manifest.model.task}' build; `pipeline serve` serves encoder "
                             "builds (feature-extraction, text-classification)")
        self.task = manifest.model.task
        self.max_length = manifest.config.calibration.max_length
        raw = manifest.model_dump(mode="json")
        self.labels = build_labels(build_dir, raw)  # the build's own config.json: a moved build keeps them
        self.session = create_session(checked_file(build_dir, manifest, "model.onnx"), threads=threads,
                                      settings=session_settings(raw, build_dir))
        self.input_names = [i.name for i in self.session.get_inputs()]
        tokenizer_dir = checked_tree(build_dir, manifest, "tokenizer")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir), trust_remote_code=False)
        except Exception as exc:  # a tokenizer the library cannot load is bad input, whatever it raises
            raise InputError(f"cannot load the tokenizer in {tokenizer_dir}: {str(exc).strip()[:200] or type(exc).__name__}") from None
        self.output = "logits" if self.task == "text-classification" else "sentence_embedding"
        self.padding_slack, self.padding = padding_slack, padding

    def feed(self, texts: list[str]) -> dict[str, np.ndarray]:
        encoded = self.tokenizer(texts, padding=self.padding, truncation=True, max_length=self.max_length,
                                 return_tensors="np")
        return {name: np.asarray(encoded[name], dtype=np.int64) for name in self.input_names}

    def run(self, texts: list[str]) -> np.ndarray:
        """Rows in the order of `texts`; runs texts of similar token length together (see length_groups),
        or, padded to max_length, all in one run (every row has the same length then)."""
        if self.padding == "max_length":
            groups = [list(range(len(texts)))]
        else:
            encoded = self.tokenizer(texts, truncation=True, max_length=self.max_length)
            groups = length_groups([len(ids) for ids in encoded["input_ids"]], self.padding_slack)
        rows: list[Optional[np.ndarray]] = [None] * len(texts)
        for group in groups:
            output = self.session.run([self.output], self.feed([texts[i] for i in group]))[0]
            for index, row in zip(group, output):
                rows[index] = row
        return np.stack(rows)  # type: ignore[arg-type]

    def response(self, rows: np.ndarray) -> dict[str, Any]:
        if self.task == "text-classification":
            shifted = np.exp(rows - rows.max(axis=1, keepdims=True))
            probabilities = shifted / shifted.sum(axis=1, keepdims=True)
            best = probabilities.argmax(axis=1)
            return {"labels": [self.labels.get(int(i), f"LABEL_{int(i)}") for i in best],
                    "scores": [float(probabilities[r, i]) for r, i in enumerate(best)]}
        return {"embeddings": rows.astype(float).tolist()}


def length_groups(lengths: list[int], slack: float) -> list[list[int]]:
    """Indices sorted by length, cut where padding to the group's longest would add more than `slack`.

    A batch is padded to its longest text, so one long sentence in a batch of short ones
    multiplies the work; measured on BBC sentences, padding whole micro-batches made batched
    serving slower than serving one request at a time. Groups of similar length keep the
    padding below `slack` (0.25: at most 25% more tokens than the texts have).
    """
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    groups: list[list[int]] = []
    current: list[int] = []
    real = 0
    for index in order:
        longest = lengths[index]  # sorted: the newest member is the longest
        if current and longest * (len(current) + 1) > (1 + slack) * (real + longest):
            groups.append(current)
            current, real = [], 0
        current.append(index)
        real += lengths[index]
    if current:
        groups.append(current)
    return groups


@dataclass
class _Pending:
    texts: list[str]
    future: asyncio.Future[np.ndarray]
    enqueued: float = field(default_factory=time.perf_counter)


class MicroBatcher:
    """Collects requests for a few milliseconds, runs them as one batch, hands each its rows."""

    def __init__(self, model: BuildModel, max_batch: int = 32, max_wait_ms: float = 5.0) -> None:
        if max_batch < 1 or max_wait_ms < 0:
            raise InputError(f"max_batch must be >= 1 and max_wait_ms >= 0, got {max_batch} and {max_wait_ms}")
        self.model, self.max_batch, self.max_wait = model, max_batch, max_wait_ms / 1000
        self.stats = BatchStats()
        self._queue: Optional[asyncio.Queue[_Pending]] = None
        self._worker: Optional[asyncio.Task[None]] = None

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._worker = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()

    async def submit(self, texts: list[str]) -> np.ndarray:
        assert self._queue is not None, "MicroBatcher.start() was not awaited"
        future: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        await self._queue.put(_Pending(texts, future))
        return await future

    async def _collect(self) -> list[_Pending]:
        assert self._queue is not None
        batch = [await self._queue.get()]
        size = len(batch[0].texts)
        deadline = time.perf_counter() + self.max_wait
        while size < self.max_batch:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                break
            try:
                item = await asyncio.wait_for(self._queue.get(), remaining)
            except asyncio.TimeoutError:
                break
            batch.append(item)
            size += len(item.texts)
        return batch

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect()
            texts = [text for pending in batch for text in pending.texts]
            started = time.perf_counter()
            try:
                rows = await loop.run_in_executor(None, self.model.run, texts)
            except Exception as exc:  # one bad request fails alone: the others of its batch run again on their own
                for pending in batch:
                    try:
                        alone = exc if len(batch) == 1 else await loop.run_in_executor(None, self.model.run, pending.texts)
                    except Exception as error:
                        alone = error
                    if pending.future.done():
                        continue
                    if isinstance(alone, BaseException):
                        pending.future.set_exception(alone)
                    else:
                        pending.future.set_result(alone)
                continue
            self.stats.busy_seconds += time.perf_counter() - started
            self.stats.batches += 1
            self.stats.requests += len(batch)
            self.stats.texts += len(texts)
            self.stats.largest_batch = max(self.stats.largest_batch, len(texts))
            offset = 0
            for pending in batch:
                if not pending.future.done():
                    pending.future.set_result(rows[offset:offset + len(pending.texts)])
                offset += len(pending.texts)


def create_app(build_dir: Path, threads: int = 0, max_batch: int = 32, max_wait_ms: float = 5.0,
               limits: RequestLimits = RequestLimits(), padding: str = "longest") -> Any:
    try:
        from fastapi import FastAPI
        from fastapi.responses import JSONResponse
    except ImportError:
        raise MissingDependencyError("serving needs FastAPI and uvicorn: pip install 'quantpipe[serve]'") from None
    from contextlib import asynccontextmanager

    from pipeline.build.manifest import read_manifest
    from pipeline.deploy import openai_routes

    manifest = read_manifest(build_dir)
    if manifest.get("model", {}).get("task") == "text-generation":  # an LLM build: OpenAI completions
        return openai_routes.create_llm_app(build_dir, manifest, threads)
    model = BuildModel(build_dir, threads, padding=padding)
    batcher = MicroBatcher(model, max_batch, max_wait_ms)

    @asynccontextmanager
    async def lifespan(app: Any):  # type: ignore[no-untyped-def]
        await batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title="Quantpipe", lifespan=lifespan)
    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes)  # every route (pipeline.deploy.limits)

    @app.exception_handler(RequestRefused)
    async def refused(request: Any, exc: RequestRefused) -> Any:
        return JSONResponse({"detail": exc.message}, status_code=exc.status)

    metrics = openai_routes.Metrics(model.task)
    openai_routes.add_metrics_route(app, metrics)
    openai_routes.add_embedding_routes(app, model, batcher, metrics, str(manifest["model"].get("name", build_dir.name)),
                                       limits.max_texts)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "task": model.task, "build": str(build_dir), "padding": model.padding}

    @app.get("/v1/stats")
    async def stats() -> dict[str, Any]:
        return batcher.stats.to_dict()

    @app.post("/v1/predict")
    async def predict(body: Predict) -> Any:
        texts = check_texts(body.texts if body.texts is not None else ([body.text] if body.text is not None else []),
                            limits)
        rows = await batcher.submit(texts)
        # JSONResponse skips FastAPI's per-element jsonable_encoder walk over hundreds of floats per text.
        return JSONResponse({"task": model.task, **model.response(rows)})

    return app


def serve(build_dir: Path, host: str, port: int, threads: int, max_batch: int, max_wait_ms: float,
          limits: RequestLimits = RequestLimits(), padding: str = "longest") -> None:
    try:
        import uvicorn
    except ImportError:
        raise MissingDependencyError("serving needs FastAPI and uvicorn: pip install 'quantpipe[serve]'") from None
    app = create_app(build_dir, threads, max_batch, max_wait_ms, limits, padding)
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
