"""PEFT LoRA adapters as inputs (issue 19, item 1): merged onto their base, the export checked against the
unmerged PeftModel, several adapters of one base sharing the stages that read no weights, and untrusted
adapter folders refused with one line and exit 2. The references are peft's own PeftModel forward and
plain ONNX Runtime sessions of the published graphs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import assert_one_line_error, run_cli

pytest.importorskip("peft")

ENCODER_SIZES = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
CALIBRATION = {"samples": 16, "heldout_samples": 16}
LLM_CALIBRATION = {"samples": 16, "heldout_samples": 32}


def write_adapter(base: Path, folder: Path, targets: list[str], seed: int, auto_class: str = "AutoModel",
                  **lora: object) -> Path:
    """A random (non-zero B) LoRA adapter of `base`, made by peft and saved as safetensors."""
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = getattr(transformers, auto_class).from_pretrained(str(base))
    get_peft_model(model, LoraConfig(r=4, target_modules=targets, init_lora_weights=False, **lora)).save_pretrained(
        str(folder))
    return folder


def peft_model(base: Path, adapter: Path, auto_class: str = "AutoModel"):
    import transformers
    from peft import PeftModel

    model = getattr(transformers, auto_class).from_pretrained(str(base), attn_implementation="eager")
    return PeftModel.from_pretrained(model, str(adapter)).eval()


def embeddings_of(model, tokenizer, sentences: list[str], normalize: bool) -> np.ndarray:
    """Mean-pooled last hidden states in PyTorch (the model's own forward), optionally L2-normalized."""
    import torch

    batch = tokenizer(sentences, padding=True, truncation=True, max_length=128, return_tensors="pt")
    with torch.inference_mode():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    if normalize:
        pooled = torch.nn.functional.normalize(pooled, dim=-1)
    return pooled.numpy()


def onnx_embeddings(path: Path, tokenizer, sentences: list[str]) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    batch = tokenizer(sentences, padding=True, truncation=True, max_length=128, return_tensors="np")
    feed = {name: value.astype(np.int64) for name, value in batch.items() if name in names}
    return session.run(["sentence_embedding"], feed)[0]


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def build(tmp: Path, name: str, cache: Path, **model: str):
    from pipeline.build.runner import run_build
    from pipeline.config import load_config
    from pipeline.core.progress import Progress

    calibration = LLM_CALIBRATION if "llama" in name else CALIBRATION
    config = load_config(None, {"output_dir": str(tmp / name), "model": model, "calibration": calibration})
    return run_build(config, Progress(quiet=True), cache_dir=cache)


@pytest.fixture(scope="module")
def encoder_builds(tmp_path_factory: pytest.TempPathFactory, inputs_cache):
    """A tiny BERT and two adapters: one given with --adapter, one as a folder naming its base; shared cache."""
    from tests.tiny_encoders import write_tiny_bert

    tmp = tmp_path_factory.mktemp("lora-encoder")
    base = write_tiny_bert(tmp / "bert", **ENCODER_SIZES)
    first = write_adapter(base, tmp / "first", ["query", "value"], seed=1)
    second = write_adapter(base, tmp / "second", ["query", "key", "dense"], seed=2)
    cache = tmp / "cache"
    results = (build(tmp, "b1", cache, path=str(base), adapter=str(first)),
               build(tmp, "b2", cache, path=str(second)))
    return base, (first, second), results


def test_encoder_adapters_build_and_follow_the_peft_model(encoder_builds):
    from tests.tiny_encoders import minilm_tokenizer

    base, adapters, results = encoder_builds
    tokenizer = minilm_tokenizer()
    sentences = [f"sentence number {i} about markets, football and the weather" for i in range(8)]
    from transformers import AutoModel

    base_model = AutoModel.from_pretrained(str(base), attn_implementation="eager").eval()
    for adapter, result in zip(adapters, results):
        assert result.passed is True
        manifest = json.loads((result.build_dir / "manifest.json").read_text())
        origin = manifest["model"]["origin"]
        assert (origin["kind"], origin["base"], origin["adapter"]) == ("lora", str(base), str(adapter))
        export = result.outputs["export"].metrics
        assert max(export["torch_parity_max_abs"].values()) <= 1e-3  # against the unmerged PeftModel
        reference = embeddings_of(peft_model(base, adapter), tokenizer, sentences, normalize=False)
        fp32 = onnx_embeddings(result.build_dir / "model.fp32.onnx", tokenizer, sentences)
        assert np.abs(fp32 - reference).max() <= 1e-3
    assert results[0].build_dir != results[1].build_dir
    # the two adapters really differ, and neither graph is the base's
    one = onnx_embeddings(results[0].build_dir / "model.fp32.onnx", tokenizer, sentences)
    two = onnx_embeddings(results[1].build_dir / "model.fp32.onnx", tokenizer, sentences)
    plain = embeddings_of(base_model, tokenizer, sentences, normalize=False)
    assert np.abs(one - two).max() > 1e-2 and np.abs(one - plain).max() > 1e-2


def test_adapters_of_one_base_share_calibration_inputs(encoder_builds):
    """The CPU encoder's calibrate computes ranges on the adapted graph (keyed by it), but its own inputs are
    the tokenizer's, equal for both adapters; the export differs (the weights do)."""
    _, _, (first, second) = encoder_builds
    records = [{name: json.loads(out.path("stage.json").read_text())["inputs"] for name, out in r.outputs.items()}
               for r in (first, second)]
    assert records[0]["calibrate"]["tokenizer"] == records[1]["calibrate"]["tokenizer"]
    assert records[0]["calibrate"]["source"] == records[1]["calibrate"]["source"]
    assert records[0]["export"]["model_folder"] != records[1]["export"]["model_folder"]


def test_decoder_adapters_build_and_share_calibration(tiny_llama_folder, tmp_path, inputs_cache):
    llama_base = tiny_llama_folder
    first = write_adapter(llama_base, tmp_path / "first", ["q_proj", "v_proj", "down_proj"], seed=1,
                          auto_class="AutoModelForCausalLM", task_type="CAUSAL_LM")
    second = write_adapter(llama_base, tmp_path / "second", ["k_proj", "up_proj"], seed=2,
                           auto_class="AutoModelForCausalLM", task_type="CAUSAL_LM")
    cache = tmp_path / "cache"
    result = build(tmp_path, "llama1", cache, path=str(llama_base), adapter=str(first))
    assert result.passed is True
    assert json.loads((result.build_dir / "manifest.json").read_text())["model"]["origin"]["kind"] == "lora"
    assert max(result.outputs["export"].metrics["torch_parity_max_abs"].values()) <= 1e-3

    from pipeline.build.runner import run_build
    from pipeline.config import load_config
    from pipeline.core.progress import Progress

    config = load_config(None, {"output_dir": str(tmp_path / "llama2"), "calibration": LLM_CALIBRATION,
                                "model": {"path": str(llama_base), "adapter": str(second)}})
    again = run_build(config, Progress(quiet=True), cache_dir=cache, stop_after="calibrate")
    assert again.outputs["export"].reused is False  # other weights
    assert again.outputs["calibrate"].reused is True  # same tokenizer, same text: shared with the first adapter


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory: pytest.TempPathFactory):
    from tests.tiny_encoders import write_tiny_bert

    return write_tiny_bert(tmp_path_factory.mktemp("lora-bad") / "bert", **ENCODER_SIZES)


