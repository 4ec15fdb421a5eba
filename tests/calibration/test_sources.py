from __future__ import annotations

from pathlib import Path

import pytest

from calibration.selection import select_samples
from calibration.sources import default_source, open_source
from pipeline.errors import InputError


def test_default_corpus_is_real_english_news() -> None:
    source = default_source()
    assert len(source.files) == 2225
    first = next(iter(source))
    assert first.startswith("Quarterly profits at US media giant TimeWarner jumped 76%")
    assert "(£600m)" in first, "decoded as UTF-8, not as Latin-1 mojibake"


def test_text_file_streams_lines(tmp_path: Path) -> None:
    path = tmp_path / "samples.txt"
    path.write_text("first sample here\n\nsecond sample here\n")
    assert list(open_source(str(path))) == ["first sample here", "second sample here"]


@pytest.mark.parametrize(
    ("content", "message"),
    [(None, "not found"), (b"", "is empty"), (b"ok line\n\xff\xfe broken\n", "not UTF-8")],
)
def test_bad_text_sources_get_clear_errors(tmp_path: Path, content: bytes | None, message: str) -> None:
    path = tmp_path / "samples.txt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(InputError, match=message):
        list(open_source(str(path)))


def test_too_few_samples_is_refused() -> None:
    with pytest.raises(InputError, match="3 distinct usable samples"):
        select_samples(["a", "b", "c", "a"], calibration=2, heldout=2, seed=0)


def test_selection_is_seeded_and_disjoint() -> None:
    samples = [f"sample {i}" for i in range(1000)]
    first = select_samples(samples, 100, 50, seed=3)
    assert first == select_samples(samples, 100, 50, seed=3)
    assert first != select_samples(samples, 100, 50, seed=4)
    assert not set(first[0]) & set(first[1])
