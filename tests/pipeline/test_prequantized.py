"""Pre-quantized GPTQ/AWQ checkpoints: written here from a tiny llama with a test-side RTN, in the
compressed-tensors format (packed by the compressed-tensors library itself), the GPTQ format (v1, act-order)
and AWQ's GEMM format; built with `pipeline build --model DIR` onto MatMulNBits with the checkpoint's own
codes, checked bit for bit against the checkpoint's de-quantization and for perplexity against the
de-quantized PyTorch model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from pipeline.core.errors import ExitCode, InputError
from tests.helpers import assert_one_line_error, run_cli

pytest.importorskip("gguf")  # the tiny decoder's tokenizer is SmolLM2's, read from its GGUF file

GROUP = 32
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MAX_PERPLEXITY_INCREASE = 0.005
# Little text and 2 greedy prompts: the verify stage dominates a tiny build's time.
CHEAP = {"calibration": {"samples": 16, "heldout_samples": 24, "max_length": 32},  # 20 prompts need 24 sentences
         "verify": {"greedy_prompts": 2, "max_perplexity_increase": MAX_PERPLEXITY_INCREASE}}


def build(folder: Path, out: Path) -> None:
    """`pipeline build --model DIR` with a build file holding the cheap settings."""
    out.mkdir(parents=True, exist_ok=True)
    build_file = out.parent / f"{out.name}.yaml"  # JSON is YAML
    build_file.write_text(json.dumps(CHEAP))
    result = run_cli("build", "--config", str(build_file), "--model", str(folder), "-o", str(out))
    assert result.returncode == 0, result.stderr[-2000:]


def rtn(weight: np.ndarray, group: int = GROUP, symmetric: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Test-side min-max RTN of a [N, K] weight: codes [N, K] 0..15, FP16 scales [N, G], zero points [N, G]
    (8 when symmetric)."""
    n, k = weight.shape
    blocks = weight.reshape(n, k // group, group)
    low, high = np.minimum(blocks.min(-1), 0), np.maximum(blocks.max(-1), 0)
    if symmetric:
        high = np.maximum(np.abs(low) * 7 / 8, high)
        low = -high * 8 / 7
    scales = ((high - low) / 15).astype(np.float16)
    safe = np.where(scales > 0, scales.astype(np.float32), 1)
    zeros = np.clip(np.rint(-low / safe), 0, 15).astype(np.uint8)
    codes = np.clip(np.rint(blocks / safe[..., None]) + zeros[..., None], 0, 15).astype(np.uint8)
    return codes.reshape(n, k), scales, zeros


def _words(nibbles: np.ndarray) -> np.ndarray:
    """[..., 8m] 4-bit values -> [..., m] int32 words, element i at bits 4i (test-side packer)."""
    shaped = nibbles.astype(np.uint32).reshape(nibbles.shape[:-1] + (-1, 8))
    return (shaped << (4 * np.arange(8, dtype=np.uint32))).sum(-1, dtype=np.uint32).view(np.int32)


def _linears(state: dict) -> list[str]:
    return sorted(key[: -len(".weight")] for key in state if key.endswith(".weight") and key.split(".")[-2] in LINEARS)


def _write(folder: Path, source: Path, tensors: dict, quantization_config: dict) -> Path:
    from safetensors.torch import save_file

    shutil.copytree(source, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    save_file({key: value.contiguous() for key, value in tensors.items()}, str(folder / "model.safetensors"))
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = quantization_config
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _state(source: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(source / "model.safetensors"))


def write_compressed_tensors(folder: Path, source: Path, symmetric: bool = False) -> Path:
    """Test-side RTN scales and zero points; codes and packing by compressed-tensors' own compressor."""
    pytest.importorskip("compressed_tensors")  # the `prequantized` extra (in `dev`)
    import torch
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
        num_bits=4, type="int", symmetric=symmetric, strategy="group", group_size=GROUP))
    state = _state(source)
    for name in _linears(state):
        weight = state.pop(f"{name}.weight")
        _, scales, zeros = rtn(weight.numpy(), symmetric=symmetric)
        parameters = {"weight": weight, "weight_scale": torch.from_numpy(scales)}
        if not symmetric:
            parameters["weight_zero_point"] = torch.from_numpy(zeros.astype(np.int8) - 8)
        compressed = PackedQuantizationCompressor.compress(parameters, scheme)
        state.update({f"{name}.{key}": value for key, value in compressed.items()})
    config = QuantizationConfig(config_groups={"group_0": scheme}, format="pack-quantized",
                                quantization_status="compressed", ignore=["lm_head"]).model_dump(mode="json")
    return _write(folder, source, state, config)


