"""The fused decoder graph of onnxruntime-genai's model builder, in FP32, for our own 4-bit quantization.

Profiled on SmolLM2-135M (one decode step, 2 threads, ONNX Runtime 1.32, README "Small LLMs"): our
TorchScript export runs ~3,300 nodes per step after ONNX Runtime's optimizations (per-layer shape
arithmetic, rotary embeddings and the causal mask as Gather/Unsqueeze/Concat/Slice chains, unfused
RMSNorm), so per-node overhead, not the 4-bit MatMuls, is most of a token's time. The builder writes
the graph onnxruntime-genai runs: 342 nodes, GroupQueryAttention with rotary embeddings inside,
SkipSimplifiedLayerNormalization, fused QKV. Built at FP32 (`-p fp32`), its MatMuls keep the
checkpoint's weights, so engines/cpu/weight_only.py quantizes them exactly as it does our export
(the GGUF grid's float-offset blocks), and the build's parity stage compares the result with the
unfused FP32 export.

The graph has no position_ids input (GroupQueryAttention derives positions from the mask) and a
symbolic head size in its past/present shapes, which is fixed here to the model's (as our export has it).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from engines.onnx_io import save_model
from pipeline.core.errors import EngineError

def fused_fp32_graph(hf_folder: Path, target: Path) -> dict[str, Any]:
    """Run the builder on a Hugging Face folder (FP32 weights, CPU) and write its graph as one file at
    `target`; returns the graph's op counts. An architecture the builder does not know is an EngineError."""
    with tempfile.TemporaryDirectory(prefix="quantpipe-genai-", dir=target.parent) as scratch:
        built = Path(scratch) / "built"
        _run_builder(hf_folder, built, Path(scratch) / "cache")
        model = onnx.load(str(built / "model.onnx"))  # its weights sit in model.onnx.data beside it
        head_size = int(json.loads((built / "genai_config.json").read_text(encoding="utf-8"))
                        ["model"]["decoder"]["head_size"])
    # Its value_info annotations disagree with ONNX shape inference (a rank-1 Constant declared a scalar): drop them.
    del model.graph.value_info[:]
    fixed_head_size(model, head_size)
    constant_embedding(model)
    standard_rms_norms(model)
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    save_model(model, target)
    return {"nodes": len(model.graph.node), "op_types": dict(sorted(counts.items()))}


def _run_builder(hf_folder: Path, built: Path, cache: Path) -> None:
    """The builder's own command (`python -m onnxruntime_genai.models.builder -p fp32 -e cpu`), called in this
    process: as a subprocess it re-imported torch and transformers every time (about 10 s of a 12 s call on a
    tiny model). Its prints go to a buffer (they would corrupt `--json` output) and the root logger is restored
    (importing it can install a handler there); a failure is one EngineError line."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
            from onnxruntime_genai.models import builder

            options = builder.parse_extra_options(None, str(hf_folder), str(built), "fp32", "cpu", str(cache), [])
            builder.create_model(None, str(hf_folder), str(built), "fp32", "cpu", str(cache), **options)
    except (Exception, SystemExit) as error:
        lines = [line for line in [*printed.getvalue().splitlines(), str(error)] if line.strip()]
        raise EngineError(f"onnxruntime-genai's model builder failed on {hf_folder.name}: "
                          f"{lines[-1].strip() if lines else type(error).__name__}") from None
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    if not (built / "model.onnx").is_file():
        raise EngineError(f"onnxruntime-genai's model builder wrote no model.onnx for {hf_folder.name}")


def constant_embedding(model: onnx.ModelProto) -> int:
    """With tied embeddings the builder gathers tokens from a Transpose of the lm_head weight; give the Gather
    its own transposed table instead, so the weight-only quantizer sees a constant embedding (GatherBlockQuantized)
    and the FP32 lm_head weight is not kept beside the quantized one. Returns the Gathers rewired."""
    constants = {tensor.name: tensor for tensor in model.graph.initializer}
    producers = {output: node for node in model.graph.node for output in node.output}
    rewired, dropped = 0, []
    for node in model.graph.node:
        source = producers.get(node.input[0]) if node.op_type == "Gather" else None
        if source is None or source.op_type != "Transpose" or source.input[0] not in constants:
            continue
        table = numpy_helper.to_array(constants[source.input[0]]).T.copy()
        name = f"{source.input[0]}_transposed"
        model.graph.initializer.append(numpy_helper.from_array(table, name))
        node.input[0] = name
        dropped.append(source)
        rewired += 1
    used = {name for node in model.graph.node for name in node.input}
    for source in dropped:
        if source.output[0] not in used:
            model.graph.node.remove(source)
    return rewired


def fixed_head_size(model: onnx.ModelProto, head_size: int) -> None:
    """The builder declares past/present as [batch, kv_heads, sequence, "kv_cache_dim"]: give the last axis
    its size, as our export does (loaders read the cache layout from the graph's inputs)."""
    for value in [*model.graph.input, *model.graph.output]:
        if value.name.startswith(("past_key_values.", "present.")):
            dims = value.type.tensor_type.shape.dim
            if len(dims) == 4 and not dims[3].dim_value:
                dims[3].ClearField("dim_param")
                dims[3].dim_value = head_size


def standard_rms_norms(model: onnx.ModelProto) -> int:
    """The builder writes the first layer's RMSNorm as SimplifiedLayerNormalization in the default domain, an
    ONNX Runtime kernel the ONNX checker does not know: spell it in standard ops (Pow, ReduceMean, Add, Sqrt,
    Div, Mul), which ONNX Runtime's SimplifiedLayerNormFusion fuses back at load. Returns the nodes replaced."""
    nodes, replaced = [], 0
    for node in model.graph.node:
        if node.op_type != "SimplifiedLayerNormalization" or node.domain not in ("", "ai.onnx"):
            nodes.append(node)
            continue
        attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if int(attributes.get("axis", -1)) != -1:
            raise EngineError(f"{node.name}: SimplifiedLayerNormalization over axis {attributes['axis']}")
        base = node.name or f"rms_norm_{replaced}"
        constants = {f"{base}/two": np.array(2.0, np.float32), f"{base}/axes": np.array([-1], np.int64),
                     f"{base}/epsilon": np.array(float(attributes.get("epsilon", 1e-5)), np.float32)}
        model.graph.initializer.extend(numpy_helper.from_array(value, name) for name, value in constants.items())
        x, scale = node.input[0], node.input[1]
        nodes += [
            helper.make_node("Pow", [x, f"{base}/two"], [f"{base}/squared"], name=f"{base}/Pow"),
            helper.make_node("ReduceMean", [f"{base}/squared", f"{base}/axes"], [f"{base}/mean"], name=f"{base}/ReduceMean",
                             keepdims=1),
            helper.make_node("Add", [f"{base}/mean", f"{base}/epsilon"], [f"{base}/shifted"], name=f"{base}/Add"),
            helper.make_node("Sqrt", [f"{base}/shifted"], [f"{base}/rms"], name=f"{base}/Sqrt"),
            helper.make_node("Div", [x, f"{base}/rms"], [f"{base}/normalized"], name=f"{base}/Div"),
            helper.make_node("Mul", [f"{base}/normalized", scale], [node.output[0]], name=f"{base}/Mul"),
        ]
        replaced += 1
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return replaced
