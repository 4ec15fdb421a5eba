"""What a stage tells the stages after it: typed facts, declared per stage, recorded in stage.json and the manifest.

A stage's `run()` returns its metrics (what reports and people read); the facts are the part of them
that other stages depend on, validated against the stage's declared model when the stage finishes
(a missing or mistyped fact fails that stage, not a later one). Downstream stages read facts only,
through `StageContext.facts`, never another stage's free-form metrics.
"""

from __future__ import annotations

from typing import Optional

from pydantic import BaseModel, ConfigDict

from pipeline.models.kv_cache import CacheLayout

# Bump when a facts model changes incompatibly: cached stage outputs recorded with another version re-run.
FACTS_VERSION = 1


class Facts(BaseModel):
    # extra="ignore": the facts are a typed subset of the stage's metrics.
    model_config = ConfigDict(extra="ignore", frozen=True, strict=True)


class NoFacts(Facts):
    pass


class KvCacheFacts(Facts):
    layers: int
    kv_heads: int
    head_dim: int

    @property
    def layout(self) -> CacheLayout:
        return CacheLayout(self.layers, self.kv_heads, self.head_dim)


class ExportFacts(Facts):
    opset: int
    parameters: int
    input_names: Optional[list[str]] = None  # encoders: the exported graph's own inputs, in order
    torch_parity_max_abs: dict[str, float]  # output name -> largest difference against PyTorch
    kv_cache: Optional[KvCacheFacts] = None  # decoder LLMs: the past/present tensors of the graph


class OptimizeFacts(Facts):
    fusions: dict[str, int]  # fused op type -> count
    export_parity_max_abs: dict[str, float]


class TokenStats(Facts):
    min: int
    p50: float
    p90: float
    max: int


class CalibrationFacts(Facts):
    source: str
    heldout_samples: int
    calibration_tokens: Optional[TokenStats] = None  # encoders: token lengths of the calibration samples


class QuantizeFacts(Facts):
    """CPU INT8 (encoders)."""

    excluded_nodes: list[str]  # kept in FP32 (by --exclude or the fallback search)
    fallback: Optional[dict[str, object]] = None  # the fallback search's record, when it ran


class WeightOnlyFacts(Facts):
    """CPU weight-only 4/8-bit (decoder LLMs)."""

    algorithm: str
    bits: int
    block_size: int
    zero_point: str = "int"
    lm_head: str
    embeddings: str
    vocab_block_size: Optional[int] = None  # blocks of the lm_head and embedding (the body's before stage version 9)
    shared_vocabulary: bool = False  # the 8-bit embedding reads the lm_head's codes


class PrecisionFacts(Facts):
    """TensorRT: the graph that carries its precision."""

    kept_higher_precision: list[str] = []  # FP16 graphs keep no node in higher precision by the search
    kept_precision: Optional[str] = None
    # What the graph carries when it is not --precision's (a pre-quantized checkpoint's INT4 weights)
    graph_precision: Optional[str] = None


class VerifyFacts(Facts):
    passed: bool
    failures: list[str]


class BundleFacts(Facts):
    engine: str  # "built", or "not built: <why>"
