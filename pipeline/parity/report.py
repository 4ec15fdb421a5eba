"""The parity report: one pydantic model for every build kind (encoder, decoder LLM, TensorRT engine).

parity.json is `report.model_dump(mode="json")`, fields in declaration order; readers go through
`ParityReport.model_validate`. Light to import (pydantic only): `pipeline report check` reads it.
`python -m pipeline.parity.report --schema` prints the JSON Schema (docs/parity-report.schema.json).
"""

from __future__ import annotations

import json
import sys
from typing import Any, Literal, Mapping, Optional, Sequence

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer, model_validator

from pipeline.parity.gates import PARITY_SCHEMA_VERSION, Check, relation

SCHEMA_FILE = "docs/parity-report.schema.json"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Artifact(_Strict):
    description: str
    sha256: str


class Candidate(Artifact):
    fp32_nodes: list[str] = Field(default_factory=list, description="Nodes kept in FP32 (--exclude, fallback search).")


class Heldout(_Strict):
    source: str
    samples: int
    batches: int


class Threshold(_Strict):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # an infinite threshold gates nothing

    output: str
    metric: str
    threshold: float
    relation: Literal[">=", "<="]

    @model_validator(mode="after")
    def _relation_of_metric(self) -> "Threshold":
        if self.relation != relation(self.metric):
            raise ValueError(f"a threshold on {self.metric} is a '{relation(self.metric)}' bound, not '{self.relation}'")
        return self


class CheckResult(_Strict):
    output: str
    metric: str
    value: Optional[float] = Field(description="null: the gated metric was not measured (the check fails)")
    threshold: float
    passed: bool

    def to_check(self) -> Check:
        return Check(self.output, self.metric, self.value, self.threshold, self.passed)


class Histogram(_Strict):
    log10_abs_error_edges: list[float]
    counts: list[int]


# Metrics with a closed range: a value outside it (an infinite cosine) is a damaged report, not a pass.
_RANGES = tuple((name, -1.0001, 1.0001) for name in ("cosine_mean", "cosine_min")) + tuple(
    (name, 0.0, 1.0) for name in ("top1_agreement", "greedy_token_agreement", "greedy_prefix_agreement",
                                  "accuracy_reference", "accuracy_candidate"))


class OutputMetrics(_Strict):
    """One output's statistics; metrics a build kind does not measure are absent (never null) on disk."""

    rows: int = Field(description="Rows compared: samples, or real (unpadded) tokens for per-token outputs.")
    max_abs: float
    mean_abs: float
    p99_abs: float
    relative_l2: float
    cosine_mean: float
    cosine_min: float
    median_abs: Optional[float] = None
    max_rel: Optional[float] = None
    mean_rel: Optional[float] = None
    median_rel: Optional[float] = None
    p99_rel: Optional[float] = None
    snr_db: Optional[float] = None
    top1_agreement: Optional[float] = None
    # Classifiers with a labelled evaluation file.
    accuracy_reference: Optional[float] = None
    accuracy_candidate: Optional[float] = None
    accuracy_drop: Optional[float] = None
    labelled_samples: Optional[int] = None
    # Decoder LLMs.
    perplexity_reference: Optional[float] = None
    perplexity_candidate: Optional[float] = None
    perplexity_increase: Optional[float] = None
    perplexity_tokens: Optional[int] = None
    greedy_token_agreement: Optional[float] = None
    greedy_prefix_agreement: Optional[float] = None
    greedy_identical_sequences: Optional[int] = None
    greedy_prompts: Optional[int] = None
    greedy_new_tokens: Optional[int] = None
    decode_tokens_per_s_reference: Optional[float] = None
    decode_tokens_per_s_candidate: Optional[float] = None
    decode_speedup: Optional[float] = None
    histogram: Optional[Histogram] = None

    @model_validator(mode="after")
    def _in_range(self) -> "OutputMetrics":
        for name, low, high in _RANGES:
            value = getattr(self, name)
            if value is not None and not low <= value <= high:  # NaN is caught here too
                raise ValueError(f"{name} {value} is outside [{low}, {high}]")
        return self

    @model_serializer(mode="wrap")
    def _without_absent(self, handler: Any) -> dict[str, Any]:
        return {key: value for key, value in handler(self).items() if value is not None}

    def values(self) -> dict[str, float]:
        """The gateable numbers (everything but the histogram), by metric name."""
        return {name: value for name in type(self).model_fields
                if name != "histogram" and (value := getattr(self, name)) is not None}


class Evaluation(_Strict):
    file: str
    samples: int


