"""Progress on stderr: stage names, batches with rate and ETA, elapsed time. Quiet mode prints only errors.

The one place the pipeline reports progress. On a terminal every batch loop (calibration, the
quantizer's calibration and each fallback-search trial, held-out verification, LLM perplexity) is a
tqdm bar with its rate and ETA; when stderr is not a terminal, or `CI` is set, the same events are
plain lines (about every tenth batch). Every line also goes to the `quantpipe.progress` logger, which
`--log-file` writes to a file (see pipeline/core/logs.py).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from typing import Any, Optional, TextIO

_PENDING: list[int] = []  # signals received; kept until the process exits
LOGGER = logging.getLogger("quantpipe.progress")
LOGGER.propagate = False  # the lines are printed by Progress itself; the logger feeds --log-file only


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


def bars_wanted(stream: TextIO) -> bool:
    """Bars on an interactive terminal only: not in a pipe, a file, or CI (CI=true, as every CI system sets)."""
    is_tty = getattr(stream, "isatty", None)
    ci = os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")
    return bool(is_tty and is_tty()) and not ci


def _terminal_width(stream: TextIO) -> int:
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (OSError, ValueError, AttributeError):
        return 0


class Progress:
    def __init__(self, quiet: bool = False, stream: TextIO | None = None, bars: Optional[bool] = None) -> None:
        self.quiet = quiet
        self.stream = stream or sys.stderr
        self.bars = not quiet and (bars_wanted(self.stream) if bars is None else bars)
        self._started = time.perf_counter()
        self._stage = "pipeline"
        self._bar: Any = None
        self._bar_key: tuple[str, str, int] | None = None

    def _write(self, message: str) -> None:
        raise_pending()
        elapsed = time.perf_counter() - self._started
        line = f"[{elapsed:7.1f}s] {self._stage}: {message}"
        LOGGER.info(line)
        if self.quiet:
            return
        if self._bar is not None:
            self._bar.write(line, file=self.stream)  # above the bar, which is redrawn below
        else:
            print(line, file=self.stream, flush=True)

    def stage(self, name: str) -> None:
        raise_pending()
        self._close_bar()
        self._stage = name

    def info(self, message: str) -> None:
        self._write(message)

    def batches(self, what: str, done: int, total: int) -> None:
        """A bar on a terminal; else a line for every batch of short loops, about every tenth of long ones."""
        raise_pending()
        if self.bars:
            self._advance(what, done, total)
            return
        step = max(1, total // 10)
        if done == total or done % step == 0:
            self._write(f"{what} batch {done}/{total}")

    def _advance(self, what: str, done: int, total: int) -> None:
        from tqdm import tqdm

        key = (self._stage, what, total)
        if self._bar is None or self._bar_key != key or done < self._bar.n:
            self._close_bar()
            width = _terminal_width(self.stream)  # a terminal without a size (0 columns) gets 100
            self._bar = tqdm(total=total, desc=f"{self._stage}: {what}", unit="batch", file=self.stream,
                             dynamic_ncols=width > 0, ncols=None if width > 0 else 100, leave=True, mininterval=0.2)
            self._bar_key = key
        self._bar.update(done - self._bar.n)
        if done >= total:
            LOGGER.info(f"{self._stage}: {what} batch {done}/{total}")
            self._close_bar()

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar, self._bar_key = None, None
