"""The encoder contenders of `pipeline bench-peers`: a Quantpipe embedding build, its FP32 graph, and what a
user would make instead from the same model folder:

- ort-by-hand: the model exported by `torch.onnx.export`, ONNX Runtime's transformer optimizer, then
  `quantize_dynamic(per_channel=True)`, opened with a plain `InferenceSession` (what ONNX Runtime's docs do);
- openvino-nncf: `openvino.convert_model` of the PyTorch model, `nncf.quantize` with the transformer model
  type on the build's own calibration sentences (what optimum-intel does), compiled for the CPU.

The peers return the last hidden state; mean pooling and normalization, as the model's sentence-transformers
modules declare for all-MiniLM-L6-v2, run in numpy outside their timed runs.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from engines.ort_session import SessionSettings, create_session
from pipeline.core.errors import InputError

EMBED_BATCH = 32


def mean_pooled(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    weights = mask[..., None].astype(np.float32)
    pooled = (hidden * weights).sum(axis=1) / np.clip(weights.sum(axis=1), 1e-9, None)
    return pooled / np.linalg.norm(pooled, axis=1, keepdims=True)


class _Tokenized:
    def __init__(self, tokenizer: Any, input_names: Sequence[str], max_length: int) -> None:
        self.tokenizer, self.input_names, self.max_length = tokenizer, list(input_names), max_length

    def feeds(self, texts: Sequence[str]) -> list[dict[str, np.ndarray]]:
        out = []
        for start in range(0, len(texts), EMBED_BATCH):
            encoded = self.tokenizer(list(texts[start:start + EMBED_BATCH]), padding=True, truncation=True,
                                     max_length=self.max_length, return_tensors="np")
            out.append({name: np.ascontiguousarray(encoded.get(name, np.zeros_like(encoded["input_ids"])),
                                                   dtype=np.int64) for name in self.input_names})
        return out


class OrtGraph(_Tokenized):
    """An ONNX graph in ONNX Runtime; `pooled_output` names a graph output that is already the embedding."""

    def __init__(self, name: str, path: Path, tokenizer: Any, threads: int, max_length: int,
                 settings: SessionSettings | None = None, pooled_output: str | None = None) -> None:
        if settings is None:  # a plain session, as a user's own code opens a file
            import onnxruntime as ort

            options = ort.SessionOptions()
            options.intra_op_num_threads = threads
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        else:
            self.session = create_session(path, threads=threads, settings=settings)
        self.name, self.pooled_output = name, pooled_output
        super().__init__(tokenizer, [i.name for i in self.session.get_inputs()], max_length)

    def run(self, outputs: None, feed: dict[str, np.ndarray]) -> Any:
        return self.session.run([self.pooled_output] if self.pooled_output else None, feed)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        rows = []
        for feed in self.feeds(texts):
            if self.pooled_output:
                rows.append(self.session.run([self.pooled_output], feed)[0])
            else:
                rows.append(mean_pooled(self.session.run(None, feed)[0], feed["attention_mask"]))
        return np.concatenate(rows)


class OpenVinoModel(_Tokenized):
    def __init__(self, name: str, compiled: Any, tokenizer: Any, input_names: Sequence[str], max_length: int) -> None:
        self.name, self.compiled = name, compiled
        self.request = compiled.create_infer_request()
        super().__init__(tokenizer, input_names, max_length)

    def run(self, outputs: None, feed: dict[str, np.ndarray]) -> Any:
        return self.request.infer(feed)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        rows = []
        for feed in self.feeds(texts):
            hidden = self.request.infer(feed)[self.compiled.output(0)]
            rows.append(mean_pooled(np.asarray(hidden), feed["attention_mask"]))
        return np.concatenate(rows)


def open_embedding_build(build_dir: Path, threads: int) -> tuple[Any, Path, Path]:
    """(the build opened as `pipeline.load` opens it, its hash-checked FP32 graph, its source model folder)."""
    from pipeline.build.readback import checked_file, load_manifest
    from pipeline.deploy.runtime import open_build

    runner = open_build(build_dir, threads)
    if runner.task != "feature-extraction" or runner.manifest["config"]["target"] != "cpu":
        raise InputError(f"{build_dir}: bench-peers compares CPU embedding builds (feature-extraction, --target cpu)")
    fp32 = checked_file(build_dir, load_manifest(build_dir), "model.fp32.onnx")
    folder = Path(str(runner.manifest["model"]["path"]))
    if not (folder / "config.json").is_file():
        raise InputError(f"{build_dir}: its model folder {folder} is gone; the peers are made from it")
    return runner, fp32, folder


class Loaded:
    """The build through the Python API's runner (`pipeline.load`): its session and recorded settings."""

    def __init__(self, name: str, runner: Any) -> None:
        self.name, self.runner = name, runner

    def run(self, outputs: None, feed: dict[str, np.ndarray]) -> Any:
        return self.runner.session.run(["sentence_embedding"], feed)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        return self.runner.encode(list(texts), batch_size=EMBED_BATCH)


