"""Calibration benchmarks, measured in one run on this machine.

    python -m pipeline.bench.calibration methods [--samples 128] [--percentile 99.999] [-o build/bench-calibration]
        Static INT8 parity of the default model for min-max, percentile and entropy calibration side
        by side (dynamic INT8 as the reference row): mean/min cosine of sentence embeddings against
        the FP32 graph on the held-out BBC sentences, and the calibrate stage's wall time.

    python -m pipeline.bench.calibration memory [--size-mb 500] [--keep]
        Generates a JSONL file of real sentences repeated with variations, runs `pipeline calibrate`
        on it in a child process, and reports its peak resident memory and wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _methods(args: argparse.Namespace) -> None:
    from pipeline.build.runner import run_build
    from pipeline.config import load_config
    from pipeline.core.logs import quiet_libraries
    from pipeline.core.progress import Progress

    quiet_libraries()
    rows = []
    variants = [("dynamic", None)] + [("static", method) for method in ("minmax", "percentile", "entropy")]
    for mode, method in variants:
        overrides = {
            "output_dir": args.output,
            "quantization": {"mode": mode},
            "calibration": {"samples": args.samples, "percentile": args.percentile, **({"method": method} if method else {})},
            "verify": {"min_cosine": -1.0},  # report, do not gate
        }
        result = run_build(load_config(None, overrides), Progress(quiet=True), force=args.force)
        calibrate = result.outputs["calibrate"]
        primary = result.outputs["verify"].metrics["primary"]
        label = f"{mode}" if method is None else f"static, {method}" + (f" {args.percentile}" if method == "percentile" else "")
        rows.append((label, primary["cosine_mean"], primary["cosine_min"], primary["max_abs"],
                     calibrate.wall_time_s, calibrate.reused, result.outputs["quantize"].wall_time_s))
        print(f"{label}: done", file=sys.stderr, flush=True)
    print(f"all-MiniLM-L6-v2, {args.samples} calibration sentences, held-out BBC sentences, per-channel weights\n")
    print("| INT8 | cosine mean | cosine min | max abs | calibrate stage (s) | quantize stage (s) |")
    print("|---|---|---|---|---|---|")
    for label, mean, low, max_abs, calib_s, reused, quant_s in rows:
        calib = f"{calib_s:.1f}" + (" (reused)" if reused else "")
        print(f"| {label} | {mean:.4f} | {low:.4f} | {max_abs:.3g} | {calib} | {quant_s:.1f} |")


def write_jsonl(path: Path, size_mb: int) -> int:
    """Real BBC sentences, each repeated with a variation, until the file reaches size_mb."""
    from calibration.sources import default_source

    sentences = [sample for _, sample in zip(range(20_000), default_source())]
    lines = 0
    with path.open("w", encoding="utf-8") as handle:
        variant = 0
        while handle.tell() < size_mb * 1024 * 1024:
            for sample in sentences:
                record = {"id": lines, "text": f"{sample.text} (take {variant})", "topic": sample.label}
                handle.write(json.dumps(record) + "\n")
                lines += 1
            variant += 1
    return lines


def _memory(args: argparse.Namespace) -> None:
    folder = Path(tempfile.mkdtemp(prefix="quantpipe-bench-"))
    path = folder / "big.jsonl"
    lines = write_jsonl(path, args.size_mb)
    size = path.stat().st_size
    print(f"generated {path}: {size / 1e6:.0f} MB, {lines} lines", file=sys.stderr)
    command = [sys.executable, "-m", "pipeline", "calibrate", "--calib-source", str(path), "--label-field", "topic",
               "--stratify", "label", "-o", args.output, "--quiet"]
    started = time.perf_counter()
    completed = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - started
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # Linux: KiB, the largest child
    if not args.keep:
        path.unlink()
        folder.rmdir()
    if completed.returncode != 0:
        sys.exit(f"pipeline calibrate failed ({completed.returncode}): {completed.stderr.strip()}")
    print("| JSONL input | lines | peak RSS of `pipeline calibrate` | wall time |")
    print("|---|---|---|---|")
    print(f"| {size / 1e6:.0f} MB | {lines:,} | {peak_kib / 1024:.0f} MiB | {wall:.1f} s |")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.bench.calibration", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    methods = sub.add_parser("methods", help="INT8 parity for min-max, percentile and entropy calibration")
    methods.add_argument("--samples", type=int, default=128)
    methods.add_argument("--percentile", type=float, default=99.999)
    methods.add_argument("--force", action="store_true", help="re-run every stage (measure cold times)")
    methods.add_argument("-o", "--output", default="build/bench-calibration")
    memory = sub.add_parser("memory", help="peak memory of pipeline calibrate on a generated JSONL file")
    memory.add_argument("--size-mb", type=int, default=500)
    memory.add_argument("--keep", action="store_true", help="keep the generated file")
    memory.add_argument("-o", "--output", default="build/bench-calibration")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    {"methods": _methods, "memory": _memory}[args.command](args)


if __name__ == "__main__":
    main()
