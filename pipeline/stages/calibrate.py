"""calibrate: select calibration and held-out samples from the source and tokenize them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from calibration.batches import save_batches, to_batches
from calibration.selection import select_samples
from calibration.sources import open_source
from pipeline.config import BuildConfig
from pipeline.models import ModelInfo, folder_fingerprint, load_tokenizer
from pipeline.stages.base import Stage, StageContext


def _length_stats(batches: list[dict[str, np.ndarray]]) -> dict[str, float]:
    lengths = np.concatenate([batch["attention_mask"].sum(axis=1) for batch in batches])
    return {
        "min": int(lengths.min()),
        "p50": float(np.percentile(lengths, 50)),
        "p90": float(np.percentile(lengths, 90)),
        "max": int(lengths.max()),
    }


class CalibrateStage(Stage):
    name = "calibrate"
    outputs = ("calibration.safetensors", "heldout.safetensors", "samples.json")

    def config_slice(self, config: BuildConfig, model: ModelInfo) -> dict[str, Any]:
        calibration = config.calibration.model_dump(mode="json")
        calibration.pop("source")  # identified by its fingerprint instead of its path
        return {"calibration": calibration, "input_names": list(model.architecture.input_names)}

    def external_inputs(self, config: BuildConfig, model: ModelInfo) -> dict[str, str]:
        # The tokenizer lives in the model folder.
        return {
            "source": open_source(config.calibration.source).fingerprint(),
            "model_folder": folder_fingerprint(model.path),
        }

    def run(self, context: StageContext, out: Path) -> dict[str, Any]:
        settings = context.config.calibration
        source = open_source(settings.source)
        context.progress.info(f"selecting {settings.samples} + {settings.heldout_samples} samples from {source.name}")
        calibration, heldout = select_samples(
            source, settings.samples, settings.heldout_samples, settings.seed, source.name
        )
        tokenizer = load_tokenizer(context.model)
        names = context.model.architecture.input_names
        calibration_batches = to_batches(calibration, tokenizer, names, settings.batch_size, settings.max_length)
        heldout_batches = to_batches(heldout, tokenizer, names, settings.batch_size, settings.max_length)
        save_batches(out / "calibration.safetensors", calibration_batches)
        save_batches(out / "heldout.safetensors", heldout_batches)
        samples = {"source": source.name, "calibration": calibration, "heldout": heldout}
        (out / "samples.json").write_text(json.dumps(samples, indent=1, ensure_ascii=False), encoding="utf-8")
        return {
            "source": source.name,
            "calibration_samples": len(calibration),
            "heldout_samples": len(heldout),
            "calibration_batches": len(calibration_batches),
            "heldout_batches": len(heldout_batches),
            "calibration_tokens": _length_stats(calibration_batches),
        }
