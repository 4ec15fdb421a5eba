"""Weight-only quantization of decoder LLMs on the CPU (MatMulNBits / GatherBlockQuantized).

- rtn (4 or 8 bits): ONNX Runtime's own `MatMulNBitsQuantizer` (round-to-nearest, block-wise), except
  4-bit asymmetric blocks with float zero points (the default): engines/cpu/block_offset.py, min-max blocks
  whose minimum is kept as a float (GGUF Q4_1's grid), which ONNX Runtime's quantizer cannot write.
- gptq / awq (4 bits): Intel Neural Compressor's ONNX algorithms (onnx-neural-compressor 1.0), calibrated
  on real text; they emit MatMulNBits only at 4 bits (other widths would be de-quantized FP32 weights).
- checkpoint (4 bits): a pre-quantized GPTQ/AWQ checkpoint's own codes, scales and zero points
  (engines/cpu/prequantized.py): nothing in the body is rounded again.
- lm_head and the token embedding have their own policy (fp32, int8 or int4) and their own block size: with
  tied embeddings the two vocabulary-sized matrices are a third of the FP32 file, so leaving them in FP32 caps
  the size reduction, while the lm_head is the MatMul whose error reaches the logits most directly. An 8-bit
  embedding tied to an 8-bit lm_head reads the lm_head's codes (engines/cpu/vocabulary.py).
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any, Literal, Optional, Sequence

import onnx

from engines.cpu.block_offset import replace_matmuls
from engines.cpu.neural_compressor import name_all_nodes
from engines.cpu.sibling_fusion import fuse_sibling_matmulnbits
from engines.cpu.vocabulary import quantize_embedding_int8, quantize_lm_head_int8, tied_to_lm_head
from engines.onnx_io import save_model
from pipeline.core.errors import EngineError, InputError

Algorithm = Literal["rtn", "gptq", "awq", "checkpoint"]
ZeroPoint = Literal["int", "float"]
Precision = Literal["fp32", "int8", "int4"]
# Blocks of the lm_head and the embedding. SmolLM2, 8-bit lm_head and embedding sharing codes, AVX-512 VNNI, 2
# threads, 54 held-out chunks (docs/float-offsets.md): block 32 +0.08% perplexity, block 64 +0.40% and decode
# 1.13x block 32's (the 8-bit kernel's per-block work; the lm_head is a tenth of a decode step).
VOCAB_BLOCK_SIZE = 64
# MatMulNBits accuracy_level 4: int8 activations in the kernel. Measured on 2 cores with the default
# float-offset blocks (README): decode 2.2x FP32 at level 4, 0.36x at level 0 (the 8-bit lm_head then
# de-quantizes per call); perplexity +0.23% at level 4, +0.15% at level 0.
ACCURACY_LEVEL = 4


def _initializers(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {tensor.name: tensor for tensor in model.graph.initializer}


def find_lm_head(model: onnx.ModelProto, logits: str = "logits") -> str:
    """The MatMul with a constant weight that produces the logits (possibly through a reshape)."""
    producers = {output: node for node in model.graph.node for output in node.output}
    constants = _initializers(model)
    node = producers.get(logits)
    while node is not None:
        if node.op_type == "MatMul" and any(name in constants for name in node.input):
            return node.name
        node = producers.get(node.input[0])
    raise InputError("no MatMul with a constant weight produces 'logits'; is this a causal LM export?")


def find_embeddings(model: onnx.ModelProto) -> list[str]:
    """Gathers of a constant 2-D table by input_ids: the token embedding."""
    constants = _initializers(model)
    return [node.name for node in model.graph.node
            if node.op_type == "Gather" and node.input[0] in constants and len(constants[node.input[0]].dims) == 2]


def _ort_quantize(model: onnx.ModelProto, bits: int, block_size: int, symmetric: bool,
                  include: Optional[Sequence[str]], exclude: Sequence[str], op_types: tuple[str, ...]) -> onnx.ModelProto:
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    config = DefaultWeightOnlyQuantConfig(
        block_size=block_size, is_symmetric=symmetric, bits=bits, op_types_to_quantize=op_types,
        accuracy_level=ACCURACY_LEVEL,
        quant_axes=(("MatMul", 0), ("Gather", 1)),
    )
    excluded = list(exclude)
    if include is not None:  # its nodes_to_include adds to op_types_to_quantize, it does not restrict them
        excluded += [node.name for node in model.graph.node if node.op_type in op_types and node.name not in include]
    quantizer = MatMulNBitsQuantizer(model, nodes_to_exclude=excluded, nodes_to_include=list(include) if include else None,
                                     algo_config=config)
    # It logs an ERROR for every non-constant Gather it is offered and cannot quantize (the shape Gathers).
    logging.getLogger("onnxruntime.quantization").setLevel(logging.CRITICAL)
    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.CRITICAL)
    quantizer.process()
    return quantizer.model.model


def _inc_quantize(fp32: Path, algorithm: Algorithm, block_size: int, symmetric: bool, exclude: Sequence[str],
                  reader: Any) -> onnx.ModelProto:
    import onnx_neural_compressor.logger  # noqa: F401  (its import sets INFO)
    from onnx_neural_compressor.quantization import algorithm_entry, config

    logging.getLogger("onnx_neural_compressor").setLevel(logging.WARNING)
    common = dict(weight_bits=4, weight_group_size=block_size, weight_sym=symmetric, quant_last_matmul=False,
                  accuracy_level=ACCURACY_LEVEL)
    if algorithm == "gptq":
        quant_config = config.GPTQConfig(**common)
        entry = algorithm_entry.gptq_quantize_entry
    else:
        quant_config = config.AWQConfig(**common)
        entry = algorithm_entry.awq_quantize_entry
    for name in exclude:  # set_local takes one operator name at a time
        quant_config.set_local(name, type(quant_config)(weight_dtype="fp32"))
    # Its graph info is keyed by node name: the unnamed Constants of onnx's version converter would collide
    # and be dropped (their outputs then dangle), so name every node first.
    with tempfile.TemporaryDirectory(prefix="quantpipe-inc-") as scratch:
        named = onnx.load(str(fp32))
        name_all_nodes(named)
        prepared = Path(scratch) / "named.onnx"
        save_model(named, prepared)
        del named
        result = entry(str(prepared), quant_config, reader)
        quantized = result.model if hasattr(result, "model") else result
        restore_dropped_constants(quantized, onnx.load(str(prepared), load_external_data=False))
    return quantized


def restore_dropped_constants(model: onnx.ModelProto, original: onnx.ModelProto) -> int:
    """Neural Compressor's weight-only algorithms (RTN, GPTQ, AWQ alike) drop a few Constant nodes (their
    consumers' inputs then dangle; 8 on the SmolLM2 export, even with every node named): put them back."""
    available = ({o for n in model.graph.node for o in n.output} | {i.name for i in model.graph.input}
                 | {i.name for i in model.graph.initializer})
    missing = {name for node in model.graph.node for name in node.input if name and name not in available}
    producers = {o: n for n in original.graph.node for o in n.output}
    lost = [name for name in missing if name not in producers or producers[name].op_type != "Constant"]
    if lost:
        raise EngineError(f"the quantized graph lost the producers of {', '.join(sorted(lost)[:3])}")
    for position, name in enumerate(sorted(missing)):
        model.graph.node.insert(position, producers[name])
    return len(missing)


