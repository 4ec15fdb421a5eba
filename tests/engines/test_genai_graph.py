"""onnxruntime-genai's fused graph (--llm-graph genai): its logits against our own export of the same weights,
its RMSNorm rewrite against ONNX Runtime's kernel, and a build on it through the Python API and genai's generator."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import pipeline

# Same weights, two graphs (eager attention vs GroupQueryAttention, unfused vs fused RMSNorm): FP32 rounding only.
FUSED_MAX_ABS = 1e-4


@pytest.fixture(scope="module")
def genai_build(tiny_llm_build):
    """The tiny Llama's default build: --llm-graph auto quantizes the fused graph for the llama family."""
    quantize = next(stage for stage in tiny_llm_build.manifest["stages"] if stage["stage"] == "quantize")
    facts = quantize["metrics"]["llm_graph"]
    assert facts["graph"] == "genai" and facts["asked"] == "auto", facts
    return tiny_llm_build


def test_the_fused_fp32_graph_computes_what_our_export_computes(tiny_llama_folder, tiny_llm_build, tmp_path) -> None:
    from engines.cpu.genai_graph import fused_fp32_graph
    from pipeline.models.decoding import KVDecoder, generate
    from pipeline.stages.llm_export import onnx_logits

    summary = fused_fp32_graph(tiny_llama_folder, tmp_path / "fused.onnx")
    export = tiny_llm_build.build_dir / "model.fp32.onnx"
    exported_nodes = len(onnx.load(str(export), load_external_data=False).graph.node)
    assert summary["op_types"].get("GroupQueryAttention") == 2 and summary["nodes"] < exported_nodes / 3
    prompt = [1, 504, 2533, 1064, 335, 5355, 338, 260]
    with KVDecoder(export) as decoder:
        tokens = generate(decoder, prompt, 8).tokens
    expected, actual = onnx_logits(export, prompt, tokens), onnx_logits(tmp_path / "fused.onnx", prompt, tokens)
    assert len(actual) == len(tokens) + 1
    worst = max(float(np.abs(e - a).max()) for e, a in zip(expected, actual))
    assert worst <= FUSED_MAX_ABS, worst


def test_the_builder_runs_in_this_process_silently_and_fails_in_one_line(tiny_llama_folder, tmp_path, capfd) -> None:
    """The builder is called in-process: what it prints must not reach our stdout (`--json`), it must leave the
    root logger as it found it, and an architecture it does not know is one EngineError line."""
    import logging
    import shutil

    from transformers import AutoConfig

    from engines.cpu.genai_graph import fused_fp32_graph
    from pipeline.core.errors import EngineError

    root = logging.getLogger()
    handlers = list(root.handlers)
    fused_fp32_graph(tiny_llama_folder, tmp_path / "fused.onnx")
    captured = capfd.readouterr()
    assert "Extra options" not in captured.out + captured.err, captured  # the builder's own first print
    assert root.handlers == handlers
    folder = tmp_path / "gpt2"
    folder.mkdir()
    for item in tiny_llama_folder.iterdir():
        if item.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(item, folder)
    AutoConfig.for_model("gpt2", n_layer=1, n_embd=32, n_head=2, architectures=["GPT2LMHeadModel"]).save_pretrained(folder)
    with pytest.raises(EngineError, match="model builder failed on gpt2: .*not currently supported") as error:
        fused_fp32_graph(folder, tmp_path / "gpt2.onnx")
    assert "\n" not in str(error.value)
    assert not (tmp_path / "gpt2.onnx").exists() and root.handlers == handlers


