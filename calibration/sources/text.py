"""Plain text: one sample per line, in a file or in every `*.txt` file below a folder."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from calibration.sources import Sample, SampleSource
from pipeline.core.errors import InputError


def utf8_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, stripped line) of the non-empty lines; bytes that are not UTF-8 are an InputError."""
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError as exc:
                raise InputError(
                    f"{path}:{number}: bytes that are not UTF-8 at offset {exc.start}; re-encode the file as UTF-8"
                ) from None
            if line:
                yield number, line


def text_lines(path: Path) -> Iterator[Sample]:
    for _, line in utf8_lines(path):
        yield Sample(line)


def text_source(path: Path) -> SampleSource:
    return SampleSource(f"text:{path.name}", (path,), text_lines)


def directory_source(folder: Path) -> SampleSource:
    files = tuple(sorted(path for path in folder.rglob("*.txt") if path.is_file()))
    if not files:
        raise InputError(f"calibration folder {folder} holds no *.txt files; add text files, one sample per line")
    if all(path.stat().st_size == 0 for path in files):
        raise InputError(f"calibration folder {folder}: all {len(files)} *.txt files are empty")
    return SampleSource(f"directory:{folder.name}", files, text_lines)