def test_untrusted_adapter_folders_are_refused_in_one_line(tiny_base, tmp_path, inputs_cache):
    from pipeline.core.errors import InputError
    from pipeline.models.adapters import prepare_input

    good = write_adapter(tiny_base, tmp_path / "good", ["query"], seed=3)

    def variant(name: str, edit) -> Path:
        folder = tmp_path / name
        shutil.copytree(good, folder)
        edit(folder)
        return folder

    def set_config(folder: Path, **values: object) -> None:
        config = json.loads((folder / "adapter_config.json").read_text())
        config.update(values)
        (folder / "adapter_config.json").write_text(json.dumps(config))

    no_base = variant("no-base", lambda f: set_config(f, base_model_name_or_path=str(tmp_path / "missing")))
    nothing = variant("nothing", lambda f: set_config(f, target_modules=["no_such_layer"]))

    def pickled(folder: Path) -> None:
        (folder / "adapter_model.safetensors").rename(folder / "adapter_model.bin")

    bin_only = variant("bin-only", pickled)
    prefix = variant("prefix", lambda f: set_config(f, peft_type="PREFIX_TUNING"))
    garbled = variant("garbled", lambda f: (f / "adapter_config.json").write_text("{not json"))

    def stray(folder: Path) -> None:  # a tensor for a layer the config does not adapt
        from safetensors.torch import load_file, save_file

        tensors = load_file(str(folder / "adapter_model.safetensors"))
        extra = {k.replace(".query.", ".key."): v.clone() for k, v in tensors.items()}
        save_file({**tensors, **extra}, str(folder / "adapter_model.safetensors"))

    strays = variant("stray", stray)
    cases = {no_base: "not a local model folder", nothing: "no_such_layer name no module",
             bin_only: "is a pickle, which is never loaded", prefix: "only LORA adapters",
             garbled: "is not valid JSON", strays: "fit no LoRA layer"}
    for folder, needle in cases.items():
        with pytest.raises(InputError, match=needle) as caught:
            prepare_input(None, str(folder))
        assert caught.value.exit_code == 2

    def wider(folder: Path) -> None:  # rank-4 tensors under a config of rank 8: a shape mismatch
        import torch
        from safetensors.torch import load_file, save_file

        tensors = load_file(str(folder / "adapter_model.safetensors"))
        save_file({k: torch.cat([v, v], dim=0 if "lora_A" in k else 1) for k, v in tensors.items()},
                  str(folder / "adapter_model.safetensors"))

    mismatch = variant("mismatch", wider)
    result = run_cli("build", "--model", str(tiny_base), "--adapter", str(mismatch), "-o", str(tmp_path / "out"))
    assert_one_line_error(result, 2, "does not fit its base")
