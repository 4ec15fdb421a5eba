"""calibrate: select calibration and held-out samples, tokenize them, and compute the per-tensor
activation ranges of the FP32 graph into the calibration cache (calibration_cache.json).

The quantize stage reads the ranges from the cache, so changing quantization options never
runs calibration again; a new method, percentile or sample set does.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any, Optional

from calibration.batches import check_long_samples, save_batches, to_batches, token_lengths
from calibration.ranges import RangeCache, compute_ranges
from calibration.readers import length_distribution
from calibration.selection import select_samples, strata_counts
from calibration.sources import Fields, SampleSource, open_source
from engines.cpu import neural_compressor
from pipeline.config import BuildConfig, CalibrationConfig
from pipeline.core.errors import InputError, StageError
from pipeline.core.hashing import file_sha256
from pipeline.models.registry import ModelInfo, load_tokenizer, tokenizer_fingerprint
from pipeline.stages.base import Stage, StageContext
from pipeline.stages.facts import CalibrationFacts

CACHE_FILE = "calibration_cache.json"


def source_for(settings: CalibrationConfig) -> SampleSource:
    fields = Fields(settings.text_field, settings.text_pair_field, settings.label_field)
    return open_source(settings.source, settings.format, fields)


def check_source(settings: CalibrationConfig) -> None:
    """Fail before any stage runs: a streaming pass over a user's source (the first bad record stops the build,
    naming its file and line); the bundled corpus is read up to its first sample."""
    source = source_for(settings)
    usable = 0
    for _ in source:
        usable += 1
        if settings.source is None:
            break
    if not usable:
        raise InputError(
            f"calibration source {settings.source or source.name} holds no usable sample (blank lines, or "
            f"records whose '{settings.text_field}' field is empty or not text); check the file and --text-field"
        )


class CalibrateStage(Stage):
    name = "calibrate"
    facts = CalibrationFacts
    version = 2
    outputs = ("calibration.safetensors", "heldout.safetensors", "samples.json", CACHE_FILE)

    def __init__(self, ranges_of: Optional[str] = "optimize") -> None:
        # The stage whose FP32 graph the activation ranges are computed on (the CPU path: the optimized
        # graph). None: no range cache is written (TensorRT's precision stage calibrates its own graph).
        self.ranges_of = ranges_of

    def depends_on(self, config: BuildConfig) -> tuple[str, ...]:
        return (self.ranges_of,) if self.ranges_of else ()

    def ensures(self, out: Path) -> None:
        missing = [name for name in self.outputs if name != CACHE_FILE and not (out / name).exists()]
        if missing:
            raise StageError(self.name, f"did not write {', '.join(missing)}")

    def config_slice(self, config: BuildConfig, model: ModelInfo) -> dict[str, Any]:
        calibration = config.calibration.model_dump(mode="json")
        calibration.pop("source")  # identified by its fingerprint instead of its path
        if calibration["method"] != "percentile":
            calibration.pop("percentile")  # a percentile that is not used must not re-run calibration
        return {"calibration": calibration, "input_names": list(model.architecture.input_names)}

    def external_inputs(self, config: BuildConfig, model: ModelInfo) -> dict[str, str]:
        # Only the tokenizer is read from the model folder (adapters of one base share it; their ranges come
        # from the upstream graph, keyed by its hash).
        return {
            "source": source_for(config.calibration).fingerprint(),
            "tokenizer": tokenizer_fingerprint(model.path),
        }

    def run(self, context: StageContext, out: Path) -> dict[str, Any]:
        settings = context.config.calibration
        source = source_for(settings)
        how = f"stratified by {settings.stratify}" if settings.stratify else f"seed {settings.seed}"
        context.progress.info(f"selecting {settings.samples} + {settings.heldout_samples} samples from {source.name} ({how})")
        calibration, heldout = select_samples(
            source, settings.samples, settings.heldout_samples, settings.seed, source.name, settings.stratify
        )
        tokenizer = load_tokenizer(context.model)
        names = context.model.architecture.input_names
        stats = {}
        for what, samples in (("calibration", calibration), ("held-out", heldout)):
            stats[what] = token_lengths(samples, tokenizer, settings.max_length)
            check_long_samples(stats[what], samples, settings.long_samples, what, source.name)
            if stats[what].too_long:
                context.progress.info(
                    f"{stats[what].too_long} {what} samples are longer than {settings.max_length} tokens: truncated"
                )
        calibration_batches = to_batches(calibration, tokenizer, names, settings.batch_size, settings.max_length, settings.padding)
        heldout_batches = to_batches(heldout, tokenizer, names, settings.batch_size, settings.max_length, settings.padding)
        save_batches(out / "calibration.safetensors", calibration_batches)
        save_batches(out / "heldout.safetensors", heldout_batches)
        samples = {
            "source": source.name,
            "calibration": [sample.to_json() for sample in calibration],
            "heldout": [sample.to_json() for sample in heldout],
        }
        (out / "samples.json").write_text(json.dumps(samples, indent=1, ensure_ascii=False), encoding="utf-8")

        summary = {
            "source": source.name,
            "calibration_samples": len(calibration),
            "heldout_samples": len(heldout),
            "calibration_batches": len(calibration_batches),
            "heldout_batches": len(heldout_batches),
            "calibration_tokens": stats["calibration"].summary(),
            "heldout_tokens": stats["held-out"].summary(),
            "sequence_lengths": {str(length): count for length, count in length_distribution(calibration_batches).items()},
            "strata": strata_counts(calibration, settings.stratify) if settings.stratify else None,
        }
        if self.ranges_of is None:
            return summary
        context.progress.info(f"{settings.method} ranges of the FP32 graph over {len(calibration_batches)} batches")
        fp32 = context.input(self.ranges_of)
        # Read only when used: a percentile that is not used is not in the cache key either.
        percentile = settings.percentile if settings.method == "percentile" else None
        with tempfile.TemporaryDirectory(prefix="quantpipe-calibrate-") as scratch:
            prepared = neural_compressor.prepare_graph(fp32.path("model.onnx"), Path(scratch) / "prepared.onnx")
            ranges = compute_ranges(
                prepared, calibration_batches, neural_compressor.activation_tensors(prepared),
                settings.method, *([percentile] if percentile is not None else []),
                on_batch=lambda done: context.progress.batches("calibration", done, len(calibration_batches)),
            )
        cache = RangeCache(
            method=settings.method,
            percentile=percentile,
            ranges=ranges,
            fingerprint={"data": file_sha256(out / "calibration.safetensors"), "model": fp32.files["model.onnx"]},
        )
        cache.save(out / CACHE_FILE)
        return {**summary, "method": settings.method, "ranged_tensors": len(ranges)}
