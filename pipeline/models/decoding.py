"""Running an exported causal LM in ONNX Runtime with its KV cache: prefill, decode, generation, perplexity."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import onnx
import onnxruntime as ort

from engines.ort_session import SessionSettings, create_session
from pipeline.core.errors import InputError
from pipeline.models.kv_cache import LOGITS

PAST_PREFIX, PRESENT_PREFIX = "past_key_values.", "present."


def _head_dim(dimension: object, model_path: Path) -> int:
    """The cache's head size: fixed in our exports; onnxruntime-genai's builder leaves it symbolic and writes
    it in the genai_config.json beside the graph."""
    if isinstance(dimension, int):
        return dimension
    config = model_path.parent / "genai_config.json"
    try:
        return int(json.loads(config.read_text(encoding="utf-8"))["model"]["decoder"]["head_size"])
    except (OSError, ValueError, KeyError, TypeError):
        raise InputError(f"{model_path}: its cache's head size is symbolic ({dimension}) and {config.name} "
                         "does not give it") from None


class KVDecoder:
    """One ONNX graph, fed its own present keys/values back as the next step's past."""

    def __init__(self, model_path: Path, threads: int = 0, simulate_tensorrt: bool = False,
                 settings: Optional[SessionSettings] = None) -> None:
        # simulate_tensorrt: a TensorRT Q/DQ graph, run as exact fake quantization (no integer kernels);
        # settings: a build's recorded session settings (they replace simulate_tensorrt)
        self.session = create_session(model_path, threads, simulate_tensorrt=simulate_tensorrt, settings=settings)
        inputs = {item.name: item for item in self.session.get_inputs()}
        self.past_names = [name for name in inputs if name.startswith(PAST_PREFIX)]
        if not self.past_names:
            raise InputError(f"{model_path} has no past_key_values inputs: not a decoder LLM exported with a KV cache")
        first = inputs[self.past_names[0]].shape
        self.kv_heads, self.head_dim = int(first[1]), _head_dim(first[3], model_path)
        self.output_names = [LOGITS] + [PRESENT_PREFIX + name[len(PAST_PREFIX):] for name in self.past_names]
        vocab = next(item.shape[-1] for item in self.session.get_outputs() if item.name == LOGITS)
        self.vocab: Optional[int] = vocab if isinstance(vocab, int) else None
        # Graphs whose attention computes rotary positions from the mask (GroupQueryAttention) take no position_ids.
        self.takes_positions = "position_ids" in inputs
        # Only graphs whose attention takes no positions can be GroupQueryAttention with rotary inside; reading the
        # graph costs seconds on a large FP32 export, which always takes position_ids.
        self.shares_buffer = not self.takes_positions and presents_share_buffer(
            onnx.load(str(model_path), load_external_data=False).graph)

    def empty_past(self, batch: int) -> list[np.ndarray]:
        return [np.zeros((batch, self.kv_heads, 0, self.head_dim), np.float32) for _ in self.past_names]

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray,
             past: Sequence[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """Logits of the new tokens and the cache with them appended (left-to-right, no padding)."""
        past_length = past[0].shape[2]
        feed = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self.takes_positions:
            positions = np.cumsum(attention_mask, axis=1)[:, past_length:] - 1
            feed["position_ids"] = np.maximum(positions, 0).astype(np.int64)
        feed.update(zip(self.past_names, past))
        outputs = self.session.run(self.output_names, feed)
        return outputs[0], outputs[1:]

    def logits(self, input_ids: np.ndarray, attention_mask: Optional[np.ndarray] = None) -> np.ndarray:
        """Prefill only (past length 0): logits of every position."""
        mask = np.ones_like(input_ids) if attention_mask is None else attention_mask
        return self.step(input_ids, mask, self.empty_past(input_ids.shape[0]))[0]

    def bound_cache(self, max_length: int) -> "BoundCache":
        """A cache that stays in ONNX Runtime's buffers between steps, for one sequence of at most max_length tokens."""
        return BoundCache(self, max_length)

    def __enter__(self) -> "KVDecoder":
        return self

    def __exit__(self, *exc: object) -> None:
        del self.session


def presents_share_buffer(graph: onnx.GraphProto) -> bool:
    """True when every present output comes straight out of a GroupQueryAttention node: that kernel writes the new
    keys/values in place when its past and present are one buffer (onnxruntime-genai's past_present_share_buffer)."""
    producers = {output: node.op_type for node in graph.node for output in node.output}
    presents = [item.name for item in graph.output if item.name.startswith(PRESENT_PREFIX)]
    return bool(presents) and all(producers.get(name) == "GroupQueryAttention" for name in presents)


class BoundCache:
    """The KV cache of one sequence, kept in ONNX Runtime's own buffers between decode steps (IO binding), so a
    step does not copy the whole cache out to numpy and back in.

    GroupQueryAttention graphs get one [1, kv_heads, max_length, head_dim] buffer per past/present pair, bound as
    both: the kernel appends the step's keys/values in place and reads the valid length from the attention mask
    (as onnxruntime-genai's generator runs them). Other graphs concatenate past and new keys themselves: their
    present outputs are handed back as the next step's past without leaving ONNX Runtime."""

    def __init__(self, decoder: KVDecoder, max_length: int) -> None:
        self.decoder, self.max_length, self.length = decoder, max_length, 0
        self.mask = np.ones((1, max_length), dtype=np.int64)  # each step binds a view: no array per step
        self.positions = np.arange(max_length, dtype=np.int64)[None, :]
        self.binding = decoder.session.io_binding()
        self.binding.bind_output(LOGITS)  # bound first: get_outputs() lists outputs in the order they were bound
        self.presents = decoder.output_names[1:]
        if decoder.shares_buffer:
            shape = (1, decoder.kv_heads, max_length, decoder.head_dim)
            for past, present in zip(decoder.past_names, self.presents):
                buffer = ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, np.float32))
                self.binding.bind_ortvalue_input(past, buffer)
                self.binding.bind_ortvalue_output(present, buffer)
        else:
            for past, empty in zip(decoder.past_names, decoder.empty_past(1)):
                self.binding.bind_cpu_input(past, empty)

    def step(self, input_ids: Sequence[int]) -> np.ndarray:
        """Logits [1, len(input_ids), vocab] of the new tokens, appended to the cache."""
        new = len(input_ids)
        if self.length + new > self.max_length:
            raise ValueError(f"the cache holds {self.max_length} tokens; {self.length} + {new} do not fit")
        binding = self.binding
        binding.bind_cpu_input("input_ids", np.array([list(input_ids)], dtype=np.int64))
        binding.bind_cpu_input("attention_mask", self.mask[:, :self.length + new])
        if self.decoder.takes_positions:
            binding.bind_cpu_input("position_ids", self.positions[:, self.length:self.length + new])
        logits = None
        if self.decoder.vocab is not None:  # ONNX Runtime writes the logits straight into a numpy array
            logits = np.empty((1, new, self.decoder.vocab), dtype=np.float32)
            binding.bind_ortvalue_output(LOGITS, ort.OrtValue.ortvalue_from_numpy(logits))
        else:  # a symbolic vocabulary size: ONNX Runtime allocates the output
            binding.bind_output(LOGITS)
        if not self.decoder.shares_buffer:
            for present in self.presents:
                binding.bind_output(present)
        self.decoder.session.run_with_iobinding(binding)
        if not self.decoder.shares_buffer:  # the shared buffers need no handing back
            for past, value in zip(self.decoder.past_names, binding.get_outputs()[1:]):
                binding.bind_ortvalue_input(past, value)
        if logits is None:
            logits = binding.get_outputs()[0].numpy()
        self.length += new
        return logits


