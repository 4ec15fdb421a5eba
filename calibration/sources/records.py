"""Record files read line by line: JSON Lines and CSV, with the text (and pair, label) fields chosen."""

from __future__ import annotations

import csv
import json
from functools import partial
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

from calibration.sources import Fields, Sample, SampleSource, describe_fields, missing_field_error
from calibration.sources.text import utf8_lines
from pipeline.core.errors import InputError


def record_sample(record: Mapping[str, Any], fields: Fields) -> Optional[Sample]:
    """A sample from a record, or None when its text (or pair) is missing or blank."""

    def text_of(name: Optional[str]) -> Optional[str]:
        value = record.get(name) if name else None
        return value.strip() or None if isinstance(value, str) else None

    text = text_of(fields.text)
    pair = text_of(fields.text_pair)
    if text is None or (fields.text_pair and pair is None):
        return None
    label = record.get(fields.label) if fields.label else None
    return Sample(text, pair, None if label is None else str(label))


def _check_fields(available: list[str], fields: Fields, where: str) -> None:
    for name in fields.names():
        if name not in available:
            raise missing_field_error(name, where, available)


def _jsonl_samples(fields: Fields, path: Path) -> Iterator[Sample]:
    checked = False
    for number, line in utf8_lines(path):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}:{number}: not valid JSON ({exc.msg}); each line must hold one JSON object") from None
        if not isinstance(record, dict):
            raise InputError(f"{path}:{number}: a JSON {type(record).__name__} where an object was expected")
        if not checked:
            _check_fields(sorted(record), fields, f"the first record of {path} (line {number})")
            checked = True
        sample = record_sample(record, fields)
        if sample is not None:
            yield sample


def _csv_samples(fields: Fields, path: Path) -> Iterator[Sample]:
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    with path.open("r", encoding="utf-8", newline="") as handle:
        # strict: an unbalanced quote is an error, not lines silently merged into one sample.
        reader = csv.DictReader(handle, delimiter=delimiter, strict=True)
        try:
            _check_fields(list(reader.fieldnames or []), fields, f"the header row of {path}")
            columns = len(reader.fieldnames or [])
            for row in reader:
                if None in row or (columns and None in row.values()):
                    raise InputError(f"{path}:{reader.line_num}: {columns} columns expected (the header's), got "
                                     f"{columns + len(row.get(None) or []) if None in row else 'fewer'}")
                sample = record_sample(row, fields)
                if sample is not None:
                    yield sample
        except UnicodeDecodeError as exc:
            raise InputError(
                f"{path}: bytes that are not UTF-8 near line {reader.line_num + 1} (byte {exc.start} of a chunk); "
                "re-encode the file as UTF-8"
            ) from None
        except csv.Error as exc:
            raise InputError(f"{path}:{reader.line_num}: not valid CSV ({exc})") from None


def jsonl_source(path: Path, fields: Fields) -> SampleSource:
    return SampleSource(f"jsonl:{path.name}[{describe_fields(fields)}]", (path,), partial(_jsonl_samples, fields))


def csv_source(path: Path, fields: Fields) -> SampleSource:
    return SampleSource(f"csv:{path.name}[{describe_fields(fields)}]", (path,), partial(_csv_samples, fields))