def test_the_standard_rms_norm_equals_onnx_runtimes_kernel() -> None:
    import onnxruntime as ort

    from engines.cpu.genai_graph import standard_rms_norms

    rng = np.random.default_rng(0)
    gamma = rng.standard_normal(16).astype(np.float32)
    node = helper.make_node("SimplifiedLayerNormalization", ["x", "gamma"], ["y"], name="norm", axis=-1, epsilon=1e-5)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, 16])],
                              [numpy_helper.from_array(gamma, "gamma")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    x = (rng.standard_normal((2, 3, 16)) * 3).astype(np.float32)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    kernel = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert standard_rms_norms(model) == 1
    onnx.checker.check_model(model, full_check=True)
    assert "SimplifiedLayerNormalization" not in {n.op_type for n in model.graph.node}
    spelled = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(spelled, kernel, rtol=1e-5, atol=1e-6)


def test_a_build_on_the_fused_graph_runs_in_our_loader_and_in_genai_s_generator(genai_build) -> None:
    import onnxruntime_genai as og

    quantize = genai_build.manifest["stages"]
    facts = json.dumps(quantize, default=str)
    assert '"graph": "genai"' in facts
    model = onnx.load(str(genai_build.build_dir / "model.onnx"), load_external_data=False)
    ops = {node.op_type for node in model.graph.node}
    assert {"GroupQueryAttention", "MatMulNBits", "GatherBlockQuantized"} <= ops
    assert "position_ids" not in {item.name for item in model.graph.input}
    config = json.loads((genai_build.build_dir / "genai_config.json").read_text())
    assert "position_ids" not in config["model"]["decoder"]["inputs"]
    runner = pipeline.load(genai_build.build_dir, threads=1)
    ids, ours = runner.generate_ids("The government said on Tuesday that", 6)
    generator_model = og.Model(str(genai_build.build_dir))
    params = og.GeneratorParams(generator_model)
    params.set_search_options(do_sample=False, max_length=len(ids) + 6)
    generator = og.Generator(generator_model, params)
    generator.append_tokens(ids)
    tokens = []
    while not generator.is_done() and len(tokens) < 6:
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    assert tokens == ours.tokens


def _copy_loop(decoder, prompt: list[int], new_tokens: int) -> tuple[list[int], list[np.ndarray]]:
    """Greedy decoding that hands the whole cache through numpy every step (the reference for the bound cache)."""
    ids = np.array([prompt], dtype=np.int64)
    logits, past = decoder.step(ids, np.ones_like(ids), decoder.empty_past(1))
    tokens, step_logits = [], []
    while True:
        step_logits.append(logits[0, -1])
        tokens.append(int(np.argmax(logits[0, -1])))
        if len(tokens) == new_tokens:
            return tokens, step_logits
        ids = np.concatenate([ids, [[tokens[-1]]]], axis=1)
        logits, past = decoder.step(ids[:, -1:], np.ones_like(ids), past)


@pytest.mark.parametrize("graph", ["export", "genai"])
def test_the_bound_cache_decodes_what_the_copy_loop_decodes(graph, tiny_llm_build, genai_build) -> None:
    """generate() keeps the cache in ONNX Runtime's buffers (one shared past/present buffer on the fused graph);
    its tokens and every step's logits must be those of feeding the cache back through numpy."""
    from pipeline.models.decoding import KVDecoder, generate

    # The export's FP32 graph (attention spelled out, position_ids), and the build on the fused graph.
    model = tiny_llm_build.build_dir / "model.fp32.onnx" if graph == "export" else genai_build.build_dir / "model.onnx"
    prompt = [1, 504, 2533, 1064, 335, 5355, 338, 260]
    with KVDecoder(model) as decoder:
        assert decoder.shares_buffer == (graph == "genai")
        expected_tokens, expected_logits = _copy_loop(decoder, prompt, 12)
        bound = generate(decoder, prompt, 12, keep_logits=True)
        assert decoder.vocab == bound.step_logits[0].shape[-1]  # logits written into a numpy array we own
        decoder.vocab = None  # a graph with a symbolic vocabulary: ONNX Runtime allocates the logits
        unsized = generate(decoder, prompt, 12, keep_logits=True)
        cache = decoder.bound_cache(len(prompt) + 1)
        cache.step(prompt)
        cache.step([0])
        with pytest.raises(ValueError, match="do not fit"):
            cache.step([0])
    for run in (bound, unsized):
        assert run.tokens == expected_tokens
        worst = max(float(np.abs(a - b).max()) for a, b in zip(run.step_logits, expected_logits))
        assert worst <= 1e-5, worst
