"""Bad data is found in a streaming pass before any stage runs: file and line, exit 2, nothing exported."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.hostile.conftest import cli, one_line

GOOD = [f"sentence number {i} about markets and weather" for i in range(1, 200)]


def _text_latin1(path: Path) -> tuple[Path, str]:
    file = path / "calib.txt"
    file.write_bytes(("\n".join(GOOD[:50]) + "\n").encode() + "caf\xe9 au lait\n".encode("latin-1")
                     + ("\n".join(GOOD[50:]) + "\n").encode())
    return file, "calib.txt:51"


def _jsonl_bad_line(path: Path) -> tuple[Path, str]:
    file = path / "calib.jsonl"
    rows = [f'{{"text": "{text}"}}' for text in GOOD[:100]] + ['{"text": "broken'] + [f'{{"text": "{t}"}}' for t in GOOD]
    file.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return file, "calib.jsonl:101"


def _csv_unbalanced_quote(path: Path) -> tuple[Path, str]:
    file = path / "calib.csv"
    file.write_text("text,label\n" + "".join(f"{t},0\n" for t in GOOD[:20]) + '"an open quote,1\n'
                    + "".join(f"{t},0\n" for t in GOOD[20:40]), encoding="utf-8")
    return file, "not valid CSV"


def _csv_extra_column(path: Path) -> tuple[Path, str]:
    file = path / "calib.csv"
    file.write_text("text,label\n" + "".join(f"{t},0\n" for t in GOOD[:30]) + "one,two,three\n", encoding="utf-8")
    return file, "calib.csv:32"


SOURCES = {"latin1-at-line-51": _text_latin1, "bad-json-at-line-101": _jsonl_bad_line,
           "csv-unbalanced-quote": _csv_unbalanced_quote, "csv-extra-column": _csv_extra_column}


@pytest.mark.parametrize("case", sorted(SOURCES))
def test_a_bad_record_stops_the_build_before_export(tiny_model: Path, tmp_path: Path, case: str) -> None:
    source, needle = SOURCES[case](tmp_path)
    out = tmp_path / "out"
    one_line(cli("build", "--model", str(tiny_model), "--calib-source", str(source), "-o", str(out), "-q"), 2, needle)
    assert not any(out.glob(".stages/export-*")), "export ran before the data was checked"


def test_a_bad_eval_file_stops_the_build_before_export(tmp_path: Path) -> None:
    import shutil

    from pipeline.models.registry import default_model_path

    eval_file = tmp_path / "eval.txt"
    eval_file.write_bytes(b"0\tfine\n1\tcaf\xe9\n")
    classifier = tmp_path / "classifier"
    shutil.copytree(default_model_path(), classifier)  # task text-classification on MiniLM's encoder
    out = tmp_path / "out"
    result = cli("build", "--task", "text-classification", "--model", str(classifier), "--eval-file", str(eval_file),
                 "-o", str(out), "-q")
    one_line(result, 2, "eval.txt")
    assert not any(out.glob(".stages/export-*"))


def test_samples_true_is_not_one(tmp_path: Path) -> None:
    build_file = tmp_path / "build.yaml"
    build_file.write_text("calibration:\n  samples: true\n", encoding="utf-8")
    one_line(cli("build", "--config", str(build_file), "-o", str(tmp_path / "out"), "-q"), 2, "calibration.samples")
