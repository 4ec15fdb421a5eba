"""CLI conventions: option groups in --help with the schema's defaults, one-line refusal of settings the
target or family never reads, trtexec-style shape flags, --json, and progress bars on a terminal only."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import select
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest

from pipeline.build.plan import plan_build
from pipeline.config import load_config
from pipeline.core.errors import ConfigError
from tests.helpers import assert_one_line_error, run_cli
from tests.tiny_encoders import write_tiny_bert


def test_build_help_shows_groups_and_schema_defaults() -> None:
    from pipeline.cli.groups import GROUPS

    result = run_cli("build", "--help")
    assert result.returncode == 0, result.stderr
    positions = [result.stdout.index(f"\n{title}:\n") for title in GROUPS]
    assert positions == sorted(positions)  # every section, in order
    llm = result.stdout[result.stdout.index("LLM weight-only"):result.stdout.index("TensorRT (--target trt)")]
    assert "--weight-bits" in llm and "--quant " not in llm
    # Defaults come from pipeline/config.py: the schema's calibration.samples default is what --help says.
    from pipeline.cli.groups import schema_default

    samples = result.stdout[result.stdout.index("\n  --calib-samples"):].split("\n  --")[1]
    assert f"[default: {schema_default('calibration.samples')}]" in samples


REFUSED = [  # (overrides, what the one line must say)
    ({"quantization": {"weight_bits": 8}}, "--weight-bits applies to decoder models only"),
    ({"quantization": {"block_size": 64}}, "--block-size applies to decoder models only"),
    ({"quantization": {"lm_head": "fp32"}}, "--lm-head applies to decoder models only"),
    ({"quantization": {"symmetric": True}}, "--symmetric/--asymmetric applies to decoder models only"),
    ({"quantization": {"embeddings": "fp32"}}, "--embeddings applies to decoder models only"),
    ({"verify": {"max_perplexity_increase": 0.1}}, "--max-perplexity-increase applies to decoder models only"),
    ({"verify": {"min_token_agreement": 0.5}}, "--min-token-agreement applies to decoder models only"),
    ({"trt": {"precision": "fp8"}}, "--precision applies to --target trt only"),
    ({"trt": {"batch": [1, 8, 32]}, "calibration": {"max_length": 128}}, "--min-shapes/--opt-shapes/--max-shapes applies to --target trt only"),
    ({"target": "trt", "quantization": {"mode": "static"}}, "--quant applies to --target cpu only"),
    ({"target": "trt", "quantization": {"smoothquant": True, "mode": "static"}}, "--smoothquant applies to --target cpu only"),
    ({"target": "trt", "quantization": {"fallback": "auto"}}, "--fallback applies to --target cpu only"),
    ({"target": "trt", "quantization": {"outlier_threshold": 3.0}}, "--outlier-threshold applies to --target cpu only"),
    ({"target": "trt", "calibration": {"method": "percentile"}}, "--calib-method applies to --target cpu only"),
    ({"verify": {"eval_file": "labels.jsonl"}}, "--eval-file applies to --task text-classification only"),
]


@pytest.mark.parametrize(("overrides", "message"), REFUSED, ids=[m.split(" applies")[0] for _, m in REFUSED])
def test_an_inapplicable_setting_is_refused(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("/", ".").replace("-", ".")):
        plan_build(load_config(None, overrides))


@pytest.mark.parametrize(("overrides", "message"), [
    ({"quantization": {"per_channel": False}}, "--per-channel/--per-tensor applies to encoder models only"),
    ({"quantization": {"format": "qoperator", "mode": "rtn"}}, "--format applies to encoder models only"),
    ({"calibration": {"method": "entropy"}}, "--calib-method applies to encoder models only"),
    ({"verify": {"localize": "always"}}, "--localize applies to encoder models only"),
])
def test_an_encoder_setting_is_refused_on_a_decoder(tiny_llama_folder: Path, overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("/", ".").replace("-", ".")):
        plan_build(load_config(None, {"model": {"path": str(tiny_llama_folder)}, **overrides}))


def test_applicable_settings_still_pass() -> None:
    plan_build(load_config(None, {"target": "trt", "trt": {"precision": "fp8", "batch": [1, 8, 32]}}))
    plan_build(load_config(None, {"quantization": {"mode": "static", "per_channel": False, "fallback": "auto"}}))


def test_cli_refusals_are_one_line_with_exit_2() -> None:
    assert_one_line_error(run_cli("build", "--weight-bits", "8", "--print-config"), 2,
                          "--weight-bits applies to decoder models only")
    assert_one_line_error(run_cli("build", "--precision", "fp8", "--print-config"), 2,
                          "--precision applies to --target trt only")
    assert_one_line_error(run_cli("build", "--target", "trt", "--min-shapes", "input_ids:1x16", "--print-config"), 2,
                          "give --min-shapes, --opt-shapes and --max-shapes together")


def test_trtexec_shapes_and_opset_reach_the_configuration() -> None:
    result = run_cli("build", "--target", "trt", "--opset", "18", "--min-shapes", "input_ids:1x16,attention_mask:1x16",
                     "--opt-shapes", "input_ids:8x64,attention_mask:8x64", "--max-shapes", "input_ids:32x128,attention_mask:32x128",
                     "--print-config")
    assert result.returncode == 0, result.stderr
    import yaml

    config = yaml.safe_load(result.stdout.split("\n# ")[0])
    assert config["trt"]["batch"] == [1, 8, 32] and config["trt"]["sequence"] == [16, 64, 128]
    assert config["model"]["opset"] == 18
    assert_one_line_error(run_cli("build", "--target", "trt", "--min-shapes", "input_ids:1x16,attention_mask:2x16",
                                  "--opt-shapes", "input_ids:8x64", "--max-shapes", "input_ids:32x128", "--print-config"),
                          2, "every input takes the same batch x sequence")


def test_json_summary_of_a_cached_build(default_build) -> None:
    result = run_cli("build", "-o", str(default_build.build_dir), "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["status"] == "passed" and summary["failures"] == []
    assert all(stage["reused"] for stage in summary["stages"].values())
    assert Path(summary["artifacts"]["model"]) == default_build.build_dir / "model.onnx"


@pytest.fixture(scope="module")
def tiny_bert_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_bert(tmp_path_factory.mktemp("tiny-bert"), hidden_size=64, intermediate_size=128,
                           num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=512)


def _run_in_pty(args: list[str], env: dict[str, str]) -> str:
    """The command with its stdout and stderr on a pseudo-terminal, as a user's shell runs it."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # 40 x 120, as a terminal has
    process = subprocess.Popen([sys.executable, "-m", "pipeline", *args], stdin=follower, stdout=follower,
                               stderr=follower, env=env, close_fds=True)
    os.close(follower)
    chunks = []
    while True:
        ready, _, _ = select.select([leader], [], [], 300)
        if not ready:
            process.kill()
            break
        try:
            data = os.read(leader, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    process.wait(timeout=60)
    os.close(leader)
    assert process.returncode == 0, b"".join(chunks).decode(errors="replace")[-2000:]
    return b"".join(chunks).decode(errors="replace")


def test_progress_bars_on_a_terminal_and_plain_lines_with_ci(tiny_bert_folder: Path, tmp_path: Path) -> None:
    env = {key: value for key, value in os.environ.items() if key != "CI"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[2]), env.get("PYTHONPATH")]))
    args = ["build", "--model", str(tiny_bert_folder), "-o", str(tmp_path / "build"), "--heldout-samples", "48",
            "--calib-samples", "8", "--batch-size", "4", "--localize", "never", "--log-file", str(tmp_path / "build.log")]
    terminal = _run_in_pty(args, env)
    # tqdm redraws its bar in place (carriage returns) with the rate and the ETA ("<"), per long stage.
    assert "\r" in terminal.replace("\r\n", "\n") and "verify: held-out" in terminal and "batch/s" in terminal, terminal[-1500:]
    bar = [line for line in terminal.split("\r") if "verify: held-out" in line][-1]
    assert "12/12" in bar and "<" in bar, bar
    log = (tmp_path / "build.log").read_text()
    assert "verify: held-out batch 12/12" in log and "\r" not in log
    ci = _run_in_pty([*args, "--force"], {**env, "CI": "true"})
    assert "\r" not in ci.replace("\r\n", "\n") and "batch/s" not in ci
    assert "verify: held-out batch 12/12" in ci


