"""Small real data files of every source kind, written from the default corpus's sentences."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from calibration.sources.corpus import default_source

DATA = Path(__file__).resolve().parents[1] / "data"
SAVED_DATASET = DATA / "bbc_saved_dataset"  # written by datasets 5.2.0 Dataset.save_to_disk
SAVED_DATASET_DICT = DATA / "bbc_saved_dataset_dict"  # a DatasetDict (train, test)


def bbc_rows(count: int) -> list[dict[str, str]]:
    """Real BBC sentences with their topic, and the next sentence as a pair."""
    sentences = []
    for sample in default_source():
        sentences.append(sample)
        if len(sentences) == count + 1:
            break
    return [
        {"sentence": first.text, "sentence2": second.text, "topic": first.label or ""}
        for first, second in zip(sentences, sentences[1:])
    ]


def saved_dataset_rows() -> list[dict[str, str]]:
    """What tests/data/bbc_saved_dataset holds: the first sentence of every 28th article (80), each
    paired with the next one's, as `datasets.Dataset.from_list(rows).save_to_disk(...)` was given."""
    source = default_source()
    firsts = [next(source.reader(path)) for path in source.files[::28][:80]]
    return [
        {"sentence": first.text, "sentence2": second.text, "topic": first.label or ""}
        for first, second in zip(firsts, firsts[1:] + firsts[:1])
    ]


@pytest.fixture(scope="session")
def rows() -> list[dict[str, str]]:
    return bbc_rows(60)


def write_source(kind: str, rows: list[dict[str, str]], folder: Path) -> tuple[Path, dict]:
    """A source file (or folder) of the given kind, and the configuration keys that read it."""
    folder.mkdir(parents=True, exist_ok=True)
    fields = {"text_field": "sentence", "text_pair_field": "sentence2", "label_field": "topic"}
    if kind == "text":
        path = folder / "samples.txt"
        path.write_text("".join(row["sentence"] + "\n" for row in rows), encoding="utf-8")
        return path, {}
    if kind == "directory":
        for index in range(3):
            (folder / f"part{index}.txt").write_text(
                "".join(row["sentence"] + "\n" for row in rows[index::3]), encoding="utf-8"
            )
        return folder, {}
    if kind == "jsonl":
        path = folder / "samples.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
        return path, fields
    if kind == "csv":
        path = folder / "samples.csv"
        with path.open("w", encoding="utf-8", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        return path, fields
    if kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = folder / "samples.parquet"
        pq.write_table(pa.Table.from_pylist(rows), str(path), row_group_size=16)
        return path, fields
    if kind == "dataset":
        return SAVED_DATASET, fields
    raise ValueError(kind)


SOURCE_KINDS = ("text", "directory", "jsonl", "csv", "parquet", "dataset")
