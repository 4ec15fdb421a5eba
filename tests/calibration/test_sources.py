from __future__ import annotations

from pathlib import Path

import pytest

from calibration.selection import select_samples
from calibration.sources import Fields, Sample, default_source, open_source
from pipeline.core.errors import InputError
from tests.calibration.conftest import (
    SAVED_DATASET,
    SAVED_DATASET_DICT,
    SOURCE_KINDS,
    saved_dataset_rows,
    write_source,
)


def test_default_corpus_is_real_english_news() -> None:
    source = default_source()
    assert len(source.files) == 2225
    first = next(iter(source))
    assert first.text.startswith("Quarterly profits at US media giant TimeWarner jumped 76%")
    assert "(£600m)" in first.text, "decoded as UTF-8, not as Latin-1 mojibake"
    assert first.label == "business", "labelled by topic, for stratified sampling"


def test_text_file_streams_lines(tmp_path: Path) -> None:
    path = tmp_path / "samples.txt"
    path.write_text("first sample here\n\nsecond sample here\n")
    assert [sample.text for sample in open_source(str(path))] == ["first sample here", "second sample here"]


def _open(kind: str, rows: list[dict[str, str]], folder: Path, **overrides: str | None):
    path, keys = write_source(kind, rows, folder)
    keys = {**keys, **overrides}
    fields = Fields(keys.get("text_field", "text"), keys.get("text_pair_field"), keys.get("label_field"))
    return open_source(str(path), "auto", fields)


@pytest.mark.parametrize("kind", SOURCE_KINDS)
def test_every_kind_of_source_yields_the_real_sentences(kind: str, rows, tmp_path: Path) -> None:
    samples = list(_open(kind, rows, tmp_path))
    if kind == "dataset":
        rows = saved_dataset_rows()
    expected = {row["sentence"] for row in rows}
    assert {sample.text for sample in samples} == expected
    if kind in ("jsonl", "csv", "parquet", "dataset"):
        assert [sample.text_pair for sample in samples] == [row["sentence2"] for row in rows]
        assert [sample.label for sample in samples] == [row["topic"] for row in rows]


def test_saved_dataset_is_read_with_pyarrow_streams() -> None:
    source = open_source(str(SAVED_DATASET), fields=Fields("sentence", None, "topic"))
    assert source.name.startswith("dataset:") and source.files[0].suffix == ".arrow"
    samples = list(source)
    assert {sample.label for sample in samples} == {"business", "entertainment", "politics", "sports", "tech"}


def test_csv_reads_tab_separated_by_suffix(tmp_path: Path) -> None:
    path = tmp_path / "pairs.tsv"
    path.write_text("text\tother\nA sentence with, a comma\tx\n", encoding="utf-8")
    assert [sample.text for sample in open_source(str(path))] == ["A sentence with, a comma"]


def test_format_flag_overrides_the_suffix(tmp_path: Path) -> None:
    path = tmp_path / "records.log"
    path.write_text('{"body": "a record in a file with an odd suffix"}\n', encoding="utf-8")
    assert [s.text for s in open_source(str(path), "jsonl", Fields("body"))] == ["a record in a file with an odd suffix"]


# --- bad input: every case is an InputError (exit code 2) naming what, where and the fix ---

@pytest.mark.parametrize(
    ("content", "message"),
    [(None, "not found"), (b"", "is empty"), (b"ok line\n\xff\xfe broken\n", "samples.txt:2: bytes that are not UTF-8")],
)
def test_bad_text_sources_get_clear_errors(tmp_path: Path, content: bytes | None, message: str) -> None:
    path = tmp_path / "samples.txt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(InputError, match=message):
        list(open_source(str(path)))


@pytest.mark.parametrize("kind", ["jsonl", "csv", "parquet", "dataset"])
def test_a_field_that_does_not_exist_is_named_with_the_fields_there(kind: str, rows, tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"field 'headline' not found in .*\(fields: .*sentence.*\); pick one with --text-field"):
        list(_open(kind, rows, tmp_path, text_field="headline"))


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("bad.jsonl", b'{"text": "fine"}\n{"text": "caf\xe9"}\n', r"bad.jsonl:2: bytes that are not UTF-8"),
        ("bad.jsonl", b'{"text": "fine"}\n{"text": \n', r"bad.jsonl:2: not valid JSON"),
        ("bad.jsonl", b'["a list"]\n', r"bad.jsonl:1: a JSON list where an object was expected"),
        ("bad.csv", b"text\nfine\ncaf\xe9 au lait\n", r"bad.csv: bytes that are not UTF-8 near line"),
        ("bad.parquet", b"PAR1 this is not parquet", r"bad.parquet is not a readable Parquet file"),
        ("empty.csv", b"", r"empty.csv is empty"),
    ],
)
def test_broken_record_files_are_refused(tmp_path: Path, name: str, content: bytes, message: str) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(InputError, match=message):
        list(open_source(str(path)))


def test_empty_folder_and_dataset_dict_are_refused(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"holds no \*.txt files"):
        open_source(str(tmp_path))
    with pytest.raises(InputError, match=r"DatasetDict with splits train, test; give one split's folder"):
        open_source(str(SAVED_DATASET_DICT), fields=Fields("sentence"))
    train = open_source(str(SAVED_DATASET_DICT / "train"), fields=Fields("sentence"))
    assert len(list(train)) == 3


def test_fields_on_a_plain_text_file_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "samples.txt"
    path.write_text("one sample per line here\n")
    with pytest.raises(InputError, match="has no fields; --text-pair-field and --label-field need"):
        open_source(str(path), fields=Fields("text", "pair"))


def test_records_without_text_are_skipped_not_counted(tmp_path: Path) -> None:
    path = tmp_path / "mixed.jsonl"
    path.write_text('{"text": "kept sentence"}\n{"text": ""}\n{"text": null}\n{"text": 3}\n\n', encoding="utf-8")
    assert [sample.text for sample in open_source(str(path))] == ["kept sentence"]


def test_too_few_samples_is_refused() -> None:
    with pytest.raises(InputError, match="3 distinct usable samples"):
        select_samples(["a", "b", "c", "a"], calibration=2, heldout=2, seed=0)


def test_selection_is_seeded_and_disjoint() -> None:
    samples = [f"sample {i}" for i in range(1000)]
    first = select_samples(samples, 100, 50, seed=3)
    assert first == select_samples(samples, 100, 50, seed=3)
    assert first != select_samples(samples, 100, 50, seed=4)
    assert not set(first[0]) & set(first[1])


def test_pairs_are_distinct_by_both_texts() -> None:
    samples = [Sample("same premise", "hypothesis one"), Sample("same premise", "hypothesis two")]
    calibration, heldout = select_samples(samples, 1, 1, seed=0)
    assert {calibration[0].text_pair, heldout[0].text_pair} == {"hypothesis one", "hypothesis two"}
