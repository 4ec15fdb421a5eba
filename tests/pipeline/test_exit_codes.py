"""README's exit-code table, one real case per row, and the CLI's bad-input paths: each ends with its
documented code and a one-line message, never a traceback (except code 1, a bug)."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.build.runner import CACHE_DIR
from pipeline.core.errors import ExitCode
from pipeline.models.registry import default_model_path
from tests.helpers import assert_one_line_error, run_cli

README = Path(__file__).resolve().parents[2] / "README.md"


def documented_codes() -> set[int]:
    section = README.read_text(encoding="utf-8").split("## Exit codes", 1)[1].split("\n## ", 1)[0]
    return {int(code) for code in re.findall(r"^\| (\d+) \|", section, flags=re.MULTILINE)}


def _python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)


def _tiny_model(folder: Path) -> Path:
    """A real BERT folder (random weights) whose position table holds 8 tokens, fewer than the probe
    sentences the export checks with: the export stage fails on it."""
    from transformers import BertConfig, BertModel

    config = BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                        max_position_embeddings=8)
    BertModel(config).save_pretrained(str(folder))
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(default_model_path() / name, folder / name)
    return folder


def _interrupted(default_build, tmp_path: Path, signum: int) -> subprocess.CompletedProcess[str]:
    """A build working on its verify stage, sent a signal."""
    build_dir = tmp_path / "build"
    shutil.copytree(default_build.build_dir, build_dir)
    manifest = json.loads((build_dir / "manifest.json").read_text())
    shutil.rmtree(build_dir / CACHE_DIR / manifest["stages"][-1]["directory"])
    process = subprocess.Popen([sys.executable, "-m", "pipeline", "build", "-o", str(build_dir)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = []
    for line in process.stderr:
        log.append(line)
        if "verify: running" in line:
            break
    process.send_signal(signum)
    out, rest = process.communicate(timeout=600)
    assert not list((build_dir / CACHE_DIR).glob("tmp-*")), "the staging folder is removed on the way out"
    lines = [line for line in rest.splitlines() if line.strip() and not line.startswith("[")]
    return subprocess.CompletedProcess(process.args, process.returncode, out, "\n".join(lines))


def case_ok(default_build, tmp_path: Path):
    return run_cli("report", "check", str(default_build.build_dir / "parity.json")), ()


def case_internal(default_build, tmp_path: Path):
    # A bug stands in for itself: a command that raises an unexpected exception.
    result = _python(
        "import sys\n"
        "from pipeline.cli.main import cli, main\n"
        "@cli.command('explode')\n"
        "def explode():\n"
        "    raise ZeroDivisionError('a bug')\n"
        "sys.argv = ['pipeline', 'explode']\n"
        "main()\n"
    )
    return result, ("Traceback", "ZeroDivisionError")


def case_bad_input(default_build, tmp_path: Path):
    return run_cli("report", "check", str(tmp_path / "missing.json")), ("parity report not found",)


def case_stage_failed(default_build, tmp_path: Path):
    model = _tiny_model(tmp_path / "tiny")
    return run_cli("build", "--model", str(model), "-o", str(tmp_path / "b"), "--stop-after", "export", "--quiet"), \
        ("stage 'export' failed",)


def case_parity_failed(default_build, tmp_path: Path):
    return run_cli("report", "check", str(default_build.build_dir / "parity.json"), "--min-cosine", "0.99999"), \
        ("parity failed", "cosine_mean")


def case_missing_dependency(default_build, tmp_path: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = tmp_path / "data.parquet"
    pq.write_table(pa.table({"text": ["one sentence", "another"]}), data)
    result = _python(  # pyarrow made unimportable, as on a host without it
        "import sys\n"
        "sys.modules['pyarrow'] = None\n"
        "from pipeline.cli.main import main\n"
        f"sys.argv = ['pipeline', 'calibrate', '--calib-source', {str(data)!r}, '-o', {str(tmp_path / 'b')!r}]\n"
        "main()\n"
    )
    return result, ("needs pyarrow",)


def case_locked(default_build, tmp_path: Path):
    import fcntl

    build_dir = tmp_path / "build"
    build_dir.mkdir()
    with (build_dir / ".lock").open("a") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX)
        return run_cli("build", "-o", str(build_dir), "--lock-timeout", "0", "--quiet"), ("another build",)


def case_interrupted(default_build, tmp_path: Path):
    return _interrupted(default_build, tmp_path, signal.SIGINT), ("interrupted",)


def case_terminated(default_build, tmp_path: Path):
    return _interrupted(default_build, tmp_path, signal.SIGTERM), ("terminated",)


CASES = {0: case_ok, 1: case_internal, 2: case_bad_input, 3: case_stage_failed, 4: case_parity_failed,
         5: case_missing_dependency, 6: case_locked, 130: case_interrupted, 143: case_terminated}


def test_every_documented_code_has_a_case() -> None:
    assert documented_codes() == set(CASES)
    assert {int(code) for code in ExitCode} <= set(CASES)


@pytest.mark.parametrize("code", sorted(CASES))
def test_exit_code(code: int, default_build, tmp_path: Path) -> None:
    result, needles = CASES[code](default_build, tmp_path)
    if code == ExitCode.OK:
        assert result.returncode == 0, result.stderr
    elif code == ExitCode.INTERNAL:
        assert result.returncode == 1 and all(needle in result.stderr for needle in needles), result.stderr
    else:
        assert_one_line_error(result, code, *needles)


def _garbage(tmp_path: Path, name: str, content: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(content)
    return str(path)


# Every command given bad input: missing files, wrong types, garbage bytes.
BAD_INPUTS = {
    "build: build file that is not text": lambda t: ["build", "--config", _garbage(t, "b.yaml", b"\xff\xfe\x00garbage")],
    "build: build file that is not a mapping": lambda t: ["build", "--config", _garbage(t, "b.yaml", b"- a\n- b\n")],
    "build: NUL byte in a path": lambda t: ["build", "--config", _garbage(t, "b.yaml", b'model:\n  path: "a\\0b"\n')],
    "build: wrong type": lambda t: ["build", "--calib-samples", "many"],
    "build: output is a file": lambda t: ["build", "-o", _garbage(t, "file", b"x"), "--stop-after", "export"],
    "calibrate: garbage parquet": lambda t: ["calibrate", "--calib-source", _garbage(t, "d.parquet", b"PAR1garbagePAR1")],
    "verify: garbage manifest": lambda t: ["verify", str(Path(_garbage(t, "manifest.json", b"[1, 2]")).parent)],
    "verify: missing directory": lambda t: ["verify", str(t / "nothing")],
    "report check: garbage bytes": lambda t: ["report", "check", _garbage(t, "p.json", b"\x89PNG\x00\x01")],
    "report check: a JSON list": lambda t: ["report", "check", _garbage(t, "p.json", b"[]")],
    "report diff: missing file": lambda t: ["report", "diff", str(t / "a.json"), str(t / "b.json")],
    "bench: garbage onnx": lambda t: ["bench", _garbage(t, "a.onnx", b"\x08garbage" * 50), _garbage(t, "b.onnx", b"")],
    "bench: empty onnx": lambda t: ["bench", _garbage(t, "a.onnx", b""), _garbage(t, "b.onnx", b"")],
    "bench: folder that is not a build": lambda t: ["bench", str(t)],
    "bench: bad batch list": lambda t: ["bench", str(t), "--batch", "x"],
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_line_exit_2(case: str, tmp_path: Path) -> None:
    result = run_cli(*BAD_INPUTS[case](tmp_path), "--quiet") if "report" not in case else \
        run_cli(*BAD_INPUTS[case](tmp_path))
    assert result.returncode == ExitCode.BAD_INPUT, (case, result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    assert len([line for line in result.stderr.splitlines() if line.strip()]) == 1, result.stderr


def test_verify_refuses_a_garbage_candidate(default_build, tmp_path: Path) -> None:
    candidate = _garbage(tmp_path, "garbage.onnx", bytes(range(256)) * 20)
    result = run_cli("verify", str(default_build.build_dir), "--candidate", candidate, "-o", str(tmp_path / "r"), "-q")
    assert_one_line_error(result, ExitCode.BAD_INPUT, "garbage.onnx", "not an ONNX model")


def _unknown_op_graph(path: Path) -> Path:
    """A well-formed ONNX file that ONNX Runtime cannot load (an operator nobody defines)."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("NoSuchOp", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(graph), str(path))
    return path


def test_bench_and_verify_refuse_a_graph_onnx_runtime_cannot_load(default_build, tmp_path: Path) -> None:
    bad = _unknown_op_graph(tmp_path / "unknown-op.onnx")
    result = run_cli("bench", str(default_build.build_dir / "model.onnx"), str(bad), "--runs", "1", "-q")
    assert_one_line_error(result, ExitCode.BAD_INPUT, "ONNX Runtime cannot load", "unknown-op.onnx")
    result = run_cli("verify", str(default_build.build_dir), "--candidate", str(bad), "-o", str(tmp_path / "r"), "-q")
    assert_one_line_error(result, ExitCode.BAD_INPUT, "ONNX Runtime cannot load", "unknown-op.onnx")


def test_verify_refuses_a_candidate_with_other_inputs(default_build, tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    other = tmp_path / "other.onnx"
    onnx.save(helper.make_model(graph), str(other))
    result = run_cli("verify", str(default_build.build_dir), "--candidate", str(other), "-o", str(tmp_path / "r"), "-q")
    assert_one_line_error(result, ExitCode.BAD_INPUT, "does not fit this build")
