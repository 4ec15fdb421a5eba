"""Model folders that are not what they claim: refused before export, one line, exit 2."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import pytest

from tests.hostile.conftest import cli, one_line


def _config(**changes: object) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        config = json.loads((folder / "config.json").read_text())
        config.update(changes)
        (folder / "config.json").write_text(json.dumps(config))
    return edit


def _weights(change: Callable[[dict], dict]) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        from safetensors.torch import load_file, save_file

        tensors = change(load_file(folder / "model.safetensors"))
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return edit


def _nan(tensors: dict) -> dict:
    name = sorted(tensors)[0]
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] = float("nan")
    return tensors


def _unrelated(tensors: dict) -> dict:
    import torch

    return {"decoy.weight": torch.zeros(4)}


def _drop_tokenizer(folder: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        (folder / name).unlink(missing_ok=True)


CASES = {
    "layers-negative": (_config(num_hidden_layers=-1), "num_hidden_layers"),
    "layers-1e9": (_config(num_hidden_layers=1e9), "num_hidden_layers"),
    "layers-over-bound": (_config(num_hidden_layers=10**9), "1..512"),
    "heads-zero": (_config(num_attention_heads=0), "num_attention_heads"),
    "vocab-huge": (_config(vocab_size=10**12), "vocab_size"),
    "positions-bool": (_config(max_position_embeddings=True), "max_position_embeddings"),
    "architectures-5": (_config(architectures=5), "architectures"),
    "tokenizer-deleted": (_drop_tokenizer, "vocabulary"),
    "vocab-mismatch": (_config(vocab_size=4_000_000), "covers"),
    "nan-weights": (_weights(_nan), "NaN"),
    "encoder-tensors-missing": (_weights(lambda t: {k: v for k, v in t.items() if "layer.1." not in k}),
                                "encoder.layer.1"),
    "only-an-unrelated-tensor": (_weights(_unrelated), "lacks tensors"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_folder_that_is_not_what_it_claims_is_refused(tiny_model: Path, tmp_path: Path, case: str) -> None:
    edit, needle = CASES[case]
    folder = tmp_path / "model"
    shutil.copytree(tiny_model, folder)
    edit(folder)
    out = tmp_path / "out"
    one_line(cli("build", "--model", str(folder), "-o", str(out), "--stop-after", "export", "-q"), 2, needle)
    assert not any(out.glob(".stages/export-*")), "an export was published from a bad folder"


def test_a_pickle_with_code_in_a_bin_checkpoint_never_runs(tiny_model: Path, tmp_path: Path) -> None:
    import pickle

    sentinel = tmp_path / "executed"

    class Payload:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (open, (str(sentinel), "w"))

    folder = tmp_path / "model"
    shutil.copytree(tiny_model, folder)
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps({"weight": Payload()}))
    one_line(cli("build", "--model", str(folder), "-o", str(tmp_path / "out"), "--stop-after", "export", "-q"), 2)
    assert not sentinel.exists()


def test_a_yaml_bomb_is_one_line(tmp_path: Path) -> None:
    lines = ['a0: &a0 ["x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    lines += [f"a{i}: &a{i} [*a{i-1}, *a{i-1}, *a{i-1}, *a{i-1}, *a{i-1}, *a{i-1}, *a{i-1}, *a{i-1}, *a{i-1}]"
              for i in range(1, 9)]
    lines += ["quantization:", "  exclude: *a8"]
    build_file = tmp_path / "bomb.yaml"
    build_file.write_text("\n".join(lines) + "\n", encoding="utf-8")
    one_line(cli("build", "--config", str(build_file), "-o", str(tmp_path / "out"), "-q"), 2)
