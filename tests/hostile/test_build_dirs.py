"""Build directories from elsewhere: the manifest is schema-checked, every file used is hash-checked
(stage records and verdicts included), and trust comes only from the user's own flags."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.hostile.conftest import cli, one_line, read_json, reseal, write_json

SENTINEL_CODE = '''
import pathlib
pathlib.Path({sentinel!r}).write_text("shipped code ran")
from transformers import BertTokenizerFast as EvilTokenizer
'''


def _stage_dir(build_dir: Path, stage: str) -> Path:
    manifest = read_json(build_dir / "manifest.json")
    return build_dir / ".stages" / next(e["directory"] for e in manifest["stages"] if e["stage"] == stage)


def test_verify_never_runs_code_shipped_in_a_build_whose_manifest_trusts_it(tiny_classifier_build: Path,
                                                                             tmp_path: Path) -> None:
    import shutil

    build = tmp_path / "build"
    shutil.copytree(tiny_classifier_build, build)
    sentinel = tmp_path / "executed"
    tokenizer = _stage_dir(build, "export") / "tokenizer"  # loaded again by verify (evaluation file)
    (tokenizer / "evil_tokenizer.py").write_text(SENTINEL_CODE.format(sentinel=str(sentinel)), encoding="utf-8")
    config = read_json(tokenizer / "tokenizer_config.json")
    config["auto_map"] = {"AutoTokenizer": ["evil_tokenizer.EvilTokenizer", "evil_tokenizer.EvilTokenizer"]}
    write_json(tokenizer / "tokenizer_config.json", config)
    reseal(build, "export")  # every hash agrees: only the trust decision stands between the build and the code
    manifest = read_json(build / "manifest.json")
    manifest["config"]["model"]["trust_remote_code"] = True
    write_json(build / "manifest.json", manifest)
    result = cli("verify", str(build), "-q")
    assert not sentinel.exists(), "verify ran Python code shipped in the build directory"
    assert "Traceback" not in result.stderr
    assert result.returncode in (0, 2, 4), result.stderr


def test_a_forged_passed_verdict_is_not_republished(build_copy: Path, tiny_model: Path) -> None:
    from pipeline.build.runner import run_build
    from pipeline.config import load_config
    from pipeline.core.errors import ParityError
    from pipeline.core.progress import Progress
    from tests.hostile.conftest import TINY_CALIBRATION

    config = load_config(None, {"output_dir": str(build_copy), "model": {"path": str(tiny_model)},
                                "calibration": TINY_CALIBRATION, "verify": {"max_abs": 1e-9, "localize": "never"}})
    with pytest.raises(ParityError):
        run_build(config, Progress(quiet=True))
    assert not (build_copy / "model.onnx").exists()
    record_path = _stage_dir(build_copy, "verify") / "stage.json"
    record = read_json(record_path)
    record["facts"].update(passed=True, failures=[])
    record["metrics"].update(passed=True, failures=[])
    write_json(record_path, record)
    reseal(build_copy, "verify")
    with pytest.raises(ParityError):  # the verify stage runs again instead of reusing the forged verdict
        run_build(config, Progress(quiet=True))
    assert not (build_copy / "model.onnx").exists()
    assert read_json(build_copy / "manifest.json")["status"] == "parity_failed"


def test_verify_refuses_a_stage_record_edited_after_the_build(build_copy: Path) -> None:
    record_path = _stage_dir(build_copy, "quantize") / "stage.json"
    record = read_json(record_path)
    record["metrics"]["forged"] = True
    write_json(record_path, record)
    one_line(cli("verify", str(build_copy), "-q"), 2, "stage.json", "does not match the manifest")


def test_export_triton_refuses_a_model_that_no_longer_matches_the_manifest(build_copy: Path, tmp_path: Path) -> None:
    import shutil

    shutil.copyfile(build_copy / "model.fp32.onnx", build_copy / "model.onnx")  # a valid graph, not the verified one
    one_line(cli("export-triton", str(build_copy), str(tmp_path / "repo")), 2, "model.onnx", "sha256")
    assert not (tmp_path / "repo").exists() or not any((tmp_path / "repo").iterdir())


def test_serve_refuses_a_tokenizer_file_replaced_by_a_symlink(build_copy: Path) -> None:
    vocab = next(p for p in sorted((build_copy / "tokenizer").iterdir()) if p.suffix == ".json")
    vocab.unlink()
    os.symlink("/etc/hostname", vocab)
    from pipeline.core.errors import InputError
    from pipeline.deploy.serve import BuildModel

    with pytest.raises(InputError, match="not a regular file|does not match"):
        BuildModel(build_copy)


def test_a_fifo_for_a_manifest_is_one_line(build_copy: Path) -> None:
    (build_copy / "manifest.json").unlink()
    os.mkfifo(build_copy / "manifest.json")
    one_line(cli("export-triton", str(build_copy), str(build_copy.parent / "repo")), 2)


def _damage(manifest: dict, kind: str) -> object:
    if kind == "unknown-key":
        manifest["shell"] = "rm -rf ~"
    elif kind == "task-evil":
        manifest["model"]["task"] = "evil"
    elif kind == "status-bogus":
        manifest["status"] = "passed-ish"
    elif kind == "artifact-escapes":
        manifest["artifacts"]["../../etc/passwd"] = "0" * 64
    elif kind == "stage-directory-escapes":
        manifest["stages"][0]["directory"] = "../../.."
    elif kind == "no-schema-version":
        del manifest["schema_version"]
    elif kind == "config-unknown-key":
        manifest["config"]["model"]["trust_everything"] = True
    elif kind == "stages-not-a-list":
        manifest["stages"] = {"export": 1}
    elif kind == "wall-time-text":
        manifest["wall_time_s"] = "fast"
    elif kind == "bool-for-number":
        manifest["config"]["calibration"]["max_length"] = True
    elif kind == "not-an-object":
        return ["manifest"]
    return manifest


DAMAGES = ("unknown-key", "task-evil", "status-bogus", "artifact-escapes", "stage-directory-escapes",
           "no-schema-version", "config-unknown-key", "stages-not-a-list", "wall-time-text", "bool-for-number",
           "not-an-object")


@pytest.mark.parametrize("kind", DAMAGES)
def test_a_damaged_manifest_is_one_line_exit_2_in_every_command(build_copy: Path, kind: str) -> None:
    write_json(build_copy / "manifest.json", _damage(read_json(build_copy / "manifest.json"), kind))
    for command in (("verify", str(build_copy), "-q"), ("export-triton", str(build_copy), str(build_copy / "r")),
                    ("serve", str(build_copy), "--port", "1")):
        one_line(cli(*command), 2, "manifest")


def test_build_refuses_a_user_folder_holding_a_manifest_json(tmp_path: Path, tiny_model: Path) -> None:
    folder = tmp_path / "mine"
    (folder / "tokenizer").mkdir(parents=True)
    files = {"manifest.json": '{"my": "data"}', "notes.txt": "keep me", "tokenizer/mine.txt": "mine",
             "model.onnx": "my own model"}
    for name, text in files.items():
        (folder / name).write_text(text, encoding="utf-8")
    one_line(cli("build", "--model", str(tiny_model), "-o", str(folder), "-q"), 2, "refusing", ".quantpipe-build")
    assert {name: (folder / name).read_text(encoding="utf-8") for name in files} == files
    assert sorted(p.name for p in folder.iterdir()) == sorted(["manifest.json", "notes.txt", "tokenizer", "model.onnx"])


def test_verify_output_refuses_a_user_folder(build_copy: Path, tmp_path: Path) -> None:
    folder = tmp_path / "reports"
    folder.mkdir()
    (folder / "parity.md").write_text("my notes", encoding="utf-8")
    one_line(cli("verify", str(build_copy), "-o", str(folder), "-q"), 2, "refusing")
    assert (folder / "parity.md").read_text(encoding="utf-8") == "my notes"


def test_a_marked_build_directory_is_rebuilt_in_place(tiny_build: Path) -> None:
    assert (tiny_build / ".quantpipe-build").is_file()
    assert json.loads((tiny_build / "manifest.json").read_text())["status"] == "passed"


def test_a_lock_file_symlinked_to_a_user_file_never_truncates_it(build_copy: Path, tmp_path: Path) -> None:
    precious = tmp_path / "precious.txt"
    precious.write_text("my work", encoding="utf-8")
    (build_copy / ".lock").unlink()
    os.symlink(precious, build_copy / ".lock")
    one_line(cli("verify", str(build_copy), "-q"), 2, "build directory")
    assert precious.read_text(encoding="utf-8") == "my work"
