"""Pre-quantized 4-bit checkpoints (GPTQ/AWQ) as transformers saves them: read, checked, de-quantized.

Formats (layouts read in each project's own packing code):
- compressed-tensors `pack-quantized` (llm-compressor): `<linear>.weight_packed` int32 [N, K/8], eight
  4-bit values per word, element i at bits 4i, each stored as signed code + 8; `weight_scale` [N, G];
  `weight_zero_point` int32 [N/8, G] packed the same way along N (asymmetric only; symmetric means 0);
  `weight_shape` [N, K]; `weight_g_idx` [K] with `actorder: group`. W = (q - z) * s.
- GPTQ (AutoGPTQ / GPTQModel, `checkpoint_format` gptq or gptq_v2): `qweight` int32 [K/8, N] packed
  along K (row 8i+j at bits 4j); `qzeros` int32 [G, N/8] packed along N; `scales` [G, N]; `g_idx` [K].
  Format v1 (`gptq`) stores each zero point minus 1. W = (q - z) * s[g_idx].
- AWQ (AutoAWQ GEMM, `version: gemm`): `qweight` int32 [K, N/8] and `qzeros` [G, N/8] packed along N in
  the order (0, 2, 4, 6, 1, 3, 5, 7) (nibble i holds column 8c + order[i]); `scales` [G, N].
- torchao (a QAT model after `QATConfig(IntxWeightOnlyConfig(int4, PerGroup(g)), step="convert")`, saved
  with torchao's safetensors flattening): `<linear>._weight_qdata` int8 [N, K] in -8..7,
  `_weight_scale` [N, G], `_weight_zero_point` [N, G] int8. W = (q - z) * s, the QAT model's own
  fake-quantized forward (its learned or chosen scales), so nothing is re-calibrated.

Every checkpoint is decoded to the same `QuantizedLinear` (codes 0..15, integer zero points, FP32
scales): the export runs the model de-quantized from it, and the quantize stage puts those very codes
into MatMulNBits (engines/cpu/prequantized.py). Anything else (bits != 4, another quant_method or
format, shapes that disagree with the config) is refused with one line, before any work.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engines.checkpoint_linears import QuantizedLinear
from pipeline.core.errors import InputError

METHODS = ("compressed-tensors", "gptq", "awq", "torchao")
# Read by other loaders (transformers' bitsandbytes de-quantizer), not here.
ELSEWHERE = ("bitsandbytes",)
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
GPTQ_FORMATS = {"gptq": 1, "gptq_v2": 0}  # checkpoint_format -> the offset added to stored zero points


@dataclass(frozen=True)
class Scheme:
    method: str
    group_size: int | None  # None: one group per output channel (the whole K)
    symmetric: bool
    zero_offset: int = 0
    act_order: bool = False

    def describe(self) -> str:
        group = f"group {self.group_size}" if self.group_size else "per channel"
        return (f"{self.method} 4-bit, {group}, {'symmetric' if self.symmetric else 'asymmetric'}"
                + (", act-order" if self.act_order else ""))


def _refuse(path: Path, what: str) -> InputError:
    return InputError(f"{path.name}: pre-quantized checkpoint: {what}")


def checkpoint_scheme(path: Path) -> Scheme | None:
    """The 4-bit scheme named by a model folder's `quantization_config`, None when it has none (or one
    another loader reads); InputError for one Quantpipe cannot take as it is."""
    config_file = path / "config.json"
    if not path.is_dir() or not config_file.is_file():
        return None
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError):
        return None  # the model checks report an unreadable config.json
    quant = config.get("quantization_config") if isinstance(config, dict) else None
    if quant is None:
        return None
    if not isinstance(quant, dict):
        raise _refuse(path, "quantization_config is not an object")
    method = quant.get("quant_method")
    if method in ELSEWHERE:
        return None
    if method not in METHODS:
        raise _refuse(path, f"quant_method {method!r} is not one Quantpipe reads "
                            f"({', '.join(METHODS + ELSEWHERE)})")
    if method == "compressed-tensors":
        return _compressed_tensors_scheme(path, quant)
    if method == "torchao":
        return _torchao_scheme(path, quant)
    bits = quant.get("bits", quant.get("w_bit"))
    if bits != 4:
        raise _refuse(path, f"bits {bits!r}: only 4-bit weights map onto MatMulNBits' blocks")
    group = quant.get("group_size", quant.get("q_group_size", 128))
    group_size = None if group == -1 else group
    if group_size is not None and (not isinstance(group_size, int) or group_size <= 0):
        raise _refuse(path, f"group_size {group!r} is not a positive integer or -1")
    if method == "gptq":
        checkpoint_format = quant.get("checkpoint_format", "gptq")
        if checkpoint_format not in GPTQ_FORMATS:
            raise _refuse(path, f"GPTQ checkpoint_format {checkpoint_format!r} is not one of {', '.join(GPTQ_FORMATS)}")
        return Scheme("gptq", group_size, bool(quant.get("sym", True)), GPTQ_FORMATS[checkpoint_format],
                      bool(quant.get("desc_act", False)))
    version = str(quant.get("version", "gemm")).lower()
    if version != "gemm":
        raise _refuse(path, f"AWQ version {version!r}: only the GEMM packing is read")
    if not quant.get("zero_point", True):
        raise _refuse(path, "AWQ without zero points is not read")
    return Scheme("awq", group_size, False)


def _compressed_tensors_scheme(path: Path, quant: dict[str, Any]) -> Scheme:
    groups = quant.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise _refuse(path, "compressed-tensors config_groups is missing")
    schemes = set()
    for name, group in groups.items():
        weights = group.get("weights") if isinstance(group, dict) else None
        if not isinstance(weights, dict):
            raise _refuse(path, f"config group {name!r} quantizes no weights")
        if group.get("input_activations") or group.get("output_activations"):
            raise _refuse(path, f"config group {name!r} quantizes activations too (only weight-only 4-bit is read)")
        form = group.get("format") or quant.get("format")
        if form != "pack-quantized":
            raise _refuse(path, f"compressed-tensors format {form!r}: only pack-quantized is read")
        if weights.get("num_bits") != 4 or weights.get("type", "int") != "int":
            raise _refuse(path, f"bits {weights.get('num_bits')!r} ({weights.get('type')}): only 4-bit int weights "
                                "map onto MatMulNBits' blocks")
        strategy = weights.get("strategy")
        if strategy not in ("group", "channel"):
            raise _refuse(path, f"weight strategy {strategy!r}: only group and channel are read")
        size = weights.get("group_size") if strategy == "group" else None
        if strategy == "group" and (not isinstance(size, int) or size <= 0):
            raise _refuse(path, f"group_size {size!r} is not a positive integer")
        schemes.add((size, bool(weights.get("symmetric", True)), weights.get("actorder") == "group"))
    if len(schemes) != 1:
        raise _refuse(path, "config groups with different weight schemes are not read")
    size, symmetric, act_order = schemes.pop()
    return Scheme("compressed-tensors", size, symmetric, 0, act_order)


def _torchao_scheme(path: Path, quant: dict[str, Any]) -> Scheme:
    kind = quant.get("quant_type")
    default = kind.get("default") if isinstance(kind, dict) else None
    name = default.get("_type") if isinstance(default, dict) else kind
    if name != "IntxWeightOnlyConfig":
        raise _refuse(path, f"torchao quant_type {name!r}: only IntxWeightOnlyConfig (weight-only int4) is read")
    data = default.get("_data") or {}

    def value(key: str) -> Any:
        entry = data.get(key)
        return entry.get("_data") if isinstance(entry, dict) else entry

    dtype = value("weight_dtype")
    if dtype != "int4":
        raise _refuse(path, f"bits: torchao weight_dtype {dtype!r}: only int4 weights map onto MatMulNBits' blocks")
    if value("intx_packing_format") not in (None, "UNPACKED_TO_INT8"):
        raise _refuse(path, f"torchao packing {value('intx_packing_format')!r}: only UNPACKED_TO_INT8 is read")
    granularity = data.get("granularity") or {}
    if granularity.get("_type") == "PerGroup":
        size = (granularity.get("_data") or {}).get("group_size")
    elif granularity.get("_type") == "PerAxis":
        size = None
    else:
        raise _refuse(path, f"torchao granularity {granularity.get('_type')!r}: only PerGroup and PerAxis are read")
    return Scheme("torchao", size, value("mapping_type") != "ASYMMETRIC")


def _nibbles(words: np.ndarray) -> np.ndarray:
    """int32 words -> their eight 4-bit values along the last axis, element i at bits 4i."""
    shifts = np.arange(0, 32, 4, dtype=np.uint32)
    values = (words.astype(np.uint32)[..., None] >> shifts) & 0xF
    return values.reshape(words.shape[:-1] + (-1,)).astype(np.uint8)


def _read_tensors(path: Path) -> dict[str, Any]:
    from safetensors import SafetensorError, safe_open

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise _refuse(path, "no .safetensors weights")
    tensors: dict[str, Any] = {}
    try:
        for file in files:
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                    tensors[key] = handle.get_tensor(key)
    except (SafetensorError, OSError) as exc:
        raise _refuse(path, f"cannot read its weights: {str(exc).splitlines()[0]}") from None
    return tensors


def _array(tensors: dict[str, Any], key: str, path: Path, dtype: Any = None) -> np.ndarray:
    import torch

    if key not in tensors:
        raise _refuse(path, f"{key} is missing")
    tensor = tensors[key]
    if dtype is np.int32 and tensor.dtype != torch.int32:
        raise _refuse(path, f"{key} is {tensor.dtype}, not int32")
    return tensor.float().numpy() if tensor.is_floating_point() else tensor.numpy()


def _shape_error(path: Path, key: str, actual: tuple[int, ...], expected: tuple[int, ...], why: str) -> InputError:
    return _refuse(path, f"{key} has shape {list(actual)} where {why} says {list(expected)}")


def _check(path: Path, key: str, array: np.ndarray, expected: tuple[int, ...], why: str) -> None:
    if tuple(array.shape) != expected:
        raise _shape_error(path, key, tuple(array.shape), expected, why)


def _group_size(path: Path, scheme: Scheme, prefix: str, k: int, groups: int) -> int:
    size = scheme.group_size or k
    if groups != -(-k // size):
        raise _refuse(path, f"{prefix} has {groups} scale groups for K={k}, where group_size {size} needs {-(-k // size)}")
    return size


def _g_idx(path: Path, tensors: dict[str, Any], key: str, k: int, groups: int) -> np.ndarray | None:
    if key not in tensors:
        return None
    g_idx = _array(tensors, key, path).astype(np.int64)
    _check(path, key, g_idx, (k,), "K")
    if g_idx.size and (g_idx.min() < 0 or g_idx.max() >= groups):
        raise _refuse(path, f"{key} names groups outside 0..{groups - 1}")
    return g_idx


def read_linears(path: Path, scheme: Scheme) -> tuple[list[QuantizedLinear], dict[str, Any]]:
    """The checkpoint's quantized Linears and its other tensors (embeddings, norms, biases) as torch tensors."""
    tensors = _read_tensors(path)
    suffix = {"compressed-tensors": ".weight_packed", "torchao": "._weight_qdata"}.get(scheme.method, ".qweight")
    prefixes = sorted(key[: -len(suffix)] for key in tensors if key.endswith(suffix))
    if not prefixes:
        raise _refuse(path, f"its config says {scheme.method} but no tensor ends in {suffix}")
    reader = {"compressed-tensors": _compressed_linear, "gptq": _gptq_linear, "awq": _awq_linear,
              "torchao": _torchao_linear}[scheme.method]
    linears = [reader(path, scheme, tensors, prefix) for prefix in prefixes]
    owned = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx",
             "qweight", "qzeros", "scales", "g_idx", "_weight_qdata", "_weight_scale", "_weight_zero_point")
    quantized = set(prefixes)
    rest = {key: value for key, value in tensors.items()
            if not (key.rsplit(".", 1)[0] in quantized and key.rsplit(".", 1)[-1] in owned)}
    return linears, rest


