"""Progress on stderr: stage names, batches, elapsed time. Quiet mode prints only errors."""

from __future__ import annotations

import signal
import sys
import time
from typing import Any, TextIO

_PENDING: list[int] = []  # signals received; kept until the process exits


def on_signal(signum: int, frame: Any) -> None:
    """SIGINT/SIGTERM handler: the build unwinds at its next progress report (every batch and stage),
    where finally blocks remove the staging folder. Not at once: an exception raised inside a half-done
    import of torch or ONNX Runtime crashed the process (SIGSEGV), and polygraphy's lazy imports swallow
    it (bare except). A second signal unwinds at once."""
    _PENDING.append(signum)
    if len(_PENDING) > 1:
        raise_pending()


def raise_pending() -> None:
    if _PENDING:
        if _PENDING[0] == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(128 + _PENDING[0])


class Progress:
    def __init__(self, quiet: bool = False, stream: TextIO | None = None) -> None:
        self.quiet = quiet
        self.stream = stream or sys.stderr
        self._started = time.perf_counter()
        self._stage = "pipeline"

    def _write(self, message: str) -> None:
        raise_pending()
        if not self.quiet:
            elapsed = time.perf_counter() - self._started
            print(f"[{elapsed:7.1f}s] {self._stage}: {message}", file=self.stream, flush=True)

    def stage(self, name: str) -> None:
        raise_pending()
        self._stage = name

    def info(self, message: str) -> None:
        self._write(message)

    def batches(self, what: str, done: int, total: int) -> None:
        """Report every batch for short loops, about every tenth for long ones."""
        step = max(1, total // 10)
        if done == total or done % step == 0:
            self._write(f"{what} batch {done}/{total}")
