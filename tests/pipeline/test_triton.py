"""`pipeline export-triton` on the real default build, parsed with Triton's own model-config protobuf."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from google.protobuf import json_format, text_format

from pipeline.deploy.triton import export_triton
from tests.helpers import assert_one_line_error, run_cli

ORT_TO_TRITON = {"tensor(int64)": "TYPE_INT64", "tensor(int32)": "TYPE_INT32", "tensor(float)": "TYPE_FP32",
                 "tensor(float16)": "TYPE_FP16"}


def _load_file(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def model_config_pb2() -> ModuleType:
    """Triton's model_config.proto as tritonclient ships it (the file alone: the grpc extra pins protobuf<7)."""
    import tritonclient

    return _load_file("model_config_pb2", Path(tritonclient.__file__).parent / "grpc" / "model_config_pb2.py")


def parse(pb2: ModuleType, path: Path) -> Any:
    return text_format.Parse(path.read_text(encoding="utf-8"), pb2.ModelConfig())


@pytest.fixture(scope="module")
def repo(default_build, tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo_dir = tmp_path_factory.mktemp("triton-repo")
    written = export_triton(default_build.build_dir, repo_dir, "minilm", with_tokenizer=True, intra_op_threads=2)
    assert written == ["minilm", "minilm_tokenizer", "minilm_text"]
    return repo_dir


def _expected(values: list[Any]) -> list[tuple[str, str, list[int]]]:
    """What ONNX Runtime reports about the graph: name, Triton type, dims without the batch axis."""
    return [(v.name, ORT_TO_TRITON[v.type], [d if isinstance(d, int) else -1 for d in v.shape[1:]]) for v in values]


def _tensors(pb2: ModuleType, tensors: Any) -> list[tuple[str, str, list[int]]]:
    return [(t.name, pb2.DataType.Name(t.data_type), list(t.dims)) for t in tensors]


def test_model_config_matches_the_graph(default_build, repo: Path, model_config_pb2: ModuleType) -> None:
    config = parse(model_config_pb2, repo / "minilm" / "config.pbtxt")
    graph = repo / "minilm" / "1" / "model.onnx"
    assert hashlib.sha256(graph.read_bytes()).digest() == \
        hashlib.sha256((default_build.build_dir / "model.onnx").read_bytes()).digest()
    session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    assert config.name == "minilm" and config.platform == "onnxruntime_onnx"
    assert _tensors(model_config_pb2, config.input) == _expected(session.get_inputs())
    assert _tensors(model_config_pb2, config.output) == _expected(session.get_outputs())
    # the real graph: BERT's three int64 inputs, a 384-wide embedding and per-token hidden states
    assert [t.name for t in config.input] == ["input_ids", "attention_mask", "token_type_ids"]
    assert list(config.output[0].dims) == [384] and list(config.output[1].dims) == [-1, 384]
    assert config.max_batch_size == 32
    assert config.HasField("dynamic_batching") and config.dynamic_batching.max_queue_delay_microseconds == 1000
    assert [(g.count, model_config_pb2.ModelInstanceGroup.Kind.Name(g.kind)) for g in config.instance_group] == \
        [(1, "KIND_CPU")]
    assert {k: v.string_value for k, v in config.parameters.items()} == \
        {"intra_op_thread_count": "2", "inter_op_thread_count": "1"}


def test_tokenizer_ensemble_feeds_the_model(default_build, repo: Path, model_config_pb2: ModuleType) -> None:
    model = parse(model_config_pb2, repo / "minilm" / "config.pbtxt")
    tokenizer = parse(model_config_pb2, repo / "minilm_tokenizer" / "config.pbtxt")
    ensemble = parse(model_config_pb2, repo / "minilm_text" / "config.pbtxt")
    assert tokenizer.backend == "python" and ensemble.platform == "ensemble"
    assert [t.name for t in tokenizer.output] == [t.name for t in model.input]
    assert _tensors(model_config_pb2, ensemble.output) == _tensors(model_config_pb2, model.output)
    assert [(t.name, model_config_pb2.DataType.Name(t.data_type)) for t in ensemble.input] == [("TEXT", "TYPE_STRING")]
    steps = ensemble.ensemble_scheduling.step
    assert [s.model_name for s in steps] == ["minilm_tokenizer", "minilm"]
    assert dict(steps[0].output_map) == dict(steps[1].input_map) == {t.name: t.name for t in model.input}
    assert set(steps[1].output_map) == {t.name for t in model.output}

    # The Python-backend model itself, initialized with the JSON Triton hands it, on a real sentence.
    python_model = _load_file("triton_tokenizer_model", repo / "minilm_tokenizer" / "1" / "model.py").TritonPythonModel()
    python_model.initialize({"model_config": json.dumps(json_format.MessageToDict(
        tokenizer, preserving_proto_field_name=True)), "model_repository": str(repo / "minilm_tokenizer"),
        "model_version": "1"})
    sentence = "The central bank raised interest rates for the third time this year."
    feed = python_model.encode([sentence])
    from transformers import AutoTokenizer

    unpadded = AutoTokenizer.from_pretrained(str(default_build.build_dir / "tokenizer"))([sentence], return_tensors="np")
    length = unpadded["input_ids"].shape[1]
    # A request is padded to its longest text, not to max_length (128): a lone sentence is not padded at all.
    assert {name: (a.dtype, a.shape) for name, a in feed.items()} == \
        {t.name: (np.dtype(np.int64), (1, length)) for t in model.input}
    for name, ids in unpadded.items():
        assert np.array_equal(feed[name], ids)
    pair = python_model.encode([sentence, "Rates rose."])
    assert pair["input_ids"].shape == (2, length) and pair["attention_mask"][1].sum() < length
    served = ort.InferenceSession(str(repo / "minilm" / "1" / "model.onnx"),
                                  providers=["CPUExecutionProvider"]).run(["sentence_embedding"], feed)[0][0]
    fp32 = ort.InferenceSession(str(default_build.build_dir / "model.fp32.onnx"), providers=["CPUExecutionProvider"])
    reference = fp32.run(["sentence_embedding"], {k: np.asarray(v, np.int64) for k, v in unpadded.items()})[0][0]
    # The bound is the build's own: the worst held-out row this host's INT8 graph gave (7-bit weights without
    # VNNI change it), less 0.01 of margin.
    cosine = float(served @ reference / (np.linalg.norm(served) * np.linalg.norm(reference)))
    worst = json.loads((default_build.build_dir / "parity.json").read_text())["outputs"]["sentence_embedding"]
    assert cosine > worst["cosine_min"] - 0.01, (cosine, worst["cosine_min"])


def _trt_build(trt_build, tmp_path: Path, engine: bool) -> Path:
    """A real TensorRT-target build (its manifest and trt/ bundle, as `pipeline build --target trt` published
    them); with engine=True, plan bytes are added where TensorRT would write them (no TensorRT here)."""
    build = tmp_path / "trt-build"
    source = trt_build("int8").build_dir
    shutil.copytree(source, build, ignore=shutil.ignore_patterns(".stages", ".lock"))
    manifest = json.loads((build / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["config"]["target"] == "trt"
    assert not (build / "trt" / "model.plan").exists()
    if engine:
        from pipeline.core.hashing import combined_hash, directory_hashes

        (build / "trt" / "model.plan").write_bytes(b"engine bytes are opaque to the exporter")
        manifest["artifacts"]["trt/"] = combined_hash(directory_hashes(build / "trt"))  # as publish_build records it
        (build / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    return build


def test_tensorrt_engine_gets_a_tensorrt_config(trt_build, tmp_path: Path, model_config_pb2: ModuleType) -> None:
    build = _trt_build(trt_build, tmp_path, engine=True)
    export_triton(build, tmp_path / "repo", "minilm_trt")
    config = parse(model_config_pb2, tmp_path / "repo" / "minilm_trt" / "config.pbtxt")
    assert config.platform == "tensorrt_plan" and config.max_batch_size == 32  # from the profile
    assert (tmp_path / "repo" / "minilm_trt" / "1" / "model.plan").is_file()
    assert model_config_pb2.ModelInstanceGroup.Kind.Name(config.instance_group[0].kind) == "KIND_GPU"
    assert not config.parameters  # ONNX Runtime's thread settings do not apply
    assert [t.name for t in config.output] == ["sentence_embedding", "last_hidden_state"]
    result = run_cli("export-triton", str(build), str(tmp_path / "repo2"), "--max-batch-size", "64")
    assert_one_line_error(result, 2, "exceeds the engine's optimization profile", "32")


def test_tensorrt_build_without_engine_is_refused_or_served_by_onnxruntime(
        trt_build, tmp_path: Path, model_config_pb2: ModuleType) -> None:
    build = _trt_build(trt_build, tmp_path, engine=False)
    result = run_cli("export-triton", str(build), str(tmp_path / "repo"))
    assert_one_line_error(result, 2, "no TensorRT engine", "--backend onnxruntime")
    assert not (tmp_path / "repo").exists() or not any((tmp_path / "repo").iterdir())
    result = run_cli("export-triton", str(build), str(tmp_path / "repo"), "--backend", "onnxruntime", "--name", "m")
    assert result.returncode == 0, result.stderr
    config = parse(model_config_pb2, tmp_path / "repo" / "m" / "config.pbtxt")
    assert config.platform == "onnxruntime_onnx" and config.max_batch_size == 32


def test_not_a_build_directory(tmp_path: Path) -> None:
    result = run_cli("export-triton", str(tmp_path), str(tmp_path / "repo"))
    assert_one_line_error(result, 2, "not a build directory")


def test_outputs_selects_what_the_ensemble_returns(default_build, tmp_path: Path, model_config_pb2: ModuleType) -> None:
    export_triton(default_build.build_dir, tmp_path, "minilm", with_tokenizer=True, ensemble_outputs=["sentence_embedding"])
    ensemble = parse(model_config_pb2, tmp_path / "minilm_text" / "config.pbtxt")
    assert [t.name for t in ensemble.output] == ["sentence_embedding"]  # not last_hidden_state (~130x the bytes)
    assert set(ensemble.ensemble_scheduling.step[1].output_map) == {"sentence_embedding"}
    tokenizer = parse(model_config_pb2, tmp_path / "minilm_tokenizer" / "config.pbtxt")
    assert tokenizer.output and all(list(t.dims) == [-1] for t in tokenizer.output)  # each request's own length
    from pipeline.core.errors import InputError

    with pytest.raises(InputError, match="not an output of the graph"):
        export_triton(default_build.build_dir, tmp_path, "minilm", with_tokenizer=True, ensemble_outputs=["pooled"])
