from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import onnx
import pytest

from calibration.batches import load_batches
from calibration.ranges import RangeCache
from pipeline.build.runner import CACHE_DIR, run_build
from pipeline.config import load_config
from pipeline.core.errors import InputError
from pipeline.core.progress import Progress
from pipeline.models.registry import inspect_model
from pipeline.stages.base import StageContext
from pipeline.stages.calibrate import CACHE_FILE, CalibrateStage
from tests.calibration.conftest import SOURCE_KINDS, bbc_rows, write_source


def test_calibration_and_heldout_never_overlap(default_build) -> None:
    calibrate = default_build.outputs["calibrate"]
    samples = json.loads(calibrate.path("samples.json").read_text())
    assert len(samples["calibration"]) == 128
    assert len(samples["heldout"]) == 256
    texts = {kind: {sample["text"] for sample in samples[kind]} for kind in ("calibration", "heldout")}
    assert len(texts["calibration"]) == 128 and len(texts["heldout"]) == 256
    assert not texts["calibration"] & texts["heldout"]
    heldout = load_batches(calibrate.path("heldout.safetensors"))
    assert sum(len(batch["input_ids"]) for batch in heldout) == 256
    assert {tuple(sorted(batch)) for batch in heldout} == {("attention_mask", "input_ids", "token_type_ids")}
    assert len({batch["input_ids"].shape[1] for batch in heldout}) > 1, "batches follow the samples' lengths"


def test_default_build_writes_a_calibration_cache_of_the_fp32_graph(default_build) -> None:
    calibrate = default_build.outputs["calibrate"]
    cache = RangeCache.load(calibrate.path(CACHE_FILE))
    assert cache.method == "minmax" and cache.fingerprint["model"] == default_build.outputs["optimize"].files["model.onnx"]
    assert cache.fingerprint["data"] == calibrate.files["calibration.safetensors"]
    graph = onnx.load(str(default_build.outputs["optimize"].path("model.onnx")))
    matmul_inputs = {node.input[0] for node in graph.graph.node if node.op_type == "MatMul"}
    assert matmul_inputs <= set(cache.ranges), "every MatMul activation has a range"
    low, high = cache.ranges[graph.graph.output[0].name]
    assert -1.0 <= low < 0 < high <= 1.0, "normalized sentence embeddings lie in [-1, 1]"


def _calibrate(default_build, out: Path, **calibration) -> dict[str, bytes]:
    config = load_config(None, {"calibration": {"samples": 8, "heldout_samples": 4, **calibration}})
    context = StageContext(
        config, inspect_model(None, None), Progress(quiet=True), {"optimize": default_build.outputs["optimize"]}
    )
    out.mkdir(parents=True)
    CalibrateStage().run(context, out)
    return {name: (out / name).read_bytes() for name in CalibrateStage.outputs}


@pytest.mark.parametrize("kind", ("default",) + SOURCE_KINDS)
def test_same_seed_same_cache_bytes_other_seed_other_bytes(kind: str, default_build, tmp_path: Path) -> None:
    options: dict = {}
    if kind != "default":
        path, fields = write_source(kind, bbc_rows(40), tmp_path / "data")
        options = {"source": str(path), **{k: v for k, v in fields.items() if k != "label_field"}}
    first = _calibrate(default_build, tmp_path / "a", seed=1, **options)
    again = _calibrate(default_build, tmp_path / "b", seed=1, **options)
    other = _calibrate(default_build, tmp_path / "c", seed=2, **options)
    assert first == again, "byte for byte, every output"
    assert first[CACHE_FILE] != other[CACHE_FILE]
    assert first["calibration.safetensors"] != other["calibration.safetensors"]
    if "text_pair_field" in options:
        assert load_batches(tmp_path / "a" / "calibration.safetensors")[0]["token_type_ids"].max() == 1


def test_too_long_samples_are_refused_by_policy_and_nothing_is_half_written(cached_copy: Path, tmp_path: Path) -> None:
    path = tmp_path / "long.txt"
    path.write_text("".join(f"sample {i} " + "very long text " * 100 + "\n" for i in range(20)), encoding="utf-8")
    config = load_config(None, {
        "output_dir": str(cached_copy),
        "calibration": {"source": str(path), "samples": 8, "heldout_samples": 4, "long_samples": "error"},
    })
    before = sorted(p.name for p in (cached_copy / CACHE_DIR).iterdir())
    with pytest.raises(InputError, match=r"^8 of 8 calibration samples from text:long.txt are longer than --max-length 128"):
        run_build(config, Progress(quiet=True), stop_after="calibrate")
    assert sorted(p.name for p in (cached_copy / CACHE_DIR).iterdir()) == before, "no stage dir, no temp dir"


def test_requantizing_with_other_options_reuses_the_calibration(cached_copy: Path) -> None:
    config = load_config(None, {
        "output_dir": str(cached_copy),
        "quantization": {"mode": "static", "exclude": ["Attention"]},
    })
    result = run_build(config, Progress(quiet=True), stop_after="quantize")
    assert result.outputs["calibrate"].reused, "the ranges come from the cache; calibration did not run again"
    assert not result.outputs["quantize"].reused
    quantized = onnx.load(str(result.outputs["quantize"].path("model.onnx")))
    ops = Counter(node.op_type for node in quantized.graph.node)
    assert ops["QuantizeLinear"] > 0 and ops["Attention"] == 6
    assert result.outputs["quantize"].metrics["calibration_method"] == "minmax"
