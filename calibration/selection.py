"""Reproducible selection of calibration and held-out samples that never overlap."""

from __future__ import annotations

import hashlib
import random
from typing import Iterable

from pipeline.errors import InputError


def select_samples(
    samples: Iterable[str], calibration: int, heldout: int, seed: int, source_name: str = "source"
) -> tuple[list[str], list[str]]:
    """Seeded reservoir sampling over the distinct samples of a stream, then a disjoint split.

    Streams: memory holds the reservoir and one 16-byte digest per distinct sample.
    """
    wanted = calibration + heldout
    rng = random.Random(seed)
    reservoir: list[str] = []
    seen: set[bytes] = set()
    for text in samples:
        key = hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()
        if key in seen:
            continue
        seen.add(key)
        if len(reservoir) < wanted:
            reservoir.append(text)
        else:
            slot = rng.randrange(len(seen))
            if slot < wanted:
                reservoir[slot] = text
    if len(reservoir) < wanted:
        raise InputError(
            f"{source_name} has {len(reservoir)} distinct usable samples, but {calibration} calibration + "
            f"{heldout} held-out were asked for; lower --calib-samples/--heldout-samples or add data"
        )
    rng.shuffle(reservoir)
    return reservoir[:calibration], reservoir[calibration:]
