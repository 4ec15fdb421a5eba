from __future__ import annotations

from pathlib import Path

from pipeline.core.errors import ExitCode
from tests.helpers import assert_one_line_error, run_cli


def test_missing_model_folder_is_one_line_exit_2(tmp_path: Path) -> None:
    result = run_cli("build", "--model", "/no/such/dir", "-o", str(tmp_path / "b"))
    assert_one_line_error(result, ExitCode.BAD_INPUT, "model folder not found", "/no/such/dir")


def test_folder_that_is_not_a_model_is_one_line_exit_2(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not a model")
    result = run_cli("build", "--model", str(tmp_path), "-o", str(tmp_path / "b"))
    assert_one_line_error(result, ExitCode.BAD_INPUT, "no config.json")


def test_help_documents_build() -> None:
    result = run_cli("build", "--help")
    assert result.returncode == 0
    for flag in ("--target", "--model", "--quant", "--force", "--print-config", "--quiet", "--stop-after"):
        assert flag in result.stdout
