"""The warm start of run_cli (tests/cli_zygote.py) gives what `python -m pipeline` gives: the same exit status,
stdout and stderr, for a help text, a refusal and a configuration that reads the default model."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.cli_zygote import ZYGOTE

COMMANDS = [("--help",), ("no-such-command",), ("build", "--weight-bits", "8", "--print-config"),
            ("build", "--calib-samples", "4", "--print-config")]


@pytest.mark.parametrize("args", COMMANDS, ids=lambda args: " ".join(args))
def test_a_forked_command_gives_what_a_cold_process_gives(args: tuple[str, ...], tmp_path) -> None:
    cold = subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True, text=True, cwd=tmp_path,
                          timeout=600)
    warm = ZYGOTE.run(list(args), tmp_path, timeout=600)
    assert (warm.returncode, warm.stdout, warm.stderr) == (cold.returncode, cold.stdout, cold.stderr)


def test_an_uncaught_error_in_the_child_is_a_traceback_and_status_1(tmp_path) -> None:
    """The child exits like an interpreter would on an exception the CLI lets through (here: none is expected
    from the CLI itself, so the probe is a directory that is not there as the working directory)."""
    result = ZYGOTE.run(["--help"], tmp_path / "missing", timeout=600)
    assert result.returncode == 1 and "FileNotFoundError" in result.stderr