@dataclass
class Generation:
    tokens: list[int]
    prefill_s: float
    decode_s: float
    step_logits: list[np.ndarray] = field(default_factory=list)

    @property
    def decode_tokens_per_s(self) -> float:
        steps = len(self.tokens) - 1  # the first new token comes from prefill
        return steps / self.decode_s if steps > 0 and self.decode_s > 0 else 0.0


def _choose(logits: np.ndarray, temperature: float, top_k: int, rng: np.random.Generator) -> int:
    if temperature <= 0:
        return int(np.argmax(logits))
    scaled = logits.astype(np.float64) / temperature
    if top_k > 0:
        cutoff = np.partition(scaled, -top_k)[-top_k]
        scaled = np.where(scaled < cutoff, -np.inf, scaled)
    probabilities = np.exp(scaled - scaled.max())
    probabilities /= probabilities.sum()
    return int(rng.choice(len(probabilities), p=probabilities))


def generate(decoder: KVDecoder, prompt_ids: Sequence[int], new_tokens: int, *, use_cache: bool = True,
             temperature: float = 0.0, top_k: int = 0, seed: int = 0, stop_ids: Sequence[int] = (),
             on_token: Optional[Callable[[int], None]] = None, keep_logits: bool = False) -> Generation:
    """Greedy (temperature 0) or sampled decoding of one prompt; without the cache, every step re-reads the whole text."""
    rng = np.random.default_rng(seed)
    ids = np.array([list(prompt_ids)], dtype=np.int64)
    cache = decoder.bound_cache(len(prompt_ids) + new_tokens) if use_cache else None
    started = time.perf_counter()
    if cache is not None:
        logits = cache.step(prompt_ids)
    else:
        logits, _ = decoder.step(ids, np.ones_like(ids), decoder.empty_past(1))
    prefill_s = time.perf_counter() - started
    result = Generation([], prefill_s, 0.0)
    started = time.perf_counter()
    for step in range(new_tokens):
        last = logits[0, -1]
        if keep_logits:
            result.step_logits.append(last.copy())
        token = _choose(last, temperature, top_k, rng)
        result.tokens.append(token)
        if on_token is not None:
            on_token(token)
        if token in stop_ids or step == new_tokens - 1:
            break
        if cache is not None:
            logits = cache.step([token])
        else:
            ids = np.concatenate([ids, [[token]]], axis=1)
            logits, _ = decoder.step(ids, np.ones_like(ids), decoder.empty_past(1))
    result.decode_s = time.perf_counter() - started
    return result