def uses_float_offsets(algorithm: Algorithm, bits: int, symmetric: bool, zero_point: ZeroPoint) -> bool:
    """Float zero points exist for 4-bit asymmetric RTN only: Neural Compressor's GPTQ/AWQ and ONNX Runtime's
    8-bit quantizer write integer zero points."""
    return algorithm == "rtn" and bits == 4 and not symmetric and zero_point == "float"


def _rtn_float_offsets(model: onnx.ModelProto, block_size: int, keep: Sequence[str],
                       counts: dict[str, int]) -> onnx.ModelProto:
    constants = _initializers(model)
    body = {node.name for node in model.graph.node if node.op_type == "MatMul" and node.name not in keep
            and len(node.input) == 2 and node.input[1] in constants}
    replaced = set(replace_matmuls(model, body, block_size, ACCURACY_LEVEL, counts))
    rest = sorted(body - replaced)  # K not a multiple of the block: ONNX Runtime's integer zero points
    return _ort_quantize(model, 4, block_size, False, rest, [], ("MatMul",)) if rest else model


def quantize_weight_only(fp32: Path, target: Path, algorithm: Algorithm, bits: int, block_size: int,
                         symmetric: bool, lm_head: Precision, embeddings: Precision, reader: Any = None,
                         exclude: Sequence[str] = (), zero_point: ZeroPoint = "int",
                         checkpoint: Sequence[Any] = (), vocab_block_size: int = VOCAB_BLOCK_SIZE) -> dict[str, Any]:
    """Quantize the MatMul weights of the body with `algorithm`, then lm_head and embeddings by their policy."""
    if algorithm != "rtn" and bits != 4:
        raise InputError(f"{algorithm} is 4-bit only here (Neural Compressor emits MatMulNBits only at 4 bits); "
                         "use --quant rtn for 8-bit weights")
    original = onnx.load(str(fp32))
    head = find_lm_head(original)
    head_output = next(node.output[0] for node in original.graph.node if node.name == head)
    embedding_nodes = find_embeddings(original)
    tied = len(embedding_nodes) == 1 and tied_to_lm_head(original, embedding_nodes[0], head)
    keep = [head, *exclude]
    float_offsets = uses_float_offsets(algorithm, bits, symmetric, zero_point)
    grid: dict[str, int] = {}
    if algorithm == "checkpoint":
        from engines.cpu.prequantized import replace_with_checkpoint

        if not checkpoint:
            raise InputError("--quant checkpoint needs the checkpoint's quantized Linears")
        grid = replace_with_checkpoint(original, list(checkpoint), set(keep), ACCURACY_LEVEL)
        block_size = min(linear.group_size for linear in checkpoint)
        model = original
    elif float_offsets:
        model = _rtn_float_offsets(original, block_size, keep, grid)
    elif algorithm == "rtn":
        model = _ort_quantize(original, bits, block_size, symmetric, None, keep, ("MatMul",))
    else:
        if reader is None:
            raise InputError(f"{algorithm} needs calibration data")
        model = _inc_quantize(fp32, algorithm, block_size, symmetric, keep, reader)
    # Symmetric blocks for the vocabulary matrices whatever the body uses: GGUF stores them as Q8_0
    # (symmetric), and ONNX Runtime's asymmetric blocks would force 0 into each range.
    if lm_head == "int8":
        quantize_lm_head_int8(model, head, vocab_block_size, ACCURACY_LEVEL)
    elif lm_head == "int4":
        model = _ort_quantize(model, 4, vocab_block_size, True, [head], [], ("MatMul",))
    shared = False
    if embeddings == "int8":
        for name in embedding_nodes:
            shared |= quantize_embedding_int8(model, name, vocab_block_size, head_output if tied else None)
    elif embeddings == "int4" and embedding_nodes:
        model = _ort_quantize(model, 4, vocab_block_size, True, embedding_nodes, [], ("Gather",))
    siblings_fused = fuse_sibling_matmulnbits(model)
    with tempfile.TemporaryDirectory(prefix="quantpipe-woq-", dir=target.parent) as scratch:
        staged = Path(scratch) / target.name
        save_model(model, staged)
        staged.replace(target)
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    extra: dict[str, Any] = {}
    if algorithm == "checkpoint":
        # Blocks of the body's MatMulNBits that did not come from the checkpoint (rounded here): 0 when exact.
        body = sum(_attribute(node, "N") * -(-_attribute(node, "K") // _attribute(node, "block_size"))
                   for node in model.graph.node if node.op_type == "MatMulNBits" and not node.name.startswith(head))
        extra = {**grid, "rerounded_blocks": body - grid["checkpoint_blocks"]}
    return {
        "algorithm": algorithm,
        "bits": bits,
        "block_size": block_size,
        "symmetric": symmetric,
        "zero_point": "none" if symmetric else ("float" if float_offsets else "int"),
        "lm_head": lm_head,
        "embeddings": embeddings,
        "vocab_block_size": vocab_block_size,
        "tied_embeddings": tied,
        "shared_vocabulary": shared,  # the 8-bit embedding reads the lm_head's codes
        "sibling_nodes_fused": siblings_fused,  # MatMulNBits stacked with a sibling of the same input
        "lm_head_node": head,
        # Float-offset RTN: blocks whose values were already on a 4-bit grid (de-quantized Q4_0/Q4_1/Q4_K)
        # and were kept on it exactly, of all the body's blocks (engines/cpu/block_offset.py).
        "source_grid_blocks": grid.get("source_grid_blocks", 0),
        "body_blocks": grid.get("blocks", 0),
        "accuracy_level": ACCURACY_LEVEL,
        "quantized_ops": {op: counts.get(op, 0) for op in ("MatMulNBits", "GatherBlockQuantized", "MatMul", "Gather")},
        **extra,
    }


def _attribute(node: onnx.NodeProto, name: str) -> int:
    return next(int(attribute.i) for attribute in node.attribute if attribute.name == name)
