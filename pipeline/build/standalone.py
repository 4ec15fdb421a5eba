"""What makes a build folder stand alone: the model's config.json (labels included) and, for decoder LLMs,
onnxruntime-genai's genai_config.json with the tokenizer files beside it, so `onnxruntime_genai.Model(build_dir)`
opens the build with no glue and `pipeline serve` never reads the original model folder again."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from pipeline.models.registry import ModelInfo

MODEL_CONFIG = "config.json"
GENAI_CONFIG = "genai_config.json"
# The tokenizer files onnxruntime-genai reads from the folder it opens (it does not look into tokenizer/).
GENAI_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def labels_of(config: dict[str, Any]) -> dict[int, str]:
    """id2label of a model config, with integer keys (config.json stores them as strings)."""
    raw = config.get("id2label") or {}
    if not isinstance(raw, dict):
        return {}
    labels = {}
    for key, value in raw.items():
        try:
            labels[int(key)] = str(value)
        except (TypeError, ValueError):
            continue
    return labels


def _token_id(value: Any) -> Any:
    return value[0] if isinstance(value, list) and value else value


def genai_config(model: ModelInfo, past_names: list[str], session_entries: dict[str, str],
                 context_length: int, position_ids: bool = True, share_buffer: bool = False) -> dict[str, Any]:
    """onnxruntime-genai's configuration for our KV-cache graph: its input and output names as we export them
    (past_key_values.%d.key / present.%d.key), greedy search by default, and the build's session settings.
    position_ids: False for a graph that derives positions from the mask (onnxruntime-genai's own, --llm-graph genai);
    share_buffer: the graph's attention appends to its cache in place (GroupQueryAttention), so the generator may
    keep one past/present buffer of max_length (as the builder's own configuration does)."""
    config = model.config
    heads = int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads") or heads)
    hidden = int(config["hidden_size"])
    eos = _token_id(config.get("eos_token_id"))
    session_options: dict[str, Any] = {"log_id": "onnxruntime-genai", "provider_options": [], **session_entries}
    return {
        "model": {
            "bos_token_id": _token_id(config.get("bos_token_id")),
            "context_length": context_length,
            "decoder": {
                "session_options": session_options,
                "filename": "model.onnx",
                "head_size": int(config.get("head_dim") or hidden // heads),
                "hidden_size": hidden,
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                           **({"position_ids": "position_ids"} if position_ids else {}),
                           "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
                "num_attention_heads": heads,
                "num_hidden_layers": len(past_names) // 2,
                "num_key_value_heads": kv_heads,
            },
            "eos_token_id": eos,
            "pad_token_id": _token_id(config.get("pad_token_id")) if config.get("pad_token_id") is not None else eos,
            "type": model.architecture.model_type,
            "vocab_size": int(config["vocab_size"]),
        },
        "search": {"do_sample": False, "max_length": context_length, "min_length": 0, "num_beams": 1,
                   "num_return_sequences": 1, "past_present_share_buffer": share_buffer, "repetition_penalty": 1.0,
                   "temperature": 1.0, "top_k": 1, "top_p": 1.0, "early_stopping": True,
                   "length_penalty": 1.0, "diversity_penalty": 0.0, "no_repeat_ngram_size": 0},
    }


def write_standalone_files(build_dir: Path, model: ModelInfo, tokenizer_dir: Path, runtime: dict[str, Any],
                           write_text: Callable[[Path, str], None], place: Callable[[Path, Path], None]) -> list[str]:
    """Write config.json (every build) and, for decoder LLMs, genai_config.json plus the tokenizer files at the
    top of the folder; returns the names written. `write_text` and `place` are the publisher's atomic writers."""
    written = [MODEL_CONFIG]
    write_text(build_dir / MODEL_CONFIG, json.dumps(model.config, indent=2, sort_keys=True, default=str) + "\n")
    if not model.is_decoder or not (build_dir / "model.onnx").is_file():
        return written
    import onnx

    from pipeline.models.decoding import presents_share_buffer

    graph = onnx.load(str(build_dir / "model.onnx"), load_external_data=False).graph
    past = [item.name for item in graph.input if item.name.startswith("past_key_values.")]
    entries = dict(runtime.get("session_config_entries") or {})
    disabled = runtime.get("disabled_optimizers") or []
    if disabled:  # ONNX Runtime's session config key for what SessionOptions' disabled_optimizers does
        entries["optimization.disable_specified_optimizers"] = ",".join(disabled)
    context = int(model.config.get("max_position_embeddings") or 2048)
    try:
        genai = genai_config(model, past, entries, context,
                             position_ids=any(item.name == "position_ids" for item in graph.input),
                             share_buffer=presents_share_buffer(graph))
    except (KeyError, TypeError, ValueError):  # a config without the sizes genai needs: the build stands without it
        return written
    write_text(build_dir / GENAI_CONFIG, json.dumps(genai, indent=2) + "\n")
    written.append(GENAI_CONFIG)
    for name in GENAI_TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            place(tokenizer_dir / name, build_dir / name)
            written.append(name)
    return written
