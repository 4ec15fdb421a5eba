"""Reproducible selection of calibration and held-out samples that never overlap.

Each distinct sample gets a seeded pseudo-random rank (a keyed hash of its text), and the
samples with the lowest ranks are taken: a uniform random sample of the distinct samples,
found in one streaming pass with memory for only the samples kept (no set of everything seen).
Stratified selection keeps such a pool per stratum (a label, or a length bucket) and takes
from each in proportion to its share of the stream.
"""

from __future__ import annotations

import hashlib
import heapq
from typing import Callable, Iterable, Literal, Optional, Sequence, TypeVar, Union

from calibration.sources import Sample
from pipeline.core.errors import InputError

Stratify = Optional[Literal["label", "length"]]
MAX_STRATA = 1000
SampleLike = TypeVar("SampleLike", Sample, str)


def _key(sample: Union[Sample, str]) -> bytes:
    return sample.encode("utf-8") if isinstance(sample, str) else sample.key()


def _stratum_of(stratify: Stratify) -> Callable[[Union[Sample, str]], str]:
    if stratify is None:
        return lambda sample: ""
    if stratify == "length":
        # Character-length buckets by powers of two: cheap on a stream, close to token-length order.
        def length_bucket(sample: Union[Sample, str]) -> str:
            text = sample if isinstance(sample, str) else sample.text + (sample.text_pair or "")
            return f"chars<{2 ** len(text).bit_length()}"

        return length_bucket

    def label(sample: Union[Sample, str]) -> str:
        value = None if isinstance(sample, str) else sample.label
        if value is None:
            raise InputError("stratified sampling by label needs a label on every sample; set --label-field")
        return value

    return label


class _Pool:
    """The `size` lowest-ranked distinct samples seen so far (a max-heap on rank)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.heap: list[tuple[int, int, object]] = []  # (-rank, arrival, sample)
        self.ranks: set[int] = set()
        self.seen = 0

    def offer(self, rank: int, arrival: int, sample: object) -> None:
        self.seen += 1
        if rank in self.ranks:
            return  # the same sample again
        if len(self.heap) < self.size:
            heapq.heappush(self.heap, (-rank, arrival, sample))
            self.ranks.add(rank)
        elif rank < -self.heap[0][0]:
            evicted = heapq.heapreplace(self.heap, (-rank, arrival, sample))
            self.ranks.discard(-evicted[0])
            self.ranks.add(rank)

    def ordered(self) -> list[object]:
        return [sample for _, _, sample in sorted(self.heap, key=lambda item: -item[0])]


def _allocate(total: int, weights: dict[str, int], capacity: dict[str, int]) -> dict[str, int]:
    """Split `total` in proportion to `weights` (largest remainders), never above `capacity`;
    what a full stratum cannot take goes to the others in the next round."""
    quota = {name: 0 for name in weights}
    remaining = total
    while remaining > 0:
        open_strata = [name for name in weights if quota[name] < capacity[name]]
        if not open_strata:
            break
        weight_sum = sum(weights[name] for name in open_strata)
        shares = {name: remaining * weights[name] / weight_sum for name in open_strata}
        step = {name: int(shares[name]) for name in open_strata}
        leftover = remaining - sum(step.values())
        for name in sorted(open_strata, key=lambda name: (-(shares[name] - step[name]), name))[:leftover]:
            step[name] += 1
        for name in open_strata:
            amount = min(step[name], capacity[name] - quota[name])
            quota[name] += amount
            remaining -= amount
    return quota


def select_samples(
    samples: Iterable[SampleLike],
    calibration: int,
    heldout: int,
    seed: int,
    source_name: str = "source",
    stratify: Stratify = None,
) -> tuple[list[SampleLike], list[SampleLike]]:
    """Seeded selection of distinct samples in one pass, then a calibration/held-out split."""
    wanted = calibration + heldout
    seed_key = seed.to_bytes(16, "little", signed=False)
    stratum_of = _stratum_of(stratify)
    pools: dict[str, _Pool] = {}
    for arrival, sample in enumerate(samples):
        stratum = stratum_of(sample)
        pool = pools.get(stratum)
        if pool is None:
            if len(pools) >= MAX_STRATA:
                raise InputError(
                    f"{source_name}: more than {MAX_STRATA} distinct strata for --stratify {stratify}; "
                    "stratify by a category field with fewer values"
                )
            pool = pools[stratum] = _Pool(wanted)
        digest = hashlib.blake2b(_key(sample), key=seed_key, digest_size=8).digest()
        pool.offer(int.from_bytes(digest, "big"), arrival, sample)
    ordered = {name: pool.ordered() for name, pool in sorted(pools.items())}
    available = sum(len(items) for items in ordered.values())
    if available < wanted:
        raise InputError(
            f"{source_name} has {available} distinct usable samples, but {calibration} calibration + "
            f"{heldout} held-out were asked for; lower --calib-samples/--heldout-samples or add data"
        )
    weights = {name: pools[name].seen for name in ordered}
    capacity = {name: len(items) for name, items in ordered.items()}
    calibration_quota = _allocate(calibration, weights, capacity)
    left = {name: capacity[name] - calibration_quota[name] for name in ordered}
    heldout_quota = _allocate(heldout, weights, left)
    chosen_calibration: list[tuple[int, SampleLike]] = []
    chosen_heldout: list[tuple[int, SampleLike]] = []
    for name, items in ordered.items():
        first, second = calibration_quota[name], heldout_quota[name]
        chosen_calibration += [(_rank(seed_key, item), item) for item in items[:first]]
        chosen_heldout += [(_rank(seed_key, item), item) for item in items[first : first + second]]
    return [item for _, item in sorted(chosen_calibration, key=_first)], [
        item for _, item in sorted(chosen_heldout, key=_first)
    ]


def _rank(seed_key: bytes, sample: Union[Sample, str]) -> int:
    return int.from_bytes(hashlib.blake2b(_key(sample), key=seed_key, digest_size=8).digest(), "big")


def _first(item: tuple[int, object]) -> int:
    return item[0]


def strata_counts(samples: Sequence[Sample], stratify: Stratify) -> dict[str, int]:
    """How many of the samples fall in each stratum (for the stage's metrics)."""
    stratum_of = _stratum_of(stratify)
    counts: dict[str, int] = {}
    for sample in samples:
        name = stratum_of(sample)
        counts[name] = counts.get(name, 0) + 1
    return dict(sorted(counts.items()))
