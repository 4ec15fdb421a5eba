from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """The real `pipeline` command in a child process of its own, as a user or CI runs it, forked from a process
    that has already imported the heavy libraries (tests/cli_zygote.py); QUANTPIPE_TEST_COLD_CLI=1 starts each
    command as `python -m pipeline` instead."""
    if os.environ.get("QUANTPIPE_TEST_COLD_CLI") == "1":
        return subprocess.run(
            [sys.executable, "-m", "pipeline", *args], capture_output=True, text=True, cwd=cwd, timeout=600
        )
    from tests.cli_zygote import ZYGOTE

    return ZYGOTE.run(list(args), cwd, timeout=600)


def assert_one_line_error(result: subprocess.CompletedProcess[str], code: int, *needles: str) -> None:
    assert result.returncode == code, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def seed_stage_cache(build_dir, outputs, stages) -> None:
    """Hard-link finished stage outputs into a new build's cache (same keys: the runner re-checks their hashes)."""
    import os
    import shutil

    from pipeline.build.runner import CACHE_DIR

    cache = build_dir / CACHE_DIR
    cache.mkdir(parents=True, exist_ok=True)
    for stage in stages:
        source = outputs[stage].directory
        shutil.copytree(source, cache / source.name, copy_function=os.link)


def tensor_types(model: "onnx.ModelProto") -> dict[str, int]:
    """Element type of every tensor in a graph (shape inference for intermediates, initializers as stored)."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type
             for v in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]}
    types.update({t.name: t.data_type for t in model.graph.initializer})
    return types
