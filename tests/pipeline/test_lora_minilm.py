"""Acceptance of issue 19 (LoRA): an adapter trained for a few steps on the real all-MiniLM-L6-v2 changes its
embeddings, and the built INT8 model follows the adapted PEFT model (cosine >= 0.99), not the base."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from tests.pipeline.test_adapters import cosines, embeddings_of, onnx_embeddings

pytest.importorskip("peft")


def test_trained_adapter_builds_an_int8_model_that_follows_it(tmp_path, monkeypatch):
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModel, AutoTokenizer

    import pipeline
    from pipeline.models.registry import default_model_path
    from tests.tiny_encoders import labelled_sentences

    monkeypatch.setenv("QUANTPIPE_INPUT_CACHE", str(tmp_path / "inputs"))
    base = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(str(base))
    texts = [text for text, _ in labelled_sentences()]
    train, held = texts[:16], texts[len(texts) // 2:]
    torch.manual_seed(0)
    trained = time.perf_counter()
    model = get_peft_model(AutoModel.from_pretrained(str(base)),
                           LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], lora_dropout=0.0))
    target = torch.nn.functional.normalize(torch.randn(model.config.hidden_size), dim=0)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = tokenizer(train, padding=True, truncation=True, max_length=32, return_tensors="pt")
    model.train()
    for _ in range(8):  # pull every embedding toward one direction: a change a few steps can make (~30 s)
        hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        pooled = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
        loss = -(pooled @ target).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    print(f"trained in {time.perf_counter() - trained:.0f}s")
    adapter = tmp_path / "adapter"
    model.save_pretrained(str(adapter))

    adapted = PeftModel.from_pretrained(AutoModel.from_pretrained(str(base), attn_implementation="eager"),
                                        str(adapter)).eval()
    plain = AutoModel.from_pretrained(str(base), attn_implementation="eager").eval()
    adapted_embeddings = embeddings_of(adapted, tokenizer, held, normalize=True)
    base_embeddings = embeddings_of(plain, tokenizer, held, normalize=True)
    changed = cosines(adapted_embeddings, base_embeddings).mean()
    assert changed < 0.95, changed  # the adapter moved the embeddings

    started = time.perf_counter()
    result = pipeline.build(model=str(base), adapter=str(adapter), output=str(tmp_path / "build"),
                            calib_samples=32, heldout_samples=32)
    assert result.passed is True
    assert json.loads((result.build_dir / "manifest.json").read_text())["model"]["origin"]["kind"] == "lora"
    int8 = onnx_embeddings(result.build_dir / "model.onnx", tokenizer, held)
    follows, stays = cosines(int8, adapted_embeddings).mean(), cosines(int8, base_embeddings).mean()
    print(f"cosine base vs adapted {changed:.4f}; INT8 vs PEFT {follows:.4f}; INT8 vs base {stays:.4f}; build "
          f"{time.perf_counter() - started:.0f}s, stages", {n: round(o.wall_time_s) for n, o in result.outputs.items()})
    assert follows >= 0.99 and stays < follows - 0.02, (follows, stays)