class Layer(_Strict):
    order: int
    node: str
    op_type: str
    tensor: str
    candidate_tensor: str
    relative_l2: float
    introduced: float
    snr_db: float
    cosine: float
    max_abs: float


class Localization(_Strict):
    batches: int
    matched_tensors: int
    layers: list[Layer]
    ranked: list[Layer]
    first_divergent: Optional[Layer]
    note: Optional[str] = None


class Size(_Strict):
    fp32_bytes: int
    quantized_bytes: int
    ratio: float


class ParityReport(_Strict):
    schema_version: Literal[PARITY_SCHEMA_VERSION]  # type: ignore[valid-type]
    status: Literal["pass", "fail"]
    family: Literal["encoder", "decoder"]
    target: Literal["cpu", "trt"]
    task: str
    primary_output: str
    reference: Artifact
    candidate: Candidate
    heldout: Heldout
    thresholds: list[Threshold]
    outputs: dict[str, OutputMetrics]
    checks: list[CheckResult]
    failures: list[str]
    export_parity: dict[str, float] = Field(description="ONNX Runtime against PyTorch, max abs difference (export stage).")
    evaluation: Optional[Evaluation] = None
    localization: Optional[Localization] = None
    size: Optional[Size] = None

    # Sorted: a fresh export and a cached one (stage.json is written sorted) must give the same bytes.
    @field_validator("export_parity")
    @classmethod
    def _sorted(cls, value: dict[str, float]) -> dict[str, float]:
        return dict(sorted(value.items()))

    @model_validator(mode="after")
    def _consistent(self) -> "ParityReport":
        if self.primary_output not in self.outputs:
            raise ValueError(f"primary_output '{self.primary_output}' is not among the outputs")
        failed = [check for check in self.checks if not check.passed]
        if (self.status == "fail") != bool(failed) or len(self.failures) != len(failed):
            raise ValueError(f"status '{self.status}' and {len(self.failures)} failure(s) do not match "
                             f"{len(failed)} failing check(s)")
        return self

    def metric_values(self) -> dict[str, dict[str, float]]:
        return {name: metrics.values() for name, metrics in self.outputs.items()}

    def recorded_thresholds(self) -> dict[tuple[str, str], float]:
        return {(entry.output, entry.metric): entry.threshold for entry in self.thresholds}

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), indent=2) + "\n"


def make_report(
    *,
    family: Literal["encoder", "decoder"],
    target: Literal["cpu", "trt"],
    task: str,
    primary_output: str,
    reference: Artifact,
    candidate: Candidate,
    heldout: Heldout,
    thresholds: Mapping[tuple[str, str], float],
    outputs: Mapping[str, Mapping[str, Any]],
    checks: Sequence[Check],
    export_parity: Mapping[str, float],
    evaluation: Optional[Evaluation] = None,
    localization: Optional[Mapping[str, Any]] = None,
    size: Optional[Size] = None,
) -> ParityReport:
    """The report of one parity run; status and failures follow from the checks."""
    failures = [check.description for check in checks if not check.passed]
    return ParityReport(
        schema_version=PARITY_SCHEMA_VERSION,
        status="fail" if failures else "pass",
        family=family,
        target=target,
        task=task,
        primary_output=primary_output,
        reference=reference,
        candidate=candidate,
        heldout=heldout,
        thresholds=[Threshold(output=output, metric=metric, threshold=value, relation=relation(metric))
                    for (output, metric), value in sorted(thresholds.items())],
        # `output` of a measured OutputMetrics repeats the key.
        outputs={name: OutputMetrics.model_validate({k: v for k, v in values.items() if k != "output"})
                 for name, values in outputs.items()},
        checks=[CheckResult(output=c.output, metric=c.metric, value=c.value, threshold=c.threshold, passed=c.passed)
                for c in checks],
        failures=failures,
        export_parity=dict(export_parity),
        evaluation=evaluation,
        localization=None if localization is None else Localization.model_validate(localization),
        size=size,
    )


def json_schema() -> dict[str, Any]:
    schema = ParityReport.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = f"Quantpipe parity report (parity.json), schema version {PARITY_SCHEMA_VERSION}"
    return schema


def render_schema() -> str:
    return json.dumps(json_schema(), indent=2) + "\n"


def main(argv: Sequence[str]) -> int:
    if list(argv) != ["--schema"]:
        print("usage: python -m pipeline.parity.report --schema > " + SCHEMA_FILE, file=sys.stderr)
        return 2
    sys.stdout.write(render_schema())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
