"""A GGUF file of a non-Llama family (qwen2), written in the test (tests/tiny_gguf.py), built for the CPU.

Q4_K_M is llama.cpp's most used mix (Q4_K matrices, Q6_K for some attn_v/ffn_down): the 4-bit build keeps
every Q4_K sub-block on its own grid (no second rounding) and rounds the Q6_K ones once; the perplexity
gate holds. Q8_0 (slow): rounded once onto 4 bits, gate holds.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("gguf")

CHEAP = {"calibration": {"samples": 16, "heldout_samples": 24, "max_length": 32}, "verify": {"greedy_prompts": 2}}


def _build(tmp_path_factory: pytest.TempPathFactory, file_type: str):
    from pipeline.build.runner import run_build
    from pipeline.config import load_config
    from pipeline.core.progress import Progress
    from tests.tiny_gguf import write_tiny_gguf

    folder = tmp_path_factory.mktemp(f"gguf-{file_type}")
    gguf_file = write_tiny_gguf(folder / f"tiny-qwen2-{file_type}.gguf", file_type)
    config = load_config(None, {"output_dir": str(folder / "build"), "model": {"path": str(gguf_file)}, **CHEAP})
    return gguf_file, run_build(config, Progress(quiet=True))


@pytest.fixture(scope="module")
def q4_k_m_build(tmp_path_factory: pytest.TempPathFactory):
    return _build(tmp_path_factory, "Q4_K_M")


def _stage(result, name: str) -> dict:
    manifest = json.loads((result.build_dir / "manifest.json").read_text())
    return next(entry for entry in manifest["stages"] if entry["stage"] == name)


def _assert_passed_with_the_perplexity_gate(result) -> None:
    report = json.loads((result.build_dir / "parity.json").read_text())
    assert report["status"] == "pass" and not report["failures"]
    metrics = _stage(result, "verify")["metrics"]["primary"]
    assert metrics["perplexity_increase"] <= 0.08  # the decoder default gate


def test_q4_k_m_qwen2_gguf_builds_for_the_cpu_within_the_perplexity_gate(q4_k_m_build) -> None:
    from pipeline.models.registry import inspect_model

    gguf_file, result = q4_k_m_build
    model = inspect_model(str(gguf_file), None)
    assert model.architecture.model_type == "qwen2" and model.is_decoder
    assert result.passed
    _assert_passed_with_the_perplexity_gate(result)
    export = _stage(result, "export")["metrics"]
    assert max(export["torch_parity_max_abs"].values()) <= 1e-4  # against transformers' own GGUF load
    assert export["kv_cache"]["kv_heads"] == 2 and export["kv_cache"]["tied_lm_head"]


def test_every_q4_k_sub_block_keeps_its_grid_and_the_q6_k_blocks_are_rounded(q4_k_m_build) -> None:
    """The body's blocks of 32 kept exactly are the Q4_K tensors' blocks, no more (Q6_K has 64 levels)."""
    from gguf import GGMLQuantizationType, GGUFReader

    gguf_file, result = q4_k_m_build
    tensors = [t for t in GGUFReader(str(gguf_file)).tensors if t.name.startswith("blk.") and len(t.shape) == 2]
    q4_k = sum(int(np.prod(t.shape)) // 32 for t in tensors if t.tensor_type == GGMLQuantizationType.Q4_K)
    q6_k = sum(int(np.prod(t.shape)) // 32 for t in tensors if t.tensor_type == GGMLQuantizationType.Q6_K)
    assert q4_k and q6_k
    quantize = _stage(result, "quantize")["metrics"]
    assert quantize["body_blocks"] == q4_k + q6_k
    assert quantize["source_grid_blocks"] == q4_k


@pytest.mark.slow
def test_q8_0_qwen2_gguf_builds_for_the_cpu_within_the_perplexity_gate(tmp_path_factory) -> None:
    _, result = _build(tmp_path_factory, "Q8_0")
    _assert_passed_with_the_perplexity_gate(result)
    assert _stage(result, "quantize")["metrics"]["source_grid_blocks"] == 0
