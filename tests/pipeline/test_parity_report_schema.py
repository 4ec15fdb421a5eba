"""The parity report's JSON Schema is generated from the model: the committed copy cannot drift."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from pipeline.parity.gates import PARITY_SCHEMA_VERSION
from pipeline.parity.report import SCHEMA_FILE, render_schema

ROOT = Path(__file__).resolve().parents[2]


def test_committed_schema_is_the_generated_one() -> None:
    committed = (ROOT / SCHEMA_FILE).read_text(encoding="utf-8")
    assert committed == render_schema(), f"regenerate: python -m pipeline.parity.report --schema > {SCHEMA_FILE}"


def test_schema_command_prints_it_and_pins_the_version() -> None:
    result = subprocess.run([sys.executable, "-m", "pipeline.parity.report", "--schema"],
                            capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    schema = json.loads(result.stdout)
    assert result.stdout == (ROOT / SCHEMA_FILE).read_text(encoding="utf-8")
    assert schema["properties"]["schema_version"]["const"] == PARITY_SCHEMA_VERSION == 3
    assert schema["additionalProperties"] is False
