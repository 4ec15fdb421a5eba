"""Rotten Tomatoes review sentences with human sentiment scores (Hutto & Gilbert, ICWSM 2014).

They ship in the source distribution of vaderSentiment 3.3.2 on PyPI (the wheel lacks them):
10,605 sentences scored -4..+4 by human raters. Binary labels: score > 0 is positive; sentences
with |score| < 0.5 are dropped as neutral.
"""

from __future__ import annotations

import io
import random
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.errors import InputError, MissingDependencyError

SDIST = "vaderSentiment-3.3.2.tar.gz"
MEMBER = "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"
NEUTRAL_BAND = 0.5


@dataclass(frozen=True)
class LabelledSentences:
    texts: list[str]
    labels: list[int]


def fetch_sdist(cache: Path) -> Path:
    """The sdist from PyPI (a package registry, not a model hub), downloaded once into the cache."""
    target = cache / SDIST
    if target.is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
         "vaderSentiment==3.3.2", "-d", str(cache)],
        capture_output=True, text=True,
    )
    if result.returncode != 0 or not target.is_file():
        raise MissingDependencyError(
            "cannot download the vaderSentiment 3.3.2 source distribution from PyPI; "
            f"download {SDIST} by hand and put it in {cache}"
        )
    return target


def read_sentences(sdist: Path) -> LabelledSentences:
    try:
        with tarfile.open(sdist) as outer:
            inner_file = outer.extractfile("vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz")
            if inner_file is None:
                raise KeyError("hutto_ICWSM_2014.tar.gz")
            with tarfile.open(fileobj=io.BytesIO(inner_file.read())) as inner:
                member = inner.extractfile(MEMBER)
                if member is None:
                    raise KeyError(MEMBER)
                text = member.read().decode("utf-8", errors="replace")
    except (tarfile.TarError, KeyError) as exc:
        raise InputError(f"{sdist} does not hold the ICWSM 2014 movie review data: {exc}") from None
    texts, labels = [], []
    for line in text.splitlines():
        parts = line.split("\t")
        if len(parts) != 3:
            continue
        score = float(parts[1])
        if abs(score) < NEUTRAL_BAND:
            continue
        texts.append(parts[2].strip().replace("''", '"'))
        labels.append(int(score > 0))
    return LabelledSentences(texts, labels)


def split(data: LabelledSentences, heldout: int, seed: int) -> tuple[LabelledSentences, LabelledSentences]:
    order = list(range(len(data.texts)))
    random.Random(seed).shuffle(order)
    test, train = order[:heldout], order[heldout:]
    pick = lambda idx: LabelledSentences([data.texts[i] for i in idx], [data.labels[i] for i in idx])  # noqa: E731
    return pick(train), pick(test)
