"""The hostile-input suite: one tiny random-weight BERT build per session, and an in-process CLI runner.

Every test here feeds Quantpipe something a new user (or an attacker) could hand it and checks the answer:
an exit code and one line, never a traceback, never code from the input run, never a gate passed without
its metric, never a user's file lost.
"""

from __future__ import annotations

import io
import json
import shutil
import sys
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.tiny_encoders import write_tiny_bert

TINY_CALIBRATION = {"samples": 16, "heldout_samples": 16}


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str


def cli(*args: str) -> CliResult:
    """`pipeline ARGS` in this process (no interpreter start-up): an exception that escapes is a traceback,
    and fails the test."""
    from pipeline.cli.main import main

    out, err = io.StringIO(), io.StringIO()
    argv = sys.argv
    sys.argv = ["pipeline", *args]
    try:
        with redirect_stdout(out), redirect_stderr(err):
            main()
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    finally:
        sys.argv = argv
    return CliResult(code, out.getvalue(), err.getvalue())


def one_line(result: CliResult, code: int, *needles: str) -> str:
    assert result.returncode == code, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith("[")]
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer BERT (hidden 32) with random weights and MiniLM's WordPiece tokenizer."""
    return write_tiny_bert(tmp_path_factory.mktemp("tiny-bert"), hidden_size=32, num_hidden_layers=2,
                           num_attention_heads=2, intermediate_size=64, max_position_embeddings=128)


@pytest.fixture(scope="session")
def tiny_build(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished, passed CPU build of the tiny model (about 10 s)."""
    from pipeline.build.runner import run_build
    from pipeline.config import load_config
    from pipeline.core.progress import Progress

    build_dir = tmp_path_factory.mktemp("tiny-build") / "build"
    config = load_config(None, {"output_dir": str(build_dir), "model": {"path": str(tiny_model)},
                                "calibration": TINY_CALIBRATION})
    run_build(config, Progress(quiet=True))
    return build_dir


@pytest.fixture
def build_copy(tiny_build: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny build to damage."""
    copy = tmp_path / "build"
    shutil.copytree(tiny_build, copy)
    return copy


def read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def write_json(path: Path, data: object) -> None:
    path.write_text(json.dumps(data, indent=2), encoding="utf-8")


def reseal(build_dir: Path, stage: str) -> None:
    """A full forgery: after editing a stage's files, rewrite its stage.json hashes and the manifest's record
    of them, so that every hash in the directory agrees (what an attacker without the user's key can do)."""
    from pipeline.core.hashing import directory_hashes, file_sha256

    manifest = read_json(build_dir / "manifest.json")
    entry = next(e for e in manifest["stages"] if e["stage"] == stage)
    directory = build_dir / ".stages" / entry["directory"]
    record = read_json(directory / "stage.json")
    files = directory_hashes(directory)
    files.pop("stage.json")
    record["files"] = files
    write_json(directory / "stage.json", record)
    entry["outputs"] = files
    entry["record_sha256"] = file_sha256(directory / "stage.json")
    entry["facts"] = record["facts"]
    write_json(build_dir / "manifest.json", manifest)


@pytest.fixture(scope="session")
def tiny_classifier_build(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A passed build of a tiny 2-label BERT classifier verified on a labelled file (its tokenizer is loaded
    again by `pipeline verify`)."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    from pipeline.build.runner import run_build
    from pipeline.config import load_config
    from pipeline.core.progress import Progress

    root = tmp_path_factory.mktemp("tiny-classifier")
    folder = root / "model"
    config = AutoConfig.from_pretrained(str(tiny_model), num_labels=2,
                                        architectures=["BertForSequenceClassification"])
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(str(tiny_model)).save_pretrained(folder)
    eval_file = root / "eval.txt"
    eval_file.write_text("".join(f"{i % 2}\tsentence {i} about the weather\n" for i in range(16)), encoding="utf-8")
    build_dir = root / "build"
    settings = {"output_dir": str(build_dir), "model": {"path": str(folder)}, "calibration": TINY_CALIBRATION,
                "verify": {"eval_file": str(eval_file), "min_top1_agreement": 0.5}}
    run_build(load_config(None, settings), Progress(quiet=True))
    return build_dir
