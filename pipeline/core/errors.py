"""Errors that reach the user, each with the exit code CI keys on.

Every error the CLI reports is a `QuantpipeError`: one line that says what went
wrong and how to fix it. Anything else is a bug and exits with INTERNAL.
"""

from __future__ import annotations

import enum
import json
from pathlib import Path
from typing import Any


class ExitCode(enum.IntEnum):
    OK = 0
    INTERNAL = 1
    BAD_INPUT = 2  # bad configuration, flag, model folder or data file (also click's usage errors)
    STAGE_FAILED = 3  # a stage (export, quantizer, ...) failed on valid input
    PARITY_FAILED = 4  # the build finished but missed a parity threshold
    MISSING_DEPENDENCY = 5  # a package or hardware the request needs is not present
    LOCKED = 6  # another build holds the build directory


class QuantpipeError(Exception):
    exit_code: ExitCode = ExitCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ConfigError(QuantpipeError):
    exit_code = ExitCode.BAD_INPUT


class InputError(QuantpipeError):
    exit_code = ExitCode.BAD_INPUT


class StageError(QuantpipeError):
    exit_code = ExitCode.STAGE_FAILED

    def __init__(self, stage: str, message: str) -> None:
        super().__init__(f"stage '{stage}' failed: {message}")
        self.stage = stage


class EngineError(QuantpipeError):
    """An engine (quantizer, graph rewrite) failed on valid input; the runner names the stage that called it."""

    exit_code = ExitCode.STAGE_FAILED


class ParityError(QuantpipeError):
    exit_code = ExitCode.PARITY_FAILED


class MissingDependencyError(QuantpipeError):
    exit_code = ExitCode.MISSING_DEPENDENCY


class LockedError(QuantpipeError):
    exit_code = ExitCode.LOCKED


def read_json_input(path: Path) -> Any:
    """A JSON file the user handed us (a model's config.json, a manifest, a report): bad bytes or
    bad JSON are an InputError naming the file, never a traceback."""
    import stat

    try:
        if not stat.S_ISREG(path.stat().st_mode):  # a FIFO or device would block or never end
            raise InputError(f"{path} is not a regular file")
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path} is not valid JSON: {exc}") from None
    except RecursionError:
        raise InputError(f"{path} is not valid JSON: nested too deeply") from None
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror or exc}") from None
