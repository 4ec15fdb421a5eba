"""The sentiment benchmark's data: real Rotten Tomatoes sentences from vaderSentiment's sdist on PyPI.

The one data file the benchmark reads ships in tests/data/rotten_tomatoes (MIT, see its README); the test
packs it as the sdist holds it (a tarball inside the sdist tarball), so `read_sentences` reads exactly the
layout `fetch_sdist` downloads, and nothing is downloaded or skipped at test time."""

from __future__ import annotations

import hashlib
import io
import lzma
import tarfile
from pathlib import Path

import pytest

from calibration.rotten_tomatoes import MEMBER, SDIST, read_sentences, split

DATA = Path(__file__).parents[1] / "data" / "rotten_tomatoes" / "movieReviewSnippets_GroundTruth.txt.xz"
SHA256 = "c8293b0d942e90e223ea2c0955d969040d1a1be514a978b9af0698940bd13350"  # of the file in the sdist


def _add(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def sdist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    text = lzma.decompress(DATA.read_bytes())
    assert hashlib.sha256(text).hexdigest() == SHA256, "the shipped file is the sdist's, unchanged"
    inner = io.BytesIO()
    with tarfile.open(fileobj=inner, mode="w:gz") as archive:
        _add(archive, MEMBER, text)
    path = tmp_path_factory.mktemp("vader") / SDIST
    with tarfile.open(path, "w:gz") as archive:
        _add(archive, "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz", inner.getvalue())
    return path


@pytest.fixture(scope="module")
def sentences(sdist: Path):
    return read_sentences(sdist)


def test_labels_follow_the_human_scores(sentences) -> None:
    assert len(sentences.texts) == 10072  # 10,605 rated sentences less 533 with |score| < 0.5
    assert sum(sentences.labels) == 4996
    assert sentences.texts[2] == "Effective but too tepid biopic" and sentences.labels[2] == 0
    assert sentences.texts[0].startswith('The Rock is destined to be the 21st Century\'s new "Conan"')


def test_heldout_split_is_seeded_and_disjoint(sentences) -> None:
    train, test = split(sentences, 1000, seed=0)
    assert len(test.texts) == 1000 and len(train.texts) == 9072
    overlap = set(train.texts) & set(test.texts)
    assert all(sentences.texts.count(text) > 1 for text in overlap), "only sentences the data holds twice"
    assert split(sentences, 1000, seed=0)[1].texts == test.texts
