"""`pipeline calibrate` and the calibration flags, as a user runs them: bad data fails at once, on one line."""

from __future__ import annotations

from pathlib import Path

from pipeline.core.errors import ExitCode
from tests.helpers import assert_one_line_error, run_cli


def test_calibrate_help_documents_the_calibration_flags() -> None:
    result = run_cli("calibrate", "--help")
    assert result.returncode == 0
    for flag in ("--calib-source", "--calib-format", "--text-field", "--text-pair-field", "--label-field",
                 "--stratify", "--padding", "--long-samples", "--calib-method", "--percentile", "--calib-samples"):
        assert flag in result.stdout, flag


def test_missing_source_is_one_line_exit_2_before_any_stage(tmp_path: Path) -> None:
    result = run_cli("calibrate", "--calib-source", str(tmp_path / "nope.jsonl"), "-o", str(tmp_path / "b"))
    assert_one_line_error(result, ExitCode.BAD_INPUT, "calibration source not found", "nope.jsonl", "--calib-source")
    assert not (tmp_path / "b").exists(), "nothing was started, nothing written"


def test_missing_field_and_bad_bytes_are_one_line_exit_2(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text('{"sentence": "The shares rose sharply on Monday."}\n', encoding="utf-8")
    result = run_cli("calibrate", "--calib-source", str(path), "-o", str(tmp_path / "b"))
    assert_one_line_error(result, ExitCode.BAD_INPUT, "field 'text' not found", "(fields: sentence)", "--text-field")
    path.write_bytes(b'{"text": "caf\xe9"}\n')
    result = run_cli("calibrate", "--calib-source", str(path), "-o", str(tmp_path / "b"))
    assert_one_line_error(result, ExitCode.BAD_INPUT, "data.jsonl:1: bytes that are not UTF-8", "re-encode")


def test_label_stratification_without_a_label_field_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    path.write_text("text\nA sentence of news.\n", encoding="utf-8")
    result = run_cli("calibrate", "--calib-source", str(path), "--stratify", "label", "-o", str(tmp_path / "b"))
    assert_one_line_error(result, ExitCode.BAD_INPUT, "needs label_field")
