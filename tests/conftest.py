"""Shared fixtures: one real default build per session, and the hardware/package skip hook."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def _has_tensorrt() -> bool:
    if importlib.util.find_spec("tensorrt") is None:
        return False
    try:  # the PyPI stubs and the bindings-only wheel install, but fail to load libnvinfer
        import tensorrt  # noqa: F401
    except Exception:
        return False
    return True


def _has_gpu() -> bool:
    return shutil.which("nvidia-smi") is not None and subprocess.run(
        ["nvidia-smi", "-L"], capture_output=True
    ).returncode == 0


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reasons = {
        "tensorrt": None if _has_tensorrt() else "TensorRT (libnvinfer) is not installed on this host",
        "gpu": None if _has_gpu() else "no NVIDIA GPU on this host",
    }
    for item in items:
        for marker, reason in reasons.items():
            if reason and marker in item.keywords:
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def default_build(tmp_path_factory: pytest.TempPathFactory):
    """The default build (all-MiniLM-L6-v2, dynamic INT8) run once through the Python API."""
    from pipeline.config import load_config
    from pipeline.progress import Progress
    from pipeline.runner import run_build

    build_dir = tmp_path_factory.mktemp("default-build")
    config = load_config(None, {"output_dir": str(build_dir)})
    result = run_build(config, Progress(quiet=True))
    return result
