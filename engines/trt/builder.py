"""Build a TensorRT 11 engine from a graph that carries its own precision (Q/DQ or FP16).

This file is also the bundle's `build_engine.py`: it imports only the standard library at
module scope and `tensorrt` lazily inside functions, so it runs as is on a GPU host:

    python build_engine.py            # reads build_config.json beside it

TensorRT 11 networks are always strongly typed (`create_network(0)`): there are no
precision builder flags; the graph's Q/DQ nodes and FP16 tensors decide each layer's type.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Optional

BUILD_CONFIG = "build_config.json"


def tensorrt_missing_reason() -> Optional[str]:
    """None when TensorRT's Python package and libnvinfer load; else why not, in a few words."""
    try:
        import tensorrt  # noqa: F401
    except ImportError as exc:
        return f"the TensorRT Python package is not installed ({exc.name or 'tensorrt'})"
    except Exception as exc:  # the PyPI stubs and the bindings-only wheel import but cannot load libnvinfer
        return f"TensorRT does not load: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return None


def _dims(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("x"))


def build_engine(config: dict[str, Any], base_dir: Path) -> dict[str, Any]:
    """Parse the ONNX graph, apply the profile, workspace, optimization level and timing cache; write the plan."""
    import tensorrt as trt

    onnx_path = base_dir / config["onnx"]
    engine_path = base_dir / config["engine"]
    cache_path = base_dir / config["timing_cache"]
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 11: always strongly typed, no creation flags needed
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(index)) for index in range(parser.num_errors))
        raise RuntimeError(f"TensorRT's ONNX parser rejected {onnx_path}: {errors}")

    builder_config = builder.create_builder_config()
    builder_config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(config["workspace_bytes"]))
    builder_config.builder_optimization_level = int(config["builder_optimization_level"])
    # Decoder LLMs: several profiles (prefill, decode); the runtime selects one per execution context.
    profiles = [entry["shapes"] for entry in config["profiles"]] if "profiles" in config else [config["profile"]]
    for shapes_by_input in profiles:
        profile = builder.create_optimization_profile()
        for name, shapes in shapes_by_input.items():
            profile.set_shape(name, _dims(shapes["min"]), _dims(shapes["opt"]), _dims(shapes["max"]))
        builder_config.add_optimization_profile(profile)

    cache_bytes = cache_path.read_bytes() if cache_path.is_file() else b""
    timing_cache = builder_config.create_timing_cache(cache_bytes)
    builder_config.set_timing_cache(timing_cache, False)

    started = time.perf_counter()
    serialized = builder.build_serialized_network(network, builder_config)
    if serialized is None:
        raise RuntimeError("TensorRT failed to build the engine (see the log above)")
    engine_path.write_bytes(bytes(serialized))
    cache_path.write_bytes(bytes(builder_config.get_timing_cache().serialize()))
    return {
        "engine": str(engine_path),
        "engine_bytes": engine_path.stat().st_size,
        "timing_cache_reused": bool(cache_bytes),
        "build_seconds": round(time.perf_counter() - started, 1),
        "tensorrt_version": trt.__version__,
    }


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Build the TensorRT 11 engine of this bundle.")
    parser.add_argument("--config", type=Path, default=Path(__file__).with_name(BUILD_CONFIG))
    args = parser.parse_args(argv)
    reason = tensorrt_missing_reason()
    if reason:
        print(f"error: {reason}; install TensorRT 11 (pip install 'tensorrt>=11,<12') on a host with an NVIDIA GPU",
              file=sys.stderr)
        return 5
    config = json.loads(args.config.read_text(encoding="utf-8"))
    result = build_engine(config, args.config.parent)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