def _compressed_linear(path: Path, scheme: Scheme, tensors: dict[str, Any], prefix: str) -> QuantizedLinear:
    shape = _array(tensors, f"{prefix}.weight_shape", path).astype(np.int64).reshape(-1)
    if shape.size != 2 or shape.min() <= 0:
        raise _refuse(path, f"{prefix}.weight_shape {shape.tolist()} is not [N, K]")
    n, k = (int(v) for v in shape)
    packed = _array(tensors, f"{prefix}.weight_packed", path, np.int32)
    _check(path, f"{prefix}.weight_packed", packed, (n, -(-k // 8)), "weight_shape")
    scales = _array(tensors, f"{prefix}.weight_scale", path)
    if scales.ndim != 2 or scales.shape[0] != n:
        raise _shape_error(path, f"{prefix}.weight_scale", scales.shape, (n, -1), "weight_shape")
    groups = scales.shape[1]
    size = _group_size(path, scheme, prefix, k, groups)
    codes = _nibbles(packed)[:, :k]
    if scheme.symmetric:
        zeros = np.full((n, groups), 8, dtype=np.uint8)  # signed 0, stored + 8
    else:
        zp = _array(tensors, f"{prefix}.weight_zero_point", path, np.int32)
        _check(path, f"{prefix}.weight_zero_point", zp, (-(-n // 8), groups), "weight_shape and the scales")
        zeros = np.ascontiguousarray(_nibbles(zp.T)[:, :n].T)
    return QuantizedLinear(prefix, codes, scales, zeros, size,
                           _g_idx(path, tensors, f"{prefix}.weight_g_idx", k, groups))


def _int32_packed(path: Path, scheme: Scheme, tensors: dict[str, Any], prefix: str, along_k: bool,
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, int, int, int]:
    """(qweight, scales, qzeros, K, N, groups, group size) of a GPTQ (8 codes per int32 word along K) or AWQ
    (along N) Linear, with the shapes both formats share checked: scales [groups, N], qzeros [groups, N/8]."""
    qweight = _array(tensors, f"{prefix}.qweight", path, np.int32)
    if qweight.ndim != 2:
        raise _refuse(path, f"{prefix}.qweight is not 2-D")
    k, n = (qweight.shape[0] * 8, qweight.shape[1]) if along_k else (qweight.shape[0], qweight.shape[1] * 8)
    scales = _array(tensors, f"{prefix}.scales", path)
    if scales.ndim != 2 or scales.shape[1] != n:
        raise _shape_error(path, f"{prefix}.scales", scales.shape, (-1, n), "qweight")
    groups = scales.shape[0]
    size = _group_size(path, scheme, prefix, k, groups)
    qzeros = _array(tensors, f"{prefix}.qzeros", path, np.int32)
    _check(path, f"{prefix}.qzeros", qzeros, (groups, -(-n // 8)), "qweight and the scales")
    return qweight, scales, qzeros, k, n, groups, size


def _gptq_linear(path: Path, scheme: Scheme, tensors: dict[str, Any], prefix: str) -> QuantizedLinear:
    qweight, scales, qzeros, k, n, groups, size = _int32_packed(path, scheme, tensors, prefix, along_k=True)
    # [K/8, N] words, row 8i+j at bits 4j -> [K, N] -> codes [N, K]
    codes = np.ascontiguousarray(_nibbles(qweight.T).reshape(n, k))
    zeros = _nibbles(qzeros)[:, :n].astype(np.int16) + scheme.zero_offset
    if zeros.max() > 15:
        raise _refuse(path, f"{prefix}.qzeros holds a zero point of {int(zeros.max())} (more than 4 bits)")
    g_idx = _g_idx(path, tensors, f"{prefix}.g_idx", k, groups)
    return QuantizedLinear(prefix, codes, np.ascontiguousarray(scales.T), np.ascontiguousarray(zeros.T.astype(np.uint8)),
                           size, g_idx)


def _awq_linear(path: Path, scheme: Scheme, tensors: dict[str, Any], prefix: str) -> QuantizedLinear:
    qweight, scales, qzeros, k, n, groups, size = _int32_packed(path, scheme, tensors, prefix, along_k=False)
    inverse = np.argsort(AWQ_ORDER)  # nibble i of a word holds column order[i]

    def unpack(words: np.ndarray) -> np.ndarray:
        values = _nibbles(words).reshape(words.shape[0], -1, 8)
        return values[:, :, inverse].reshape(words.shape[0], -1)

    return QuantizedLinear(prefix, np.ascontiguousarray(unpack(qweight).T), np.ascontiguousarray(scales.T),
                           np.ascontiguousarray(unpack(qzeros).T), size)


def _torchao_linear(path: Path, scheme: Scheme, tensors: dict[str, Any], prefix: str) -> QuantizedLinear:
    qdata = _array(tensors, f"{prefix}._weight_qdata", path).astype(np.int16)
    if qdata.ndim != 2:
        raise _refuse(path, f"{prefix}._weight_qdata is not 2-D")
    n, k = qdata.shape
    scales = _array(tensors, f"{prefix}._weight_scale", path).reshape(n, -1) if qdata.size else qdata
    groups = scales.shape[1]
    size = _group_size(path, scheme, prefix, k, groups)
    key = f"{prefix}._weight_zero_point"
    zeros = _array(tensors, key, path).reshape(n, groups) if key in tensors else np.zeros((n, groups))
    if np.any(zeros != np.rint(zeros)):
        raise _refuse(path, f"{key} holds non-integer zero points (MatMulNBits' are 4-bit integers)")
    codes, offsets = qdata + 8, np.rint(zeros).astype(np.int16) + 8  # int4 -8..7 -> 0..15, zero points alike
    for name, values in ((f"{prefix}._weight_qdata", codes), (key, offsets)):
        if values.size and (values.min() < 0 or values.max() > 15):
            raise _refuse(path, f"{name} holds values outside int4")
    return QuantizedLinear(prefix, codes.astype(np.uint8), np.ascontiguousarray(scales, dtype=np.float32),
                           offsets.astype(np.uint8), size)


def dequantized_state_dict(path: Path, scheme: Scheme) -> dict[str, Any]:
    """The model's state dict in FP32 with every quantized Linear's weight de-quantized: (q - z) * s."""
    import torch

    linears, rest = read_linears(path, scheme)
    state = {key: value.float() if value.is_floating_point() else value for key, value in rest.items()}
    for linear in linears:
        weight = linear.dequantize()
        if not np.isfinite(weight).all():
            raise _refuse(path, f"{linear.name} has non-finite scales")
        state[f"{linear.name}.weight"] = torch.from_numpy(weight)
    return state


def _config_without_quantization(path: Path) -> Any:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(path), trust_remote_code=False)
    except (OSError, ValueError, KeyError) as exc:
        raise _refuse(path, f"cannot read its configuration: {str(exc).splitlines()[0]}") from None
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    return config


def check_checkpoint(path: Path, scheme: Scheme) -> int:
    """Refuse, before any work, a checkpoint whose packed shapes disagree with its own config's model
    (built on the meta device: no weights); returns the number of quantized Linears."""
    import torch
    from transformers import AutoModelForCausalLM

    linears, _ = read_linears(path, scheme)
    with torch.device("meta"):
        shapes = {name: tuple(tensor.shape) for name, tensor in
                  AutoModelForCausalLM.from_config(_config_without_quantization(path)).state_dict().items()}
    for linear in linears:
        expected = shapes.get(f"{linear.name}.weight")
        if expected is None:
            raise _refuse(path, f"{linear.name} is not a Linear of the config's model")
        if tuple(linear.codes.shape) != expected:
            raise _refuse(path, f"{linear.name} unpacks to [N, K] = {list(linear.codes.shape)} where its config "
                                f"says {list(expected)}")
    return len(linears)


def load_dequantized_llm(path: Path, scheme: Scheme) -> Any:
    """The causal LM de-quantized from the checkpoint, in FP32 with eager attention."""
    import torch
    from transformers import AutoModelForCausalLM

    config = _config_without_quantization(path)
    state = dequantized_state_dict(path, scheme)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # a size mismatch: the packed shapes disagree with the model's config
        detail = next((line.strip() for line in str(exc).splitlines() if "size mismatch" in line), str(exc).splitlines()[0])
        raise _refuse(path, detail) from None
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    missing = sorted(set(result.missing_keys) - tied)
    if missing or result.unexpected_keys:
        names = missing[:3] or sorted(result.unexpected_keys)[:3]
        raise _refuse(path, f"its tensors do not fit the config's model ({'missing' if missing else 'unexpected'}: "
                            f"{', '.join(names)})")
    model.tie_weights()
    return model.eval()