def token_log_likelihood(decoder: KVDecoder, sequences: Sequence[np.ndarray],
                         on_sequence: Callable[[int, int], None] = lambda done, total: None) -> tuple[float, int]:
    """Summed log-probability of every next token of the sequences, and how many tokens were scored."""
    total, count = 0.0, 0
    for index, ids in enumerate(sequences, 1):
        total += next_token_log_likelihood(decoder.logits(ids[None, :].astype(np.int64))[0], ids)
        count += len(ids) - 1
        on_sequence(index, len(sequences))
    return total, count


def next_token_log_likelihood(logits: np.ndarray, ids: np.ndarray) -> float:
    """Summed log-probability of ids[1:] under the logits [sequence, vocab] of one sequence."""
    rows, targets = logits[:-1].astype(np.float32, copy=False), ids[1:]
    peak = rows.max(axis=1, keepdims=True)
    # log p(target) = (logit - peak) - log sum exp(logits - peak): the vocabulary-wide exp in float32 (numpy's
    # vectorized kernel, 2x faster), summed in float64 (1e-10 relative from an all-float64 computation)
    sums = np.exp(rows - peak).sum(axis=1, dtype=np.float64)
    chosen = rows[np.arange(len(targets)), targets].astype(np.float64) - peak[:, 0]
    return float((chosen - np.log(sums)).sum())


def perplexity(decoder: KVDecoder, sequences: Sequence[np.ndarray]) -> float:
    total, count = token_log_likelihood(decoder, sequences)
    return float(np.exp(-total / max(count, 1)))