def _example(tokenizer: Any, names: Sequence[str]) -> dict[str, Any]:
    import torch

    encoded = tokenizer(["a short example", "another, longer example sentence"], padding=True, return_tensors="pt")
    return {name: encoded.get(name, torch.zeros_like(encoded["input_ids"])) for name in names}


def torch_export(folder: Path, tokenizer: Any, out: Path) -> list[str]:
    """`torch.onnx.export` of AutoModel's last hidden state, dynamic batch and sequence (the TorchScript exporter)."""
    import torch
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(folder)).eval()
    names = [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in tokenizer.model_input_names]
    example = _example(tokenizer, names)
    axes = {name: {0: "batch", 1: "sequence"} for name in names}
    axes["last_hidden_state"] = {0: "batch", 1: "sequence"}

    class Hidden(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, *inputs: Any) -> Any:
            return self.model(**dict(zip(names, inputs))).last_hidden_state

    with torch.no_grad():
        torch.onnx.export(Hidden(), tuple(example[n] for n in names), str(out), input_names=names,
                          output_names=["last_hidden_state"], dynamic_axes=axes, opset_version=17, dynamo=False)
    return names


def ort_by_hand(folder: Path, tokenizer: Any, threads: int, max_length: int, work: Path) -> OrtGraph:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.transformers.optimizer import optimize_model

    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    exported, optimized, quantized = work / "export.onnx", work / "optimized.onnx", work / "int8.onnx"
    torch_export(folder, tokenizer, exported)
    optimize_model(str(exported), model_type="bert", num_heads=int(config["num_attention_heads"]),
                   hidden_size=int(config["hidden_size"])).save_model_to_file(str(optimized))
    # DefaultTensorType: what ONNX Runtime's own error message tells a user to pass for fused (com.microsoft) graphs.
    quantize_dynamic(str(optimized), str(quantized), per_channel=True, weight_type=QuantType.QInt8,
                     extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    return OrtGraph("ort-by-hand", quantized, tokenizer, threads, max_length)


def openvino_nncf(folder: Path, tokenizer: Any, threads: int, max_length: int, calibration: Sequence[str],
                  work: Path) -> OpenVinoModel:
    import nncf
    import openvino as ov
    import torch
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(folder)).eval()
    names = [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in tokenizer.model_input_names]
    with torch.no_grad():
        converted = ov.convert_model(model, example_input=_example(tokenizer, names))
    feeds = [{name: np.asarray(encoded[name], dtype=np.int64) for name in names}
             for encoded in (tokenizer([text], truncation=True, max_length=max_length, return_tensors="np")
                             for text in calibration)]
    quantized = nncf.quantize(converted, nncf.Dataset(feeds), model_type=nncf.ModelType.TRANSFORMER,
                              subset_size=len(feeds))
    ov.save_model(quantized, str(work / "openvino.xml"))  # its size on disk: openvino.bin holds the weights
    compiled = ov.Core().compile_model(quantized, "CPU", {"INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1,
                                                          "PERFORMANCE_HINT": "LATENCY"})
    return OpenVinoModel("openvino-nncf", compiled, tokenizer, names, max_length)


def reference_embeddings(folder: Path, sentences: Sequence[str], max_length: int) -> np.ndarray:
    """The model's own FP32 embeddings, as sentence-transformers computes them (its pooling modules)."""
    import torch
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(folder), device="cpu")
    model.max_seq_length = max_length
    with torch.no_grad():
        return np.asarray(model.encode(list(sentences), batch_size=EMBED_BATCH, convert_to_numpy=True))


