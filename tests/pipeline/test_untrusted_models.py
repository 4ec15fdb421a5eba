"""Untrusted model folders: pickled weights only through weights-only loading, a folder's own code only
with --trust-remote-code, and folders that are not models refused with one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pipeline.core.errors import ExitCode, InputError
from pipeline.models.registry import check_pickled_weights, default_model_path, inspect_model
from pipeline.stages.export import load_torch_model
from tests.helpers import assert_one_line_error, run_cli


def _folder_without_weights(target: Path) -> Path:
    source = default_model_path()
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("*.safetensors"))
    return target


class _Payload:
    """Unpickling this runs `Path(sentinel).touch()`: what a malicious checkpoint smuggles in."""

    def __init__(self, sentinel: Path) -> None:
        self.sentinel = sentinel

    def __reduce__(self):
        return (Path.touch, (self.sentinel,))


@pytest.fixture(scope="module")
def bin_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default model saved as a pickled PyTorch checkpoint (pytorch_model.bin), as transformers 4
    wrote it with safe_serialization=False (transformers 5 dropped that option; the format is
    torch.save of the state dict)."""
    import torch
    from transformers import AutoModel

    folder = _folder_without_weights(tmp_path_factory.mktemp("bin") / "minilm-bin")
    model = AutoModel.from_pretrained(str(default_model_path()))
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    return folder


def test_pickled_bin_checkpoint_loads_through_weights_only_loading(bin_checkpoint: Path) -> None:
    import torch

    check_pickled_weights(bin_checkpoint)  # plain tensors: accepted
    loaded = load_torch_model(inspect_model(str(bin_checkpoint), None))
    reference = load_torch_model(inspect_model(None, None))
    for (name, value), (_, expected) in zip(loaded.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(value, expected), name


@pytest.mark.parametrize("container", ["zip", "legacy"])
def test_malicious_pickle_is_refused_and_never_executed(tmp_path: Path, container: str) -> None:
    import pickle

    import torch

    folder = _folder_without_weights(tmp_path / "evil")
    sentinel = tmp_path / "pwned"
    weights = folder / "pytorch_model.bin"
    if container == "zip":  # what torch.save writes
        torch.save({"embeddings.word_embeddings.weight": _Payload(sentinel)}, weights)
    else:  # a bare pickle, the pre-1.6 layout
        weights.write_bytes(pickle.dumps({"weight": _Payload(sentinel)}))
    with pytest.raises(InputError, match="refusing .*pytorch_model.bin"):
        load_torch_model(inspect_model(str(folder), None))
    assert not sentinel.exists(), "the pickle's code ran"


def test_cli_refuses_a_malicious_checkpoint_with_exit_2(tmp_path: Path) -> None:
    import torch

    folder = _folder_without_weights(tmp_path / "evil")
    sentinel = tmp_path / "pwned"
    torch.save({"weight": _Payload(sentinel)}, folder / "pytorch_model.bin")
    result = run_cli("build", "--model", str(folder), "-o", str(tmp_path / "out"), "--stop-after", "export",
                     "--quiet")
    assert_one_line_error(result, ExitCode.BAD_INPUT, "refusing", "pytorch_model.bin", "Unsupported global",
                          "safetensors")
    assert not sentinel.exists()
    assert not list((tmp_path / "out" / ".stages").glob("*")), "no stage output or staging folder is left"


@pytest.fixture
def remote_code_folder(tmp_path: Path) -> Path:
    """The default model with an auto_map pointing at code in the folder, which marks that it ran."""
    folder = tmp_path / "custom"
    shutil.copytree(default_model_path(), folder)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModel": "custom_model.CustomModel"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "custom_model.py").write_text(
        "from pathlib import Path\n"
        "from transformers import BertModel\n"
        f"Path({str(tmp_path / 'ran')!r}).touch()\n"
        "class CustomModel(BertModel):\n"
        "    pass\n"
    )
    return folder


def test_folder_code_never_runs_without_trust_remote_code(remote_code_folder: Path, tmp_path: Path) -> None:
    model = load_torch_model(inspect_model(str(remote_code_folder), None))
    assert type(model).__name__ == "BertModel"
    assert not (tmp_path / "ran").exists()


def test_trust_remote_code_is_threaded_to_the_loader(remote_code_folder: Path, tmp_path: Path) -> None:
    model = load_torch_model(inspect_model(str(remote_code_folder), None, trust_remote_code=True))
    assert type(model).__name__ == "CustomModel"
    assert (tmp_path / "ran").exists()


def test_trust_remote_code_flag_defaults_off() -> None:
    assert "trust_remote_code: false" in run_cli("build", "--print-config").stdout
    assert "trust_remote_code: true" in run_cli("build", "--trust-remote-code", "--print-config").stdout


@pytest.mark.parametrize("problem", ["config-list", "config-heads", "garbage-safetensors", "garbage-tokenizer"])
def test_folder_that_is_not_a_model_is_an_input_error(tmp_path: Path, problem: str) -> None:
    folder = tmp_path / "model"
    shutil.copytree(default_model_path(), folder)
    if problem == "config-list":
        (folder / "config.json").write_text("[]")
    elif problem == "config-heads":
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "num_attention_heads": "twelve"}))
    elif problem == "garbage-safetensors":
        (folder / "model.safetensors").write_bytes(b"\x00\x01 not safetensors" * 100)
    else:
        (folder / "tokenizer.json").write_text("{ not json")
    with pytest.raises(InputError):
        info = inspect_model(str(folder), None)
        if problem == "garbage-tokenizer":
            from pipeline.models.registry import load_tokenizer

            load_tokenizer(info)
        else:
            load_torch_model(info)
