"""bundle (target trt): what a GPU host needs to build and check the TensorRT 11 engine.

The bundle holds the graph that carries its own precision, build_config.json (profile,
workspace, optimization level, timing cache), a ready `trtexec` command line, the build
script (engines/trt/builder.py itself, which imports nothing of Quantpipe), the precision
decisions and the parity report. Where TensorRT loads, the engine is built here too
and compared with the FP32 graph through Polygraphy's TensorRT runner.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import shutil
from pathlib import Path
from typing import Any, Optional, Sequence

from engines.trt import builder as trt_engine
from pipeline.config import BuildConfig
from pipeline.core.hashing import file_sha256
from pipeline.models.registry import ModelInfo
from pipeline.stages.base import Stage, StageContext
from pipeline.stages.facts import BundleFacts, CalibrationFacts, ExportFacts, PrecisionFacts, VerifyFacts
from pipeline.stages.llm_trt import (
    ENGINE_CHECK_CHUNKS,
    decoder_profiles,
    perplexity_ratio,
    prefill_feeds,
    prompt_token_counts,
)

TRTEXEC_FILE = "trtexec.sh"
BUILD_SCRIPT = "build_engine.py"
ENGINE_FILE = "model.plan"
TIMING_CACHE = "timing.cache"


def _round_up(value: float, multiple: int = 8) -> int:
    return int(math.ceil(value / multiple) * multiple)


def optimization_profile(config: BuildConfig, model: ModelInfo, lengths: dict[str, float],
                         input_names: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """(min, opt, max) batch and sequence; by default from the calibration samples' token counts.

    Sequence: the shortest calibration sample, the median rounded up to a multiple of 8
    (what TensorRT tunes its kernels for), and calibration.max_length (the tokenizer
    truncates there, so no served input is longer). Batch: 1, the calibration batch size, 4x it.
    """
    batch_size = config.calibration.batch_size
    batch = config.trt.batch or (1, batch_size, 4 * batch_size)
    max_length = config.calibration.max_length
    sequence = config.trt.sequence or (
        int(lengths["min"]), min(max(_round_up(lengths["p50"]), int(lengths["min"])), max_length), max_length,
    )
    shapes = {
        name: {kind: f"{b}x{s}" for kind, b, s in zip(("min", "opt", "max"), batch, sequence)}
        for name in (input_names or model.architecture.input_names)
    }
    return {"batch": list(batch), "sequence": list(sequence), "shapes": shapes,
            "derived_from_calibration": config.trt.sequence is None, "calibration_tokens": lengths}


def trtexec_command(build_config: dict[str, Any]) -> list[str]:
    """trtexec 11: no --int8/--fp16/--best (the graph carries its precision); `--profile=N` before each of several profiles."""
    profiles = [p["shapes"] for p in build_config["profiles"]] if "profiles" in build_config else [build_config["profile"]]

    def joined(shapes: dict[str, dict[str, str]], kind: str) -> str:
        return ",".join(f"{name}:{dims[kind]}" for name, dims in shapes.items())

    shape_flags = []
    for index, shapes in enumerate(profiles):
        shape_flags += [f"--profile={index}"] if len(profiles) > 1 else []
        shape_flags += [f"--{kind}Shapes={joined(shapes, kind)}" for kind in ("min", "opt", "max")]
    return [
        "trtexec", f"--onnx={build_config['onnx']}", f"--saveEngine={build_config['engine']}", *shape_flags,
        f"--memPoolSize=workspace:{build_config['workspace_bytes'] // (1024 * 1024)}M",
        f"--builderOptimizationLevel={build_config['builder_optimization_level']}",
        f"--timingCacheFile={build_config['timing_cache']}",
    ]


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


class BundleStage(Stage):
    name = "bundle"
    facts = BundleFacts
    version = 3  # 3: SNR takes the reference's power as the signal; 2: engine_parity.json is the ParityReport model (schema 3)
    outputs = ("model.onnx", "build_config.json", TRTEXEC_FILE, BUILD_SCRIPT, "parity.json", "parity.md",
               "precision.json")

    def depends_on(self, config: BuildConfig) -> tuple[str, ...]:
        return ("export", "calibrate", "precision", "verify")

    def config_slice(self, config: BuildConfig, model: ModelInfo) -> dict[str, Any]:
        return {"trt": config.trt.model_dump(mode="json"), "calibration_max_length": config.calibration.max_length,
                "calibration_batch_size": config.calibration.batch_size,
                "input_names": list(model.architecture.input_names)}

    def external_inputs(self, config: BuildConfig, model: ModelInfo) -> dict[str, str]:
        # A host that gains TensorRT must not reuse a bundle built without an engine.
        return {"tensorrt": trt_engine.tensorrt_missing_reason() or "present",
                "build_script": file_sha256(Path(trt_engine.__file__))}

    def run(self, context: StageContext, out: Path) -> dict[str, Any]:
        config, model = context.config, context.model
        precision = context.input("precision")
        verify = context.input("verify")
        _link_or_copy(precision.path("model.onnx"), out / "model.onnx")
        for name in ("precision.json",):
            _link_or_copy(precision.path(name), out / name)
        for name in ("parity.json", "parity.md"):
            _link_or_copy(verify.path(name), out / name)
        profiles = self._profiles(context)
        carried = context.facts("precision", PrecisionFacts).graph_precision or config.trt.precision
        build_config = {
            "format": "quantpipe-trt-bundle/1",
            "tensorrt": ">=11,<12",
            "precision": carried,
            "onnx": "model.onnx",
            "engine": ENGINE_FILE,
            "timing_cache": TIMING_CACHE,
            "workspace_bytes": config.trt.workspace_mib * 1024 * 1024,
            "builder_optimization_level": config.trt.builder_optimization_level,
            **profiles["build_config"],
            "outputs": list(model.task.output_names),
        }
        (out / "build_config.json").write_text(json.dumps(build_config, indent=2) + "\n", encoding="utf-8")
        command = shlex.join(trtexec_command(build_config))
        (out / TRTEXEC_FILE).write_text(
            "#!/bin/sh\n# TensorRT 11 engine build; run in this folder on the GPU host.\n"
            f'cd "$(dirname "$0")" && {command}\n', encoding="utf-8")
        (out / TRTEXEC_FILE).chmod(0o755)
        shutil.copyfile(trt_engine.__file__, out / BUILD_SCRIPT)
        metrics: dict[str, Any] = {"trtexec": command, "profile": profiles["metrics"], "precision": carried}
        missing = trt_engine.tensorrt_missing_reason()
        if missing:
            metrics["engine"] = f"not built: {missing}"
            context.progress.info(
                f"TensorRT engine not built here ({missing}); the bundle is ready: "
                f"run {BUILD_SCRIPT} or {TRTEXEC_FILE} on a host with TensorRT 11 and an NVIDIA GPU"
            )
        elif not context.facts("verify", VerifyFacts).passed:
            metrics["engine"] = "not built: simulated parity failed"
        else:
            metrics.update(self._build_engine(context, out, build_config))
        return metrics

    def _profiles(self, context: StageContext) -> dict[str, Any]:
        """Encoders: one profile from the calibration lengths. Decoder LLMs: a prefill and a decode profile."""
        config, model = context.config, context.model
        if model.is_decoder:
            export, calibrate = context.input("export"), context.input("calibrate")
            prompts = prompt_token_counts(calibrate.path("prompts.json"), export.path("tokenizer"))
            profiles = decoder_profiles(config, context.facts("export", ExportFacts).kv_cache.layout, prompts)
            ranges = {k: v for k, v in profiles.items() if k != "profiles"}
            return {"build_config": {"profiles": profiles["profiles"], "profile_ranges": ranges}, "metrics": ranges}
        tokens = context.facts("calibrate", CalibrationFacts).calibration_tokens
        profile = optimization_profile(config, model, tokens.model_dump() if tokens else {},
                                       context.facts("export", ExportFacts).input_names)
        return {"build_config": {
            "profile": profile["shapes"],
            "profile_ranges": {"batch": profile["batch"], "sequence": profile["sequence"],
                               "derived_from_calibration": profile["derived_from_calibration"]},
        }, "metrics": profile}

    def _build_engine(self, context: StageContext, out: Path, build_config: dict[str, Any]) -> dict[str, Any]:
        """Build the engine, then compare it with the FP32 graph through Polygraphy's TensorRT runner."""
        from calibration.batches import load_batches
        from engines.ort_session import OrtRunner
        from engines.trt.parity import engine_outputs
        from pipeline.core.errors import ParityError
        from pipeline.parity import policy
        from pipeline.parity.gates import evaluate_values
        from pipeline.parity.metrics import compare_output
        from pipeline.parity.report import Artifact, Candidate, Heldout, make_report
        from pipeline.reports.write import write_json

        previous = out.parent.parent / "trt" / TIMING_CACHE  # the last published bundle's cache: reuse its timings
        if previous.is_file():
            shutil.copyfile(previous, out / TIMING_CACHE)
        context.progress.info("building the TensorRT engine")
        result = trt_engine.build_engine(build_config, out)
        task = context.model.task
        outputs = list(task.output_names)
        heldout = context.input("calibrate").path("heldout.safetensors")
        decoder = context.model.is_decoder  # prefill feeds (profile 0) of held-out text, logits only
        batches = (prefill_feeds(heldout, context.facts("export", ExportFacts).kv_cache.layout, ENGINE_CHECK_CHUNKS) if decoder
                   else load_batches(heldout))
        with OrtRunner(context.input("export").path("model.onnx"), output_names=outputs) as runner:
            reference = [runner.infer(batch) for batch in batches]
        engine = engine_outputs(out / ENGINE_FILE, batches, outputs)
        masks = [batch["attention_mask"] for batch in batches]
        metrics = {name: compare_output(name, [r[name] for r in reference], [e[name] for e in engine], masks,
                                        name == "logits") for name in outputs}
        values = {name: m.to_dict() for name, m in metrics.items()}
        if decoder:
            ratio = perplexity_ratio([r["logits"] for r in reference], [e["logits"] for e in engine], batches)
            values["logits"]["perplexity_increase"] = 1.0 / ratio - 1.0
        thresholds = policy.engine_thresholds(context.config, context.model.task)
        export = context.input("export")
        report = make_report(
            family=policy.family_of(task),
            target="trt",
            task=task.name,
            primary_output=task.primary_output,
            reference=Artifact(description="FP32 ONNX (exported), ONNX Runtime", sha256=export.files["model.onnx"]),
            candidate=Candidate(description="TensorRT engine (Polygraphy TrtRunner)",
                                sha256=file_sha256(out / ENGINE_FILE)),
            heldout=Heldout(source=context.facts("calibrate", CalibrationFacts).source, samples=sum(len(m) for m in masks),
                            batches=len(batches)),
            thresholds=thresholds,
            outputs=values,
            checks=evaluate_values(values, thresholds),
            export_parity=context.facts("export", ExportFacts).torch_parity_max_abs,
        )
        write_json(report, out / "engine_parity.json")
        failures = report.failures
        if failures:
            raise ParityError("TensorRT engine parity failed: " + "; ".join(failures))
        primary = report.outputs[task.primary_output].model_dump(mode="json")
        return {"engine": "built", **result, "engine_parity": primary}
