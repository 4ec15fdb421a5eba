"""The sentiment benchmark's data: real Rotten Tomatoes sentences from vaderSentiment's sdist on PyPI."""

from __future__ import annotations

from pathlib import Path

import pytest

from calibration.rotten_tomatoes import fetch_sdist, read_sentences, split
from pipeline.core.errors import MissingDependencyError

CACHE = Path.home() / ".cache" / "quantpipe"


@pytest.fixture(scope="module")
def sentences():
    try:
        return read_sentences(fetch_sdist(CACHE))
    except MissingDependencyError as exc:
        pytest.skip(f"PyPI is not reachable for the vaderSentiment sdist: {exc.message}")


def test_labels_follow_the_human_scores(sentences) -> None:
    assert len(sentences.texts) == 10072  # 10,605 rated sentences less 533 with |score| < 0.5
    assert sum(sentences.labels) == 4996
    assert sentences.texts[2] == "Effective but too tepid biopic" and sentences.labels[2] == 0


def test_heldout_split_is_seeded_and_disjoint(sentences) -> None:
    train, test = split(sentences, 1000, seed=0)
    assert len(test.texts) == 1000 and len(train.texts) == 9072
    overlap = set(train.texts) & set(test.texts)
    assert all(sentences.texts.count(text) > 1 for text in overlap), "only sentences the data holds twice"
    assert split(sentences, 1000, seed=0)[1].texts == test.texts
