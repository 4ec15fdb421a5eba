"""Every decoder family as a tiny random model (tests/tiny_decoders.py), on both targets.

Per family: one export + calibrate, shared by one CPU build (4-bit RTN) and one TensorRT build per
precision (int8, fp8, fp16; parity simulated in ONNX Runtime). Cheap settings: 32-token chunks, few
held-out chunks and 2 greedy prompts; each build still runs every stage with its real gates.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from tests.helpers import seed_stage_cache
from tests.tiny_decoders import FAMILIES, tiny_decoder_config, write_tiny_decoder

pytest.importorskip("gguf")

CALIBRATION = {"samples": 16, "heldout_samples": 24, "max_length": 32}  # 20 prompts need 24 held-out sentences
CHEAP = {"calibration": CALIBRATION, "verify": {"greedy_prompts": 2}}
PRECISIONS = ("int8", "fp8", "fp16")
TORCH_MAX_ABS = 1e-4
# Every family at every precision: one TensorRT build each (export and calibrate are shared per family); int8
# (Q/DQ placement, calibration, the fallback search) in the default suite, fp8 and fp16 with `make test-slow`.
TRT_CASES = [pytest.param(model_type, precision, marks=() if precision == "int8" else pytest.mark.slow)
             for model_type in sorted(FAMILIES) for precision in PRECISIONS]


@pytest.fixture(scope="module")
def family_builds(tmp_path_factory: pytest.TempPathFactory):
    """`family_builds(model_type, target, precision=None)`: the folder and its build, each made once."""
    from pipeline.build.runner import run_build
    from pipeline.config import load_config
    from pipeline.core.progress import Progress

    folders: dict[str, object] = {}
    bases: dict[str, object] = {}
    builds: dict[tuple[str, str, str | None], object] = {}

    def config(model_type: str, target: str, precision: str | None, out) -> object:
        overrides = {"output_dir": str(out), "target": target, "model": {"path": str(folders[model_type])}, **CHEAP}
        if precision:
            overrides["trt"] = {"precision": precision}
        return load_config(None, overrides)

    def build(model_type: str, target: str = "cpu", precision: str | None = None):
        if model_type not in folders:
            folders[model_type] = write_tiny_decoder(model_type, tmp_path_factory.mktemp(f"tiny-{model_type}"))
            out = tmp_path_factory.mktemp(f"base-{model_type}")
            bases[model_type] = run_build(config(model_type, "cpu", None, out), Progress(quiet=True),
                                          stop_after="calibrate").outputs
        key = (model_type, target, precision)
        if key not in builds:
            out = tmp_path_factory.mktemp(f"{model_type}-{target}-{precision or 'rtn'}")
            seed_stage_cache(out, bases[model_type], ("export", "calibrate"))
            builds[key] = run_build(config(model_type, target, precision, out), Progress(quiet=True))
        return folders[model_type], builds[key]

    return build


def _manifest(result) -> dict:
    return json.loads((result.build_dir / "manifest.json").read_text())


def _stage(manifest: dict, name: str) -> dict:
    return next(entry for entry in manifest["stages"] if entry["stage"] == name)


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_cpu_build_passes_parity_and_the_export_matches_transformers(family_builds, model_type: str) -> None:
    folder, result = family_builds(model_type, "cpu")
    manifest = _manifest(result)
    assert manifest["status"] == "passed" and manifest["model"]["family"] == "decoder"
    assert [entry["stage"] for entry in manifest["stages"]] == ["export", "calibrate", "quantize", "verify"]
    export = _stage(manifest, "export")["facts"]
    # Prefill and 16 cached decode steps against transformers with its own cache (sliding layers included).
    assert max(export["torch_parity_max_abs"].values()) <= TORCH_MAX_ABS
    config = tiny_decoder_config(model_type, 1)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    assert export["kv_cache"] == {**export["kv_cache"], "layers": 2, "kv_heads": config.num_key_value_heads,
                                  "head_dim": head_dim}
    report = json.loads((result.build_dir / "parity.json").read_text())
    assert report["status"] == "pass" and not report["failures"]


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_fp32_graph_gives_the_logits_of_transformers_without_a_cache(family_builds, model_type: str) -> None:
    """Independent of the export's own check: a plain transformers forward (no cache, no wrapper) over a
    prompt longer than the sliding windows, against the graph with an empty past, within 1e-4."""
    import torch
    from transformers import AutoModelForCausalLM

    from pipeline.models.decoding import KVDecoder

    folder, result = family_builds(model_type, "cpu")
    graph = result.build_dir / "model.fp32.onnx"
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    ids = np.random.default_rng(1).integers(0, model.config.vocab_size, size=(2, 24), dtype=np.int64)
    with torch.inference_mode():
        expected = model(input_ids=torch.from_numpy(ids)).logits.numpy()
    with KVDecoder(graph) as decoder:
        actual, _ = decoder.step(ids, np.ones_like(ids), decoder.empty_past(2))
    assert float(np.abs(expected).std()) > 0.5  # logits of a realistic size, or the bound means nothing
    assert float(np.abs(expected - actual).max()) <= TORCH_MAX_ABS


@pytest.mark.parametrize("model_type, precision", TRT_CASES)
def test_trt_build_passes_parity_with_profiles_of_the_family_cache(family_builds, model_type: str,
                                                                   precision: str) -> None:
    _, result = family_builds(model_type, "trt", precision)
    manifest = _manifest(result)
    assert manifest["status"] == "passed"
    assert [entry["stage"] for entry in manifest["stages"]] == ["export", "calibrate", "precision", "verify", "bundle"]
    report = json.loads((result.build_dir / "parity.json").read_text())
    assert report["status"] == "pass" and not report["failures"]
    kv = _stage(manifest, "export")["facts"]["kv_cache"]
    bundle = json.loads((result.build_dir / "trt" / "build_config.json").read_text())
    decode = bundle["profiles"][1]["shapes"]["past_key_values.1.value"]
    batch, past = bundle["profile_ranges"]["batch"][2], bundle["profile_ranges"]["decode_past"][2]
    assert decode["max"] == f"{batch}x{kv['kv_heads']}x{past}x{kv['head_dim']}"
    graph = onnx.load(str(result.build_dir / "trt" / "model.onnx"), load_external_data=False)
    past_input = next(i for i in graph.graph.input if i.name == "past_key_values.0.key")
    dims = [d.dim_value or d.dim_param for d in past_input.type.tensor_type.shape.dim]
    assert dims[1] == kv["kv_heads"] and dims[3] == kv["head_dim"]
