"""Progress on stderr: stage names, batches, elapsed time. Quiet mode prints only errors."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    def __init__(self, quiet: bool = False, stream: TextIO | None = None) -> None:
        self.quiet = quiet
        self.stream = stream or sys.stderr
        self._started = time.perf_counter()
        self._stage = "pipeline"

    def _write(self, message: str) -> None:
        if not self.quiet:
            elapsed = time.perf_counter() - self._started
            print(f"[{elapsed:7.1f}s] {self._stage}: {message}", file=self.stream, flush=True)

    def stage(self, name: str) -> None:
        self._stage = name

    def info(self, message: str) -> None:
        self._write(message)

    def batches(self, what: str, done: int, total: int) -> None:
        """Report every batch for short loops, about every tenth for long ones."""
        step = max(1, total // 10)
        if done == total or done % step == 0:
            self._write(f"{what} batch {done}/{total}")