def write_gptq(folder: Path, source: Path, act_order: bool, seed: int = 0,
               symmetric: bool = False) -> tuple[Path, dict]:
    """GPTQ v1 (zero points stored minus 1); act-order: a random channel order per Linear, groups of that order;
    symmetric: `sym: true`, zero points 8."""
    import torch

    rng = np.random.default_rng(seed)
    state = _state(source)
    truth = {}
    for name in _linears(state):
        weight = state.pop(f"{name}.weight").numpy()
        n, k = weight.shape
        order = rng.permutation(k) if act_order else np.arange(k)
        codes, scales, zeros = rtn(weight[:, order], symmetric=symmetric)  # groups of consecutive channels in `order`
        g_idx = np.empty(k, dtype=np.int32)
        g_idx[order] = np.arange(k) // GROUP
        full = np.empty_like(codes)
        full[:, order] = codes
        truth[name] = (full, scales, zeros, g_idx)
        state[f"{name}.qweight"] = torch.from_numpy(_words(full.T.reshape(k // 8, 8, n).transpose(0, 2, 1).reshape(k // 8, n * 8)))
        state[f"{name}.qzeros"] = torch.from_numpy(_words(zeros.T.astype(np.int16) - 1 & 0xF))
        state[f"{name}.scales"] = torch.from_numpy(np.ascontiguousarray(scales.T))
        state[f"{name}.g_idx"] = torch.from_numpy(g_idx)
    config = {"quant_method": "gptq", "bits": 4, "group_size": GROUP, "desc_act": act_order, "sym": symmetric,
              "checkpoint_format": "gptq"}
    return _write(folder, source, state, config), truth


def write_awq(folder: Path, source: Path) -> tuple[Path, dict]:
    import torch

    order = np.array([0, 2, 4, 6, 1, 3, 5, 7])
    state = _state(source)
    truth = {}

    def pack(values: np.ndarray) -> np.ndarray:  # [rows, N] -> [rows, N/8], nibble i = column 8c + order[i]
        return _words(values.reshape(values.shape[0], -1, 8)[:, :, order].reshape(values.shape[0], -1))

    for name in _linears(state):
        weight = state.pop(f"{name}.weight").numpy()
        codes, scales, zeros = rtn(weight)
        truth[name] = (codes, scales, zeros, None)
        state[f"{name}.qweight"] = torch.from_numpy(pack(codes.T))
        state[f"{name}.qzeros"] = torch.from_numpy(pack(zeros.T))
        state[f"{name}.scales"] = torch.from_numpy(np.ascontiguousarray(scales.T))
    return _write(folder, source, state, {"quant_method": "awq", "bits": 4, "group_size": GROUP,
                                          "zero_point": True, "version": "gemm"}), truth


@pytest.fixture(scope="module")
def tiny_llama(tiny_llama_folder: Path) -> Path:
    """The suite's shared tiny random llama (tests/conftest.py), the source of every checkpoint here."""
    return tiny_llama_folder


def _read(folder: Path):
    from pipeline.models.prequantized import checkpoint_scheme, read_linears

    scheme = checkpoint_scheme(folder)
    assert scheme is not None
    return scheme, {linear.name: linear for linear in read_linears(folder, scheme)[0]}


@pytest.mark.parametrize("symmetric", [False, True])
def test_compressed_tensors_decode_equals_the_library_decompression(tiny_llama: Path, tmp_path: Path,
                                                                    symmetric: bool) -> None:
    import torch
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme

    folder = write_compressed_tensors(tmp_path / "ct", tiny_llama, symmetric)
    scheme, linears = _read(folder)
    assert (scheme.method, scheme.group_size, scheme.symmetric) == ("compressed-tensors", GROUP, symmetric)
    group = QuantizationScheme.model_validate(json.loads((folder / "config.json").read_text())
                                              ["quantization_config"]["config_groups"]["group_0"])
    state = _state(folder)
    assert len(linears) == 2 * len(LINEARS)
    for name, linear in linears.items():
        local = {key.rsplit(".", 1)[1]: value for key, value in state.items() if key.rsplit(".", 1)[0] == name}
        expected = PackedQuantizationCompressor.decompress(local, group)["weight"]
        assert expected.dtype == torch.float16  # the library de-quantizes in the scales' dtype
        # Ours is exact in FP32; rounded to FP16 it is the library's result bit for bit.
        np.testing.assert_array_equal(linear.dequantize().astype(np.float16), expected.numpy(), err_msg=name)


@pytest.mark.parametrize("kind", ["gptq", "gptq-act-order", "awq"])
def test_gptq_and_awq_decode_to_the_written_codes(tiny_llama: Path, tmp_path: Path, kind: str) -> None:
    if kind == "awq":
        folder, truth = write_awq(tmp_path / kind, tiny_llama)
    else:
        folder, truth = write_gptq(tmp_path / kind, tiny_llama, act_order=kind.endswith("act-order"))
    scheme, linears = _read(folder)
    assert scheme.act_order == (kind == "gptq-act-order")
    assert sorted(linears) == sorted(truth)
    for name, (codes, scales, zeros, g_idx) in truth.items():
        linear = linears[name]
        np.testing.assert_array_equal(linear.codes, codes)
        np.testing.assert_array_equal(linear.scales, scales.astype(np.float32))
        np.testing.assert_array_equal(linear.zero_points, zeros)
        if g_idx is not None:
            np.testing.assert_array_equal(linear.groups, g_idx)
        assert linear.act_order == (kind == "gptq-act-order")


def _graph_weights(model_path: Path) -> dict[str, np.ndarray]:
    """Every MatMulNBits' [N, K] weight de-quantized from the graph's own initializers (test-side unpacking,
    the layout of ONNX Runtime's contrib op spec), in the input order its activation arrives in."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(model_path))
    init = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    weights = {}
    for node in model.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        attrs = {a.name: a.i for a in node.attribute}
        n, k, block = attrs["N"], attrs["K"], attrs["block_size"]
        packed = init[node.input[1]].reshape(n, -1)
        q = np.stack([packed & 15, packed >> 4], -1).reshape(n, -1)[:, :k].astype(np.float32)
        blocks = -(-k // block)
        scales = init[node.input[2]].reshape(n, blocks)
        zp = init[node.input[3]].reshape(n, -1)
        z = np.stack([zp & 15, zp >> 4], -1).reshape(n, -1)[:, :blocks].astype(np.float32)
        g = np.arange(k) // block
        w = (q - z[:, g]) * scales[:, g]
        source = producers.get(node.input[0])
        if source is not None and source.op_type == "Gather" and source.input[1] in init:  # act-order permutation
            restored = np.empty_like(w)
            restored[:, init[source.input[1]]] = w
            w = restored
        split = next((n for n in model.graph.node if n.op_type == "Split" and node.output[0] in n.input), None)
        if split is not None:  # siblings stacked along N (engines/cpu/sibling_fusion.py): one weight per output
            sizes = init[split.input[1]]
            weights.update(zip(split.output, np.split(w, np.cumsum(sizes)[:-1], axis=0)))
        else:
            weights[node.name] = w
    return weights


def _stage(build_dir: Path, name: str) -> dict:
    manifest = json.loads((build_dir / "manifest.json").read_text())
    return next(entry for entry in manifest["stages"] if entry["stage"] == name)


@pytest.fixture(scope="module")
def compressed_build(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = write_compressed_tensors(tmp_path_factory.mktemp("ct") / "tiny-llama-ct", tiny_llama)
    out = tmp_path_factory.mktemp("ct-build") / "build"
    build(folder, out)
    return folder, out


def _assert_exact(folder: Path, build_dir: Path, act_order: bool) -> dict:
    _, linears = _read(folder)
    expected = sorted(linear.dequantize().tobytes() for linear in linears.values())
    summary = _stage(build_dir, "quantize")["metrics"]
    head = summary["lm_head_node"]
    body = {name: w for name, w in _graph_weights(build_dir / "model.onnx").items()
            if not name.startswith(head)}
    # Every checkpoint Linear is in the graph with the checkpoint's own de-quantized values, bit for bit.
    assert sorted(w.astype(np.float32).tobytes() for w in body.values()) == expected
    assert summary["algorithm"] == "checkpoint"
    assert summary["checkpoint_matmuls"] == len(linears) and summary["unmatched_linears"] == 0
    assert summary["rerounded_blocks"] == 0
    assert summary["checkpoint_blocks"] == sum(linear.scales.size for linear in linears.values())
    assert (summary["act_order_matmuls"] > 0) == act_order
    return summary


def test_compressed_tensors_checkpoint_builds_with_its_own_codes(compressed_build) -> None:
    folder, out = compressed_build
    _assert_exact(folder, out, act_order=False)
    parity = json.loads((out / "parity.json").read_text())
    assert parity["status"] == "pass" and not parity["failures"], parity["failures"]
    increase = parity["outputs"]["logits"]["perplexity_increase"]
    assert abs(increase) <= MAX_PERPLEXITY_INCREASE, increase


def test_gptq_act_order_checkpoint_builds_exactly(tiny_llama: Path, tmp_path: Path) -> None:
    folder, _ = write_gptq(tmp_path / "gptq", tiny_llama, act_order=True)
    out = tmp_path / "build"
    build(folder, out)
    _assert_exact(folder, out, act_order=True)


def test_export_runs_the_checkpoint_de_quantized(tiny_llama: Path, tmp_path: Path) -> None:
    """The PyTorch reference is the model with (q - z) * s weights (and the config's other tensors)."""
    import torch

    from pipeline.models.loading import load_llm

    folder, truth = write_awq(tmp_path / "awq", tiny_llama)
    model = load_llm(folder)
    state = model.state_dict()
    for name, (codes, scales, zeros, _) in truth.items():
        g = np.arange(codes.shape[1]) // GROUP
        expected = (codes.astype(np.float32) - zeros[:, g]) * scales.astype(np.float32)[:, g]
        np.testing.assert_array_equal(state[f"{name}.weight"].numpy(), expected)
    original = _state(tiny_llama)
    assert torch.equal(state["model.embed_tokens.weight"], original["model.embed_tokens.weight"])


def _edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"].update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def test_hostile_checkpoints_are_refused_with_one_line(tiny_llama: Path, tmp_path: Path) -> None:
    from pipeline.build.plan import plan_build
    from pipeline.config import load_config

    def refused(folder: Path) -> InputError:
        with pytest.raises(InputError) as caught:
            plan_build(load_config(None, {"model": {"path": str(folder)}}))
        assert caught.value.exit_code == ExitCode.BAD_INPUT and "\n" not in str(caught.value)
        return caught.value

    folder, _ = write_awq(tmp_path / "bits", tiny_llama)
    _edit_config(folder, bits=3)
    assert "bits 3" in str(refused(folder))
    _edit_config(folder, bits=4, quant_method="hqq")
    assert "quant_method 'hqq'" in str(refused(folder))
    _edit_config(folder, quant_method="torchao", quant_type={"default": {"_type": "Int8DynamicActivationIntxWeightConfig"}})
    assert "only IntxWeightOnlyConfig" in str(refused(folder))
    _edit_config(folder, quant_type={"default": {"_type": "IntxWeightOnlyConfig", "_data": {
        "weight_dtype": {"_type": "torch.dtype", "_data": "int8"}}}})
    assert "weight_dtype 'int8'" in str(refused(folder))
    # Packed shapes that disagree with the config: a group size the scales do not have.
    _edit_config(folder, quant_method="awq", group_size=64)
    assert "scale groups" in str(refused(folder))
    # A config whose hidden size disagrees with the packed K.
    _edit_config(folder, group_size=GROUP)
    config = json.loads((folder / "config.json").read_text())
    config["intermediate_size"] = 96
    (folder / "config.json").write_text(json.dumps(config))
    assert "where its config says" in str(refused(folder))
    # The same through the command: exit 2, one line, before any work.
    result = run_cli("build", "--model", str(folder), "-o", str(tmp_path / "never"))
    assert_one_line_error(result, ExitCode.BAD_INPUT, "pre-quantized checkpoint")
    assert not (tmp_path / "never" / "export").exists()


# --- QAT: torchao's fake-quantized training, converted and saved as torchao writes it --------------------------

def write_torchao_qat(folder: Path, source: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    """A few QAT steps (torchao int4 group-32 fake quantization of every body Linear) on the tiny llama,
    then torchao's convert and its safetensors flattening. Returns the folder, probe ids and the QAT
    model's own fake-quantized logits on them (taken before convert)."""
    # The `prequantized` extra, not `dev`: installed, torchao is imported by transformers on every model load
    # and prints warnings that break the one-line error contract of every other CLI test.
    pytest.importorskip("torchao", reason="torchao (pip install '.[prequantized]') writes the QAT model")
    import torch
    from safetensors.torch import save_file
    from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict
    from torchao.quantization import IntxWeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerGroup
    from torchao.quantization.qat import QATConfig
    from transformers import AutoModelForCausalLM, TorchAoConfig

    model = AutoModelForCausalLM.from_pretrained(str(source), dtype=torch.float32, attn_implementation="eager")
    base = IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(GROUP))

    def body(module: torch.nn.Module, name: str) -> bool:
        return isinstance(module, torch.nn.Linear) and name.split(".")[-1] in LINEARS

    quantize_(model, QATConfig(base, step="prepare"), filter_fn=body)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (4, 24), generator=generator)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    with torch.no_grad():
        qat_logits = model(input_ids=ids[:1]).logits[0].numpy()
    quantize_(model, QATConfig(base, step="convert"), filter_fn=body)
    state = {key: value for key, value in model.state_dict().items() if key != "lm_head.weight"}  # tied
    tensors, metadata = flatten_tensor_state_dict(state)
    shutil.copytree(source, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    save_file({key: value.contiguous() for key, value in tensors.items()}, str(folder / "model.safetensors"), metadata)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = TorchAoConfig(base).to_dict()
    (folder / "config.json").write_text(json.dumps(config))
    return folder, ids[:1].numpy(), qat_logits


def test_torchao_qat_model_builds_against_its_fake_quantized_forward(tiny_llama: Path, tmp_path: Path) -> None:
    import torch

    from pipeline.models.loading import load_llm

    folder, ids, qat_logits = write_torchao_qat(tmp_path / "qat", tiny_llama)
    scheme, _ = _read(folder)
    assert (scheme.method, scheme.group_size, scheme.symmetric) == ("torchao", GROUP, True)
    # The de-quantized model (the export's reference) is the QAT model's fake-quantized forward.
    with torch.no_grad():
        logits = load_llm(folder)(input_ids=torch.from_numpy(ids)).logits[0].numpy()
    np.testing.assert_allclose(logits, qat_logits, rtol=0, atol=1e-5)
    out = tmp_path / "build"
    build(folder, out)
    _assert_exact(folder, out, act_order=False)
    manifest = json.loads((out / "manifest.json").read_text())
    quantize = _stage(out, "quantize")
    assert list(quantize["inputs"]) == ["stage:export"]  # no calibration read: the QAT scales are kept
    assert json.loads((out / "parity.json").read_text())["status"] == "pass", manifest
