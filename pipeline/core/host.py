"""Facts about the host a build ran on: CPU model, instruction-set flags, the ISA class they make, and the
versions of every library that shaped the artifacts. Recorded in manifest.json ("host"), and the
default of `--cpu-isa auto`: INT8 speed and even INT8 accuracy depend on the CPU (see FACTS.md)."""

from __future__ import annotations

import functools
import os
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

CPU_ISAS = ("avx2", "avx512-vnni", "amx", "arm64")
# The flags (Linux /proc/cpuinfo names) that decide INT8 kernels; recorded as found.
ISA_FLAGS = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8",
             "amx_bf16", "asimd", "asimddp", "i8mm", "sve")
LIBRARIES = ("torch", "transformers", "onnx", "onnxruntime", "onnx-neural-compressor", "onnxruntime-genai",
             "numpy", "tensorrt")


def _cpuinfo(path: Path = Path("/proc/cpuinfo")) -> tuple[str, set[str]]:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return platform.processor() or "unknown", set()
    model, flags = "", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "cpu model", "hardware") and not model:
            model = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = set(value.split())
    return model or platform.processor() or "unknown", flags


def isa_of(machine: str, flags: set[str]) -> str:
    """The ISA class of `--cpu-isa`: amx > avx512-vnni > avx2 on x86-64; arm64 on AArch64."""
    if machine.lower() in ("aarch64", "arm64"):
        return "arm64"
    if "amx_int8" in flags:
        return "amx"
    if "avx512_vnni" in flags:
        return "avx512-vnni"
    return "avx2"


def library_versions() -> dict[str, str]:
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


@functools.lru_cache(maxsize=1)
def host_facts() -> dict[str, Any]:
    model, flags = _cpuinfo()
    machine = platform.machine()
    return {"cpu_model": model, "machine": machine, "isa": isa_of(machine, flags),
            "isa_flags": sorted(flag for flag in ISA_FLAGS if flag in flags),
            "python": platform.python_version(), "libraries": library_versions()}


def host_isa() -> str:
    return str(host_facts()["isa"])


def resolved_isa(cpu_isa: str) -> str:
    """--cpu-isa as the graph is made for it: auto is the build host's ISA."""
    return host_isa() if cpu_isa == "auto" else cpu_isa


def weight_type_for(isa: str) -> str:
    """INT8 weight storage for a deployment ISA. AVX2 (x86-64 without VNNI) multiplies uint8 activations by int8
    weights with VPMADDUBSW, which saturates each pair's sum at 16 bits (measured on an AVX2 EPYC: a dot product
    of 255 x 127 over 64 elements gives 1,048,544 instead of 2,072,640); with uint8 weights (the same codes +
    128, zero point 128) ONNX Runtime runs its u8u8 kernels, which widen to 16 bits first and are exact, at
    ~15% of the INT8 speed (docs/encoder-speed.md). VNNI, AMX and Arm dot products accumulate in 32 bits."""
    return "uint8" if isa == "avx2" else "int8"


# Set in a worker process of engines.parallel: the cores it shares with its sibling workers.
WORKER_THREADS: list[int] = []


def core_budget() -> int | None:
    """The cores this process was given, when fewer than the machine's: a worker of engines.parallel, or
    OMP_NUM_THREADS (what Ray, batch schedulers and container platforms set for a job that shares a host;
    torch reads it, ONNX Runtime does not). None: every core."""
    if WORKER_THREADS:
        return WORKER_THREADS[0]
    value = os.environ.get("OMP_NUM_THREADS", "").strip()
    if value.isdigit() and 0 < int(value) < (os.cpu_count() or 1):
        return int(value)
    return None


def session_threads(threads: int) -> tuple[int, bool]:
    """(intra-op threads, spin) for an ONNX Runtime session asked for `threads` (0: every core). Within a core
    budget, idle threads must not spin: they would take the cores sibling processes are computing on."""
    budget = core_budget() if threads == 0 else None
    return (budget, False) if budget is not None else (threads, True)
