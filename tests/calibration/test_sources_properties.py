"""Property-based tests of the calibration readers: any bytes, in a file of any kind, give samples or
one InputError, never another exception (and never a sample without text)."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from calibration.selection import select_samples
from calibration.sources import Fields, Sample, open_source
from pipeline.core.errors import InputError
from tests.calibration.conftest import SAVED_DATASET

FIELDS = Fields("text", None, None)
SUFFIXES = {"text": ".txt", "jsonl": ".jsonl", "csv": ".csv", "tsv": ".tsv", "parquet": ".parquet"}
PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _parquet_bytes() -> bytes:
    table = pa.table({"text": ["a real sentence", "another one", "x" * 50], "label": ["a", "b", "a"]})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


VALID = {
    "text": "first line\nsecond line\n".encode(),
    "jsonl": b'{"text": "one"}\n{"text": "two", "label": 1}\n',
    "csv": b"text,label\nhello,1\nworld,2\n",
    "tsv": b"text\tlabel\nhello\t1\n",
    "parquet": _parquet_bytes(),
}


@st.composite
def damaged(draw: st.DrawFn, valid: bytes) -> bytes:
    """A valid file truncated, with bytes overwritten, or with random bytes inserted."""
    data = bytearray(valid)
    for _ in range(draw(st.integers(1, 4))):
        action = draw(st.sampled_from(["truncate", "overwrite", "insert"]))
        position = draw(st.integers(0, max(0, len(data) - 1)))
        if action == "truncate":
            del data[position:]
        elif action == "overwrite" and data:
            data[position] = draw(st.integers(0, 255))
        else:
            data[position:position] = draw(st.binary(min_size=1, max_size=16))
    return bytes(data)


def _contents(kind: str) -> st.SearchStrategy[bytes]:
    structured = {
        "jsonl": st.lists(st.dictionaries(st.sampled_from(["text", "label", "x"]),
                                          st.none() | st.integers() | st.floats() | st.text() | st.lists(st.integers())),
                          max_size=4).map(lambda rows: "\n".join(map(json.dumps, rows)).encode()),
        "csv": st.lists(st.lists(st.text(max_size=8), min_size=1, max_size=3), max_size=4).map(
            lambda rows: "\n".join(",".join(row) for row in [["text", "label"], *rows]).encode()),
    }
    base = st.binary(max_size=600) | st.text(max_size=300).map(str.encode) | damaged(VALID[kind])
    return base | structured[kind] if kind in structured else base


def _read(path: Path, kind: str) -> list[Sample]:
    try:
        samples = list(open_source(str(path), "csv" if kind == "tsv" else kind, FIELDS))
    except InputError as exc:
        assert exc.message and "\n" not in exc.message, exc.message
        return []
    for sample in samples:
        assert isinstance(sample, Sample) and isinstance(sample.text, str) and sample.text.strip()
    return samples


@pytest.mark.parametrize("kind", sorted(SUFFIXES))
def test_random_bytes_give_samples_or_an_input_error(kind: str) -> None:
    @PROPERTY
    @given(_contents(kind))
    def check(content: bytes) -> None:
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / f"data{SUFFIXES[kind]}"
            path.write_bytes(content)
            samples = _read(path, kind)
            if len(samples) >= 2:  # what the build does next with them must hold too
                try:
                    select_samples(open_source(str(path), "csv" if kind == "tsv" else kind, FIELDS), 1, 1, 0, "p")
                except InputError:
                    pass

    check()


def test_random_arrow_streams_in_a_saved_dataset_give_samples_or_an_input_error() -> None:
    valid = (SAVED_DATASET / "data-00000-of-00001.arrow").read_bytes()

    @settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.binary(max_size=600) | damaged(valid))
    def check(content: bytes) -> None:
        with tempfile.TemporaryDirectory() as folder:
            dataset = Path(folder) / "saved"
            shutil.copytree(SAVED_DATASET, dataset)
            (dataset / "data-00000-of-00001.arrow").write_bytes(content)
            try:
                samples = list(open_source(str(dataset), "dataset", Fields("sentence")))
            except InputError as exc:
                assert "\n" not in exc.message
                return
            assert all(isinstance(sample.text, str) and sample.text for sample in samples)

    check()


@given(st.binary(max_size=300) | st.text(max_size=200).map(str.encode))
@PROPERTY
def test_random_state_json_gives_an_input_error_or_samples(content: bytes) -> None:
    with tempfile.TemporaryDirectory() as folder:
        dataset = Path(folder) / "saved"
        shutil.copytree(SAVED_DATASET, dataset)
        (dataset / "state.json").write_bytes(content)
        try:
            list(open_source(str(dataset), "dataset", Fields("sentence")))
        except InputError as exc:
            assert "\n" not in exc.message


def test_saved_dataset_cannot_point_outside_its_folder(tmp_path: Path) -> None:
    dataset = tmp_path / "saved"
    shutil.copytree(SAVED_DATASET, dataset)
    outside = tmp_path / "secret.arrow"
    shutil.copy(SAVED_DATASET / "data-00000-of-00001.arrow", outside)
    state = json.loads((dataset / "state.json").read_text())
    state["_data_files"] = [{"filename": "../secret.arrow"}]
    (dataset / "state.json").write_text(json.dumps(state))
    with pytest.raises(InputError, match="outside"):
        open_source(str(dataset), "dataset", Fields("sentence"))