def scratch() -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix="quantpipe-peers-")


PEERS = ("ort-by-hand", "openvino-nncf")


def run_encoder_peers(build_dir: Path, threads: int, batches: Sequence[int], sequence: int, runs: int, warmup: int,
                      sentence_count: int, peers: Sequence[str], progress: Any,
                      extra_builds: Sequence[Path] = ()) -> dict[str, Any]:
    """The build, its FP32 graph and each peer, timed at batch x sequence and scored on out-of-domain sentences;
    `extra_builds` (other builds of the same model, e.g. another --quant) run beside them as `quantpipe:<folder>`."""
    from calibration.selection import select_samples
    from calibration.sources import default_source
    from pipeline.bench import peers as common
    from pipeline.bench.latency import text_inputs

    runner, fp32_path, folder = open_embedding_build(build_dir, threads)
    calibration = runner.manifest["config"]["calibration"]
    max_length = int(calibration["max_length"])
    tokenizer = runner.tokenizer
    sentences = common.out_of_domain_sentences(sentence_count)
    progress.info(f"reference: sentence-transformers FP32 on {len(sentences)} out-of-domain sentences")
    reference = reference_embeddings(folder, sentences, max_length)
    setup_s: dict[str, float] = {}
    int8_mb = (build_dir / "model.onnx").stat().st_size / 1e6
    sizes = {"quantpipe": int8_mb, "quantpipe-plain-session": int8_mb, "fp32": fp32_path.stat().st_size / 1e6}
    contenders: list[Any] = [Loaded("quantpipe", runner),
                             OrtGraph("fp32", fp32_path, tokenizer, threads, max_length, runner.settings,
                                      pooled_output="sentence_embedding"),
                             # the same model.onnx in a plain InferenceSession: what the recorded settings are worth
                             OrtGraph("quantpipe-plain-session", build_dir / "model.onnx", tokenizer, threads,
                                      max_length, pooled_output="sentence_embedding")]
    for extra in extra_builds:
        other, _, other_folder = open_embedding_build(extra, threads)
        if other_folder.resolve() != folder.resolve():
            raise InputError(f"{extra} was built from {other_folder}, not {folder}: compare builds of one model")
        name = f"quantpipe:{extra.name}"
        contenders.append(Loaded(name, other))
        sizes[name] = (extra / "model.onnx").stat().st_size / 1e6
    missing: list[common.Unavailable] = []
    with scratch() as work:
        makers = {
            "ort-by-hand": lambda: ort_by_hand(folder, tokenizer, threads, max_length, Path(work)),
            "openvino-nncf": lambda: openvino_nncf(
                folder, tokenizer, threads, max_length,
                [s.text if hasattr(s, "text") else str(s) for s in
                 select_samples(default_source(), int(calibration["samples"]), 0, int(calibration["seed"]))[0]],
                Path(work)),
        }
        for name in peers:
            progress.info(f"making {name}")
            made = common.timed_setup(name, makers[name], setup_s)
            if isinstance(made, common.Unavailable):
                progress.info(f"{name} unavailable: {made.reason}")
                missing.append(made)
            else:
                contenders.append(made)
        for name, file in (("ort-by-hand", "int8.onnx"), ("openvino-nncf", "openvino.bin")):
            if (Path(work) / file).exists():
                sizes[name] = (Path(work) / file).stat().st_size / 1e6
        feeds = {f"{batch}x{sequence}": text_inputs(tokenizer, runner.input_names, batch, sequence) for batch in batches}
        results = common.measure(contenders, setup_s, sizes, feeds, reference, sentences, runs, warmup, progress)
    results += [common.PeerResult(m.name, False, m.reason) for m in missing]
    host = common.host_record(threads)
    shapes = list(feeds)
    main_shape = f"8x{sequence}" if f"8x{sequence}" in feeds else shapes[0]
    return {"kind": "encoder", "build": str(build_dir), "model": runner.manifest["model"]["name"], "host": host,
            "threads": threads, "sequence": sequence, "runs": runs, "sentences": len(sentences),
            "sentence_sources": list(common.OUT_OF_DOMAIN_FILES), "results": common.as_dicts(results),
            "lead": common.lead(results, "quantpipe", main_shape),
            "table": common.render_table(results, shapes, host)}
