"""Limits and validation for every `pipeline serve` route: one hostile request fails alone.

- the request body: at most `max_body_bytes` (413), enforced while it streams in, for every route;
- texts per request: 1..`max_texts` (422); characters per text: at most `max_chars` (413);
- every text must be encodable as UTF-8: a lone surrogate ("\\ud800", valid JSON) is refused with 422
  before it reaches the tokenizer, where it would fail the whole micro-batch it was put in.
Routes call `check_texts`; `BodyLimit` wraps the whole app.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


@dataclass(frozen=True)
class RequestLimits:
    max_body_bytes: int = 1 << 20  # 1 MiB
    max_texts: int = 64
    max_chars: int = 20_000

    def __post_init__(self) -> None:
        if min(self.max_body_bytes, self.max_texts, self.max_chars) < 1:
            raise ValueError(f"request limits must be positive, got {self}")


class RequestRefused(Exception):
    """A request the limits refuse: its HTTP status and a one-line message for the client."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def check_texts(texts: Any, limits: RequestLimits) -> list[str]:
    if not isinstance(texts, list) or not texts:
        raise RequestRefused(422, "send 'text' or a non-empty list 'texts'")
    if len(texts) > limits.max_texts:
        raise RequestRefused(422, f"{len(texts)} texts in one request; the limit is {limits.max_texts} (--max-texts)")
    for index, text in enumerate(texts):
        if not isinstance(text, str) or not text:
            raise RequestRefused(422, f"text {index} is not a non-empty string")
        if len(text) > limits.max_chars:
            raise RequestRefused(413, f"text {index} has {len(text)} characters; the limit is {limits.max_chars} "
                                      "(--max-chars)")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise RequestRefused(422, f"text {index} is not valid Unicode (a lone surrogate at character "
                                      f"{exc.start})") from None
    return texts


async def _refuse(send: Send, status: int, message: str) -> None:
    body = json.dumps({"detail": message}).encode("utf-8")
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class BodyLimit:
    """ASGI middleware: a body over the limit (declared or streamed) is answered 413 and never parsed."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_large = f"request body over {self.max_bytes} bytes (--max-body-bytes)"
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await _refuse(send, 413 if declared.isdigit() else 400,
                          too_large if declared.isdigit() else "bad content-length")
            return
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await _refuse(send, 413, too_large)
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body, replayed = b"".join(chunks), False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)
