from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from calibration.batches import check_long_samples, load_batches, save_batches, to_batches, token_lengths
from calibration.readers import BatchReader, feed, length_distribution, optimization_profile
from calibration.sources import Sample, default_source
from pipeline.core.errors import InputError
from pipeline.models.registry import inspect_model, load_tokenizer

NAMES = ("input_ids", "attention_mask", "token_type_ids")


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(inspect_model(None, None))


@pytest.fixture(scope="module")
def sentences() -> list[Sample]:
    return [sample for _, sample in zip(range(64), default_source())]


def test_batches_follow_the_samples_lengths_in_buckets(tokenizer, sentences) -> None:
    batches = to_batches(sentences, tokenizer, NAMES, batch_size=8, max_length=128)
    widths = [batch["input_ids"].shape[1] for batch in batches]
    assert widths == sorted(widths) and len(set(widths)) > 2, "length-sorted batches of several widths"
    assert all(width % 8 == 0 or width == 128 for width in widths)
    real = np.concatenate([batch["attention_mask"].sum(axis=1) for batch in batches])
    assert sorted(real.tolist()) == sorted(token_lengths(sentences, tokenizer, 128).lengths)
    padded = sum(batch["input_ids"].size for batch in batches)
    fixed = to_batches(sentences, tokenizer, NAMES, batch_size=8, max_length=128, padding="max_length")
    assert {batch["input_ids"].shape[1] for batch in fixed} == {128}
    assert padded < 0.5 * sum(batch["input_ids"].size for batch in fixed), "buckets cut the padding"


def test_sentence_pairs_use_the_tokenizer_pair_encoding(tokenizer) -> None:
    pairs = [Sample("The market rose on Monday.", "Shares climbed at the open.")]
    batch = to_batches(pairs, tokenizer, NAMES, batch_size=8, max_length=64)[0]
    assert batch["token_type_ids"].max() == 1, "the second text is segment 1"
    ids = batch["input_ids"][0][batch["attention_mask"][0] == 1].tolist()
    assert ids.count(tokenizer.sep_token_id) == 2


def test_long_samples_are_counted_or_refused(tokenizer) -> None:
    long = [Sample("word " * 300), Sample("a short sentence")]
    stats = token_lengths(long, tokenizer, 64)
    assert stats.too_long == 1 and stats.summary()["truncated"] == 1
    check_long_samples(stats, long, "truncate", "calibration", "src")
    with pytest.raises(InputError, match=r"1 of 2 calibration samples from src are longer than --max-length 64 tokens"):
        check_long_samples(stats, long, "error", "calibration", "src")
    batches = to_batches(long, tokenizer, NAMES, batch_size=2, max_length=64)
    assert batches[0]["input_ids"].shape == (2, 64)


def test_batches_round_trip_byte_for_byte(tokenizer, sentences, tmp_path: Path) -> None:
    batches = to_batches(sentences[:20], tokenizer, NAMES, batch_size=8, max_length=128)
    save_batches(tmp_path / "a.safetensors", batches)
    loaded = load_batches(tmp_path / "a.safetensors")
    save_batches(tmp_path / "b.safetensors", loaded)
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()


def test_readers_for_quantizers_and_tensorrt(tokenizer, sentences) -> None:
    from onnxruntime.quantization import CalibrationDataReader as OrtReader

    batches = to_batches(sentences, tokenizer, NAMES, batch_size=8, max_length=128)
    reader = BatchReader(batches)
    assert isinstance(reader, OrtReader)
    assert sum(1 for _ in iter(reader.get_next, None)) == len(batches)
    reader.rewind()
    assert reader.get_next() is batches[0]
    assert list(feed(batches[:1], ["input_ids", "attention_mask"]))[0].keys() == {"input_ids", "attention_mask"}
    distribution = length_distribution(batches)
    assert sum(distribution.values()) == 64
    profile = optimization_profile(batches)
    low, opt, high = profile["input_ids"]
    assert low == (1, min(distribution)) and high == (8, max(distribution))
    assert low[1] <= opt[1] <= high[1] and opt[0] == 8
