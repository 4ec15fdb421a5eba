"""Fine-tune all-MiniLM-L6-v2 into a sentiment classifier on Rotten Tomatoes sentences, cached.

A real task model for the accuracy benchmark: no PyPI package ships a fine-tuned classifier.
One epoch over ~9k sentences takes about 5 minutes on 2 cores; the folder is cached by a key of
the data, the recipe and the seed, and written atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from calibration.rotten_tomatoes import LabelledSentences
from pipeline.core.progress import Progress
from pipeline.models.registry import default_model_path


@dataclass(frozen=True)
class Recipe:
    epochs: int = 1
    batch_size: int = 32
    learning_rate: float = 1e-4
    warmup_fraction: float = 0.1
    max_length: int = 64
    seed: int = 0


def cache_key(train: LabelledSentences, recipe: Recipe) -> str:
    digest = hashlib.sha256(json.dumps(asdict(recipe), sort_keys=True).encode())
    for text, label in zip(train.texts, train.labels):
        digest.update(f"{label}\t{text}\n".encode())
    return digest.hexdigest()[:16]


def finetuned_classifier(train: LabelledSentences, cache: Path, progress: Progress, recipe: Recipe = Recipe()) -> Path:
    folder = cache / f"sentiment-minilm-{cache_key(train, recipe)}"
    if (folder / "config.json").is_file():
        progress.info(f"reusing the fine-tuned classifier in {folder}")
        return folder
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, get_linear_schedule_with_warmup

    torch.manual_seed(recipe.seed)
    base = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(str(base), trust_remote_code=False)
    model = AutoModelForSequenceClassification.from_pretrained(
        str(base), trust_remote_code=False, num_labels=2, id2label={0: "negative", 1: "positive"}, label2id={"negative": 0, "positive": 1}
    )
    order = torch.randperm(len(train.texts), generator=torch.Generator().manual_seed(recipe.seed)).tolist()
    steps = recipe.epochs * ((len(order) + recipe.batch_size - 1) // recipe.batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.learning_rate)
    schedule = get_linear_schedule_with_warmup(optimizer, int(recipe.warmup_fraction * steps), steps)
    model.train()
    started, step = time.perf_counter(), 0
    for _ in range(recipe.epochs):
        for start in range(0, len(order), recipe.batch_size):
            index = order[start : start + recipe.batch_size]
            batch = tokenizer([train.texts[i] for i in index], padding=True, truncation=True,
                              max_length=recipe.max_length, return_tensors="pt")
            loss = model(**batch, labels=torch.tensor([train.labels[i] for i in index])).loss
            loss.backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
            step += 1
            if step % 25 == 0 or step == steps:
                progress.info(f"fine-tuning step {step}/{steps}, loss {loss.item():.3f}, "
                              f"{time.perf_counter() - started:.0f}s")
    model.eval()
    cache.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".sentiment-", dir=cache))
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(staging, folder)
    return folder
