"""bitsandbytes checkpoints as inputs (issue 19, item 2): real checkpoints written by transformers with
bitsandbytes' CPU backend, de-quantized exactly (checked against the raw safetensors decoded in numpy), built
like any other model, with parity against the bitsandbytes model's own forward; the nf4 decoder's 4-bit
re-rounding counted. Skipped, with the reason, where bitsandbytes does not install or run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (the finetune extra)")

SIZES = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 128}


def save_quantized(source: Path, target: Path, kind: str, auto_class: str) -> Path:
    """The folder transformers writes for a model loaded with a BitsAndBytesConfig (quantized by bitsandbytes)."""
    import transformers
    from transformers import BitsAndBytesConfig

    settings = (BitsAndBytesConfig(load_in_8bit=True) if kind == "8bit"
                else BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=kind, bnb_4bit_compute_dtype="float32"))
    try:
        model = getattr(transformers, auto_class).from_pretrained(str(source), quantization_config=settings,
                                                                   device_map="cpu", dtype="float32")
    except Exception as exc:  # bitsandbytes without a backend for this CPU
        pytest.skip(f"bitsandbytes does not run on this CPU: {exc}")
    model.save_pretrained(str(target))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        if (source / name).is_file():
            (target / name).write_bytes((source / name).read_bytes())
    return target


def raw_dequantized(folder: Path) -> dict[str, np.ndarray]:
    """Each quantized weight decoded from the stored tensors alone: int8 * SCB / 127 per row (LLM.int8), or
    quant_map[code] * absmax per block (4-bit: two codes per byte, the first in the high nibble)."""
    from safetensors.numpy import load_file

    tensors = {}
    for file in folder.glob("*.safetensors"):
        tensors.update(load_file(str(file)))
    weights = {}
    for key, value in tensors.items():
        if key.endswith(".SCB"):
            stem = key[: -len(".SCB")]
            weights[stem + ".weight"] = tensors[stem + ".weight"].astype(np.float32) * value[:, None] / np.float32(127)
        elif key.endswith(".weight.absmax"):
            stem = key[: -len(".absmax")]
            state = json.loads(bytes(next(v for k, v in tensors.items() if k.startswith(stem + ".quant_state."))))
            packed = tensors[stem].reshape(-1)
            codes = np.stack([packed >> 4, packed & 0x0F], axis=-1).reshape(-1)
            values = tensors[stem + ".quant_map"][codes].reshape(value.size, -1) * value[:, None]
            weights[stem] = values.reshape(state["shape"]).astype(np.float32)
    return weights


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.tiny_encoders import write_tiny_bert

    return write_tiny_bert(tmp_path_factory.mktemp("bnb-bert") / "bert", **SIZES)


@pytest.mark.parametrize("kind", ["8bit", "nf4", "fp4"])
def test_dequantization_is_exact(bert_folder, tmp_path, inputs_cache, kind):
    from safetensors.numpy import load_file

    from pipeline.models.adapters import prepare_input

    checkpoint = save_quantized(bert_folder, tmp_path / kind, kind, "AutoModel")
    path, origin = prepare_input(str(checkpoint), None)
    assert origin is not None and origin["quantization"] == ("8bit" if kind == "8bit" else f"4bit-{kind}")
    assert "quantization_config" not in json.loads((Path(path) / "config.json").read_text())
    expected = raw_dequantized(checkpoint)
    actual = load_file(str(Path(path) / "model.safetensors"))
    assert len(expected) == 13  # q, k, v, attention output, FFN in and out in both layers; the pooler
    for name, values in expected.items():  # 4-bit: bit for bit; 8-bit: to one float32 rounding of the scale
        np.testing.assert_allclose(actual[name], values, rtol=2.5e-7 if kind == "8bit" else 0, atol=0)
    if kind != "8bit":  # neither nf4 nor fp4 is an affine grid: every block is re-rounded, and said so
        assert origin["blocks"] == sum(v.size for v in expected.values()) // 64 and origin["affine_blocks"] == 0


def bnb_reference(checkpoint: Path, tokenizer, sentences: list[str], auto_class: str,
                  dequantize: bool = False) -> np.ndarray:
    """The bitsandbytes model's forward (its own CPU kernels), or with dequantize=True transformers'
    `model.dequantize()` of it (the exact weights in FP32 matmuls)."""
    import torch
    import transformers

    model = getattr(transformers, auto_class).from_pretrained(str(checkpoint), device_map="cpu", dtype="float32",
                                                               attn_implementation="eager").eval()
    if dequantize:
        model = model.dequantize()
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.inference_mode():
        if auto_class == "AutoModel":
            hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).float()
            return ((hidden * mask).sum(1) / mask.sum(1)).numpy()
        return model(input_ids=batch["input_ids"]).logits.numpy()


@pytest.mark.parametrize("kind", ["8bit", "nf4"])
def test_encoder_checkpoint_builds_with_parity_against_bitsandbytes(bert_folder, tmp_path, inputs_cache, kind):
    import onnxruntime as ort

    import pipeline
    from tests.tiny_encoders import minilm_tokenizer

    checkpoint = save_quantized(bert_folder, tmp_path / kind, kind, "AutoModel")
    result = pipeline.build(model=str(checkpoint), output=str(tmp_path / "build"), calib_samples=16,
                            heldout_samples=16)
    assert result.passed is True
    origin = json.loads((result.build_dir / "manifest.json").read_text())["model"]["origin"]
    assert origin["kind"] == "bitsandbytes" and origin["quantization"] == ("8bit" if kind == "8bit" else "4bit-nf4")
    tokenizer = minilm_tokenizer()
    sentences = [f"the {i}th report on trade, rugby and elections" for i in range(6)]
    expected = bnb_reference(checkpoint, tokenizer, sentences, "AutoModel")
    session = ort.InferenceSession(str(result.build_dir / "model.fp32.onnx"), providers=["CPUExecutionProvider"])
    batch = tokenizer(sentences, padding=True, return_tensors="np")
    names = {i.name for i in session.get_inputs()}
    actual = session.run(["sentence_embedding"], {k: v for k, v in batch.items() if k in names})[0]
    exact = bnb_reference(checkpoint, tokenizer, sentences, "AutoModel", dequantize=True)
    assert np.abs(actual - exact).max() <= 1e-3  # the de-quantized graph is the bitsandbytes model's weights
    # bitsandbytes' kernels (8-bit: FP16 activations; 4-bit: bf16 on some CPUs) by cosine
    cosine = np.sum(actual * expected, -1) / (np.linalg.norm(actual, axis=-1) * np.linalg.norm(expected, axis=-1))
    assert cosine.min() >= 0.999, cosine


def test_nf4_decoder_builds_and_reports_its_re_rounding(tmp_path, inputs_cache):
    pytest.importorskip("gguf")
    import onnxruntime as ort

    import pipeline
    from pipeline.models.loading import load_llm_tokenizer
    from tests.tiny_decoders import write_tiny_decoder

    source = write_tiny_decoder("llama", tmp_path / "llama")
    checkpoint = save_quantized(source, tmp_path / "nf4", "nf4", "AutoModelForCausalLM")
    # Up to quantize (its block counts): the decoder verify stage runs on the LoRA decoder build
    # (tests/pipeline/test_adapters.py), and this test's parity is against bitsandbytes below.
    result = pipeline.build(model=str(checkpoint), output=str(tmp_path / "build"), calib_samples=16,
                            heldout_samples=32, block_size=64, stop_after="quantize")
    origin = json.loads((result.build_dir / "manifest.json").read_text())["model"]["origin"]
    quantize = result.outputs["quantize"].metrics
    assert origin["blocks"] > 0 and origin["affine_blocks"] == 0 and "re-rounds" in origin["exact"]
    assert quantize.get("source_grid_blocks", 0) == 0  # MatMulNBits found no nf4 block on an affine grid
    assert max(result.outputs["export"].metrics["torch_parity_max_abs"].values()) <= 1e-3
    tokenizer = load_llm_tokenizer(checkpoint)
    text = "The markets closed higher on Friday"
    expected = bnb_reference(checkpoint, tokenizer, [text], "AutoModelForCausalLM")
    session = ort.InferenceSession(str(result.outputs["export"].path("model.onnx")), providers=["CPUExecutionProvider"])
    ids = np.array(tokenizer(text).input_ids, dtype=np.int64)[None, :]
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(ids.shape[1])[None, :]}
    for spec in session.get_inputs():
        if spec.name not in feed:  # empty past keys/values
            shape = [1 if d == "batch" or d == "batch_size" else 0 if isinstance(d, str) else d for d in spec.shape]
            feed[spec.name] = np.zeros(shape, dtype=np.float32)
    logits = session.run(["logits"], feed)[0][0]
    exact = bnb_reference(checkpoint, tokenizer, [text], "AutoModelForCausalLM", dequantize=True)[0]
    assert np.abs(logits - exact).max() <= 1e-3
    # bitsandbytes' own 4-bit CPU kernel computes in lower precision (bf16 where the CPU has it), so its
    # forward is followed closely, not to 1e-3: cosine per position.
    kernel = expected[0]
    cosine = np.sum(logits * kernel, -1) / (np.linalg.norm(logits, axis=-1) * np.linalg.norm(kernel, axis=-1))
    assert cosine.min() >= 0.99, cosine


def test_qlora_adapter_merges_onto_the_4bit_base(bert_folder, tmp_path, inputs_cache):
    """An adapter trained on a bitsandbytes nf4 base (its config names that folder) is merged onto the base
    as 4-bit training saw it, and the build follows the PEFT model on that base, not on the FP32 original."""
    import onnxruntime as ort
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModel

    import pipeline
    from tests.tiny_encoders import minilm_tokenizer

    checkpoint = save_quantized(bert_folder, tmp_path / "nf4", "nf4", "AutoModel")
    torch.manual_seed(5)
    quantized = AutoModel.from_pretrained(str(checkpoint), device_map="cpu", dtype="float32")
    adapter = tmp_path / "qlora"
    get_peft_model(quantized, LoraConfig(r=4, target_modules=["query", "value"], init_lora_weights=False)
                   ).save_pretrained(str(adapter))
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(checkpoint)
    result = pipeline.build(model=str(adapter), output=str(tmp_path / "build"), calib_samples=16, heldout_samples=16)
    assert result.passed is True
    origin = json.loads((result.build_dir / "manifest.json").read_text())["model"]["origin"]
    assert origin["kind"] == "qlora" and origin["quantization"] == "4bit-nf4" and "4-bit training saw" in origin["exact"]

    tokenizer = minilm_tokenizer()
    sentences = [f"the {i}th report on trade, rugby and elections" for i in range(6)]
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    session = ort.InferenceSession(str(result.build_dir / "model.fp32.onnx"), providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    graph = session.run(["sentence_embedding"], {k: v.numpy() for k, v in batch.items() if k in names})[0]

    def pooled(model) -> np.ndarray:
        with torch.inference_mode():
            hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        return ((hidden * mask).sum(1) / mask.sum(1)).numpy()

    on_4bit = pooled(PeftModel.from_pretrained(AutoModel.from_pretrained(
        str(checkpoint), device_map="cpu", dtype="float32", attn_implementation="eager"), str(adapter)).eval())
    on_fp32 = pooled(PeftModel.from_pretrained(AutoModel.from_pretrained(
        str(bert_folder), attn_implementation="eager"), str(adapter)).eval())
    kernel_error, fp32_error = np.abs(graph - on_4bit).max(), np.abs(graph - on_fp32).max()
    assert kernel_error <= 1e-2 and fp32_error > 5 * kernel_error, (kernel_error, fp32_error)
    assert max(result.outputs["export"].metrics["torch_parity_max_abs"].values()) <= 1e-3
