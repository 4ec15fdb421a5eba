from __future__ import annotations

import json
import random
import tracemalloc
from collections import Counter
from pathlib import Path

import pytest

from calibration.selection import select_samples
from calibration.sources import Fields, Sample, default_source, open_source
from pipeline.core.errors import InputError


def test_stratified_by_label_follows_the_topics_shares() -> None:
    calibration, heldout = select_samples(default_source(), 100, 50, seed=0, stratify="label")
    counts = Counter(sample.label for sample in calibration)
    assert set(counts) == {"business", "entertainment", "politics", "sports", "tech"}
    # shares of the whole stream, counted independently
    stream = Counter(sample.label for sample in default_source())
    for label, count in counts.items():
        assert abs(count - 100 * stream[label] / sum(stream.values())) < 1.0
    assert sum(Counter(s.label for s in heldout).values()) == 50
    assert not {s.key() for s in calibration} & {s.key() for s in heldout}


def test_stratified_by_length_covers_short_and_long_samples() -> None:
    rng = random.Random(0)
    samples = [Sample("word " * rng.choice([3, 3, 3, 3, 3, 3, 3, 3, 3, 40]) + str(i)) for i in range(2000)]
    calibration, _ = select_samples(samples, 20, 10, seed=1, stratify="length")
    lengths = Counter(len(sample.text) > 100 for sample in calibration)
    assert lengths[True] == 2 and lengths[False] == 18, "1 in 10 long samples: 2 of 20, not left to chance"


def test_label_stratification_needs_labels() -> None:
    with pytest.raises(InputError, match="needs a label on every sample; set --label-field"):
        select_samples([Sample("no label here")] * 3, 1, 1, seed=0, stratify="label")


def test_selection_keeps_only_what_it_selects_in_memory(tmp_path: Path) -> None:
    """A 12 MB JSONL streams through selection with a few hundred kB of Python allocations."""
    path = tmp_path / "big.jsonl"
    base = [sample.text for _, sample in zip(range(500), default_source())]
    with path.open("w", encoding="utf-8") as handle:
        variant = 0
        while handle.tell() < 12 * 1024 * 1024:
            for sentence in base:
                handle.write(json.dumps({"text": f"{sentence} (variant {variant})", "id": variant}) + "\n")
            variant += 1
    source = open_source(str(path), fields=Fields("text"))
    tracemalloc.start()
    calibration, heldout = select_samples(source, 64, 32, seed=0, source_name=source.name)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(calibration) == 64 and len(heldout) == 32
    assert peak < 2 * 1024 * 1024, f"peak {peak} bytes: the file was not streamed"