def test_neural_compressor_log_lines_are_routed_through_logging(capfd) -> None:
    import logging

    import onnx_neural_compressor.logger as inc_logger

    from pipeline.core.logs import configure_logging

    try:
        configure_logging(verbose=True)
        from engines.cpu.neural_compressor import _quiet_library_logger

        _quiet_library_logger()
        inc_logger.info("quantizing 42 nodes")
        captured = capfd.readouterr().err
        assert "onnx_neural_compressor INFO: quantizing 42 nodes" in captured
        assert "[INFO][" not in captured  # Neural Compressor's own format is gone
    finally:
        configure_logging(verbose=False)
        logging.getLogger().handlers = [h for h in logging.getLogger().handlers if not getattr(h, "_quantpipe", False)]


# What torchao 0.18 prints on stderr when imported (transformers imports it on every model load): its own
# logger ("Failed to load .../torchao/_C_mxfp8...so", kernels built for CUDA) and torch's pytree logger
# (register_constant on its Enum configs, in torch's own "W1202 ..." format).
_IMPORT_TORCHAO = "import torchao, sys; sys.stderr.flush()"


def test_torchao_import_output_is_silenced_once_logging_is_configured() -> None:
    pytest.importorskip("torchao")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    bare = subprocess.run([sys.executable, "-c", _IMPORT_TORCHAO], capture_output=True, text=True, env=env)
    # The control: without Quantpipe's logging set-up torchao does print (if this starts failing, torchao
    # stopped printing and the LIBRARIES entries may go).
    assert "torchao" in bare.stderr or "_pytree" in bare.stderr, bare.stderr
    quiet = subprocess.run([sys.executable, "-c", "from pipeline.core.logs import configure_logging; "
                            "configure_logging(); " + _IMPORT_TORCHAO], capture_output=True, text=True, env=env)
    assert quiet.returncode == 0 and quiet.stderr == "", quiet.stderr
