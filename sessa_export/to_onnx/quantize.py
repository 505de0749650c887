"""Quantize an ONNX export: int8 or int4 (block-wise weights, dynamic int8 activations) or fp16.

    sessa-export quantize OUT --mode int8|int4|fp16 [--block-size 32] [--keep NAME ...] -o OUT2

What each mode does to the export's linear layers (MatMul initializers `{module}.weight`, stored
[in, out]) and its embedding (Gather initializer `embed.weight`):

- int8 and int4: ONNX Runtime's `MatMulNBitsQuantizer` (round to nearest, asymmetric): weights
  8- or 4-bit in blocks of `block_size` values (default 32) along the input dimension of each
  output channel, every block with its own scale and zero point; linear layers become
  com.microsoft MatMulNBits, the embedding GatherBlockQuantized. accuracy_level 4: at run time
  the activations are quantized to int8 per block too (dynamic quantization) and ORT's CPU
  kernels multiply in integers, their fastest path. The MatMulNBits of one activation (a mixer's
  q/k/v/proj_fb/gamma_ctx) then become one over their weights side by side and a Split
  (`fuse_shared_input`): a decode step launches 4 fewer kernels a layer (125M int4, context 64:
  5.46 -> 4.9 ms/token).
  Why not `quantize_dynamic` for int8: its activation scale is one per tensor, so a prefill chunk
  shares one scale across all its tokens; on the bundled model that gave 98.0% top-1 agreement
  (< the 99% bar) against 99.2% for 8-bit blocks, at the same decode speed.
- fp16: our own conversion (onnx_ir): weights, activations and the state in float16, while the
  softmaxes and the feedback recurrence accumulate in float32: `LayerNormalization` (and `Gelu`,
  which ORT's CPU provider lacks in float16) run in float32 between Casts, the forward attention
  (the exporter's inlined CausalAttention) casts to float32 inside and its float32 outputs are
  cast back, the `ai.sessa.FeedbackAttention` function casts to float32 inside (spec §3-4),
  the feedback gain γ (gamma_ctx, + gamma_bias, tanh, × gamma_max) is computed in float32 and
  rounded to float16 only at FeedbackAttention's input (the op takes one type, §4), and the RoPE
  angles t·inv_freq and their cos/sin are computed in float32 (angles up to the context length
  do not fit float16; the fp32 source model computed them in float32). Logits and state come
  out in float16.

Every mode keeps the `ai.sessa.FeedbackAttention` nodes and their function (re-attached if a tool
dropped it), passes onnx.checker, and records in `sessa_config.json` the mode, block size, the
weights kept in full precision, and the sha256 and size of the source export.
"""

from __future__ import annotations

import shutil

import logging
from collections import Counter
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import onnx

from ..artifact import (MANIFEST_NAME, add_tokenizer, atomic_directory, check_replaceable, files_sha256, member,
                        quantization_record, read_manifest, write_manifest)
from ..errors import SessaExportError
from ..ops import feedback_attention as fa_op
from ..ops.mixer import GAIN
from ..quantization import keep_matches
from ..state import GROW
from ..tokenizer import recorded_tokenizer
from .genai import MANIFEST_KEYS as GENAI_FILES
from ..quantization import mode as quant_mode
from . import EXTERNAL_DATA_LIMIT, MODEL_NAME, ROLE_KEY, check_model

ACCURACY_LEVEL = 4  # MatMulNBits: int8 activations per block, integer products
TIED_REASON = "is tied to the LM head: kept in float32 (stored once) so the head keeps its precision"

# Ops that run in float32 inside a float16 model: the LayerNorm statistics and any softmax (the
# FeedbackAttention function and the forward attention do their own float32 accumulation); Gelu
# because ONNX Runtime's CPU provider has no float16 kernel for it (it would expand the function).
FP32_OPS = frozenset({"LayerNormalization", "Softmax", "LogSoftmax", "Gelu"})


def _is_forward_attention(node) -> bool:
    """The exporter's inlined CausalAttention: an If over Attention that casts its inputs to float32 and
    returns float32 (ops/causal_attention.py), so its outputs stay float32 until a consumer casts them."""
    return node.op_type == "If" and any(inner.op_type == "Attention" for inner in node.attributes["then_branch"].value)


def export_files(path: Path, manifest: dict) -> list[Path]:
    """The model file and its external data files, if any."""
    model_file = member(path, manifest, "model_file", MODEL_NAME, verify=False)  # sizes and hashes, no load
    return [model_file, *sorted(p for p in path.iterdir() if p.is_file() and p.name.startswith(model_file.name + "."))]


def export_size(path: Path, manifest: dict | None = None) -> int:
    """Bytes on disk of the model (graph + weights) of an export directory."""
    manifest = manifest if manifest is not None else read_manifest(path)
    return sum(f.stat().st_size for f in export_files(path, manifest))


# -- the weights a mode quantizes -----------------------------------------------------------------

class Weight:
    """A quantizable weight: the initializer of a MatMul (B input, [in, out]) or a Gather (table [rows, width])."""

    def __init__(self, name: str, node: onnx.NodeProto, dims: list[int]) -> None:
        self.name, self.node, self.dims = name, node, dims
        self.nodes = [node]  # every node that reads it (a module called twice)
        self.tied: list[str] = []  # linear weights that are this embedding table (to_onnx's tied Transpose)

    @property
    def names(self) -> list[str]:
        """Its name and the names of the linear weights tied to it (what --keep may call it)."""
        return [self.name, *self.tied]

    @property
    def module(self) -> str:
        return self.name.removesuffix(".weight")

    @property
    def kind(self) -> str:
        return "linear" if self.node.op_type == "MatMul" else "embedding"

    @property
    def input_width(self) -> int:
        """The dimension the int4 blocks run along: a linear layer's inputs, an embedding's width."""
        return self.dims[0] if self.kind == "linear" else self.dims[1]


def find_weights(model: onnx.ModelProto) -> list[Weight]:
    """The linear layers' and embeddings' float32 weights, in graph order, one entry per initializer."""
    inits = {i.name: i for i in model.graph.initializer}
    found: dict[str, Weight] = {}
    for node in model.graph.node:
        index = {"MatMul": 1, "Gather": 0}.get(node.op_type) if node.domain in ("", "ai.onnx") else None
        if index is None or len(node.input) <= index:
            continue
        init = inits.get(node.input[index])
        if init is None or init.data_type != onnx.TensorProto.FLOAT or len(init.dims) != 2:
            continue
        if init.name not in found:
            found[init.name] = Weight(init.name, node, list(init.dims))
        elif found[init.name].node.op_type == node.op_type:
            found[init.name].nodes.append(node)
    for node in model.graph.node:  # a head tied to an embedding reads the table through a Transpose
        table = found.get(node.input[0]) if node.op_type == "Transpose" and node.input else None
        if table is not None and table.kind == "embedding":
            table.tied.extend(node.output)
    return list(found.values())


def split_kept(weights: list[Weight], keep: Iterable[str]) -> tuple[list[Weight], list[Weight]]:
    """(weights to quantize, weights kept in full precision); an unmatched --keep name is an error."""
    keep = [k for k in keep if k.strip()]
    unmatched = [k for k in keep if not any(keep_matches(n, k) for w in weights for n in w.names)]
    if unmatched:
        modules = sorted({n.removesuffix(".weight") for w in weights for n in w.names})
        tops = sorted({".".join(m.split(".")[:depth]) for m in modules for depth in (1, 2)})
        raise SessaExportError(f"--keep {', '.join(unmatched)} matches no linear or embedding weight; "
                               f"names are module paths or prefixes such as {', '.join(tops[:12])}"
                               + (" ..." if len(tops) > 12 else ""))
    kept = [w for w in weights if any(keep_matches(n, k) for n in w.names for k in keep)]
    return [w for w in weights if w not in kept], kept


def _name_nodes(model: onnx.ModelProto) -> None:
    """Give every node a unique name: the ORT quantizers exclude nodes by name."""
    seen = Counter()
    for i, node in enumerate(model.graph.node):
        if not node.name or seen[node.name]:
            node.name = f"{node.op_type}_{i}"
        seen[node.name] += 1


# -- int8 and int4 with onnxruntime.quantization ----------------------------------------------------

def _quiet_ort_quantization() -> None:
    for name in ("onnxruntime.quantization", "onnxruntime.quantization.matmul_nbits_quantizer"):
        logging.getLogger(name).setLevel(logging.WARNING)


def quantize_nbits(model: onnx.ModelProto, quantize: list[Weight], bits: int, block_size: int) -> onnx.ModelProto:
    """Block-wise int8 or int4 weights with ORT's MatMulNBitsQuantizer (round to nearest, asymmetric).

    Linear layers become com.microsoft MatMulNBits, the embedding GatherBlockQuantized: each block of
    `block_size` values along the input dimension (the embedding's width) has its own float32 scale
    and zero point. accuracy_level 4 lets ORT's CPU kernels quantize the activations to int8 per
    block at run time and multiply in integers, its fastest path.
    """
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization.matmul_nbits_quantizer import (DefaultWeightOnlyQuantConfig,
                                                                 MatMulNBitsQuantizer)

    _quiet_ort_quantization()
    # ORT's quantizer packs embeddings in 4 bits only: 8-bit embeddings are packed here (same layout).
    gathers = [w for w in quantize if w.kind == "embedding"] if bits == 8 else []
    op_types = ("MatMul",) if bits == 8 else ("MatMul", "Gather")
    chosen = {n.name for w in quantize if w not in gathers for n in w.nodes}
    exclude = [n.name for n in model.graph.node if n.op_type in ("MatMul", "Gather") and n.name not in chosen]
    config = DefaultWeightOnlyQuantConfig(
        block_size=block_size, is_symmetric=False, accuracy_level=ACCURACY_LEVEL,
        quant_format=QuantFormat.QOperator, op_types_to_quantize=op_types,
        quant_axes=(("MatMul", 0), ("Gather", 1)), bits=bits)
    quantizer = MatMulNBitsQuantizer(model, nodes_to_exclude=exclude, algo_config=config)
    quantizer.process()
    model = quantizer.model.model
    for weight in gathers:
        _gather_block_quantized_8bit(model, weight, block_size)
    return model


NBITS_ATTRIBUTES = frozenset({"K", "N", "bits", "block_size", "accuracy_level"})  # what fuse_shared_input knows


def fuse_shared_input(model: onnx.ModelProto) -> int:
    """Make each set of MatMulNBits that read one activation with one layout (K, bits, block size,
    accuracy level) one MatMulNBits over their weights side by side, then a Split; return how many
    nodes it removed. A mixer's q/k/v/proj_fb/gamma_ctx then cost one kernel launch in a decode step,
    not five; each output column is computed from the same weights and activation blocks as before.
    """
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    graph_nodes = list(model.graph.node)
    attrs = [{a.name: onnx.helper.get_attribute_value(a) for a in node.attribute} for node in graph_nodes]
    groups: dict[tuple, list[int]] = {}  # (activation, layout) -> indices of its nodes
    for i, node in enumerate(graph_nodes):
        if (node.op_type == "MatMulNBits" and node.domain == "com.microsoft" and len(node.input) == 4
                and all(name in inits for name in node.input[1:]) and set(attrs[i]) <= NBITS_ATTRIBUTES):
            layout = tuple(sorted((k, v) for k, v in attrs[i].items() if k != "N"))
            groups.setdefault((node.input[0], layout), []).append(i)
    fused = {group[0]: group for group in groups.values() if len(group) > 1}
    if not fused:
        return 0
    removed = {i for group in fused.values() for i in group[1:]}
    nodes = []
    for i, node in enumerate(graph_nodes):
        if i in removed:
            continue
        if i not in fused:
            nodes.append(node)
            continue
        group = [graph_nodes[j] for j in fused[i]]
        sizes = [attrs[j]["N"] for j in fused[i]]
        name = "+".join(n.name for n in group)
        tensors = []
        for slot in (1, 2, 3):  # B [N, blocks, blob], scales and zero points ([N, ...] or flat N x ...)
            arrays = [numpy_helper.to_array(inits[n.input[slot]]) for n in group]
            stacked = np.concatenate([a.reshape(n, -1) for a, n in zip(arrays, sizes)])
            shape = (sum(sizes), *arrays[0].shape[1:]) if arrays[0].ndim > 1 else (-1,)
            tensors.append(numpy_helper.from_array(stacked.reshape(shape), "+".join(n.input[slot] for n in group)))
        model.graph.initializer.extend(tensors)
        joined = f"{node.output[0]}.fused"
        nodes.append(onnx.helper.make_node("MatMulNBits", [node.input[0], *(t.name for t in tensors)], [joined],
                                           name=name, domain="com.microsoft", **{**attrs[i], "N": sum(sizes)}))
        sizes_name = f"{name}.sizes"
        model.graph.initializer.append(numpy_helper.from_array(np.array(sizes, dtype=np.int64), sizes_name))
        nodes.append(onnx.helper.make_node("Split", [joined, sizes_name], [n.output[0] for n in group],
                                           name=f"{name}.split", axis=-1))
    replaced = {name for group in fused.values() for j in group for name in graph_nodes[j].input[1:]}
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    used = {name for node in model.graph.node for name in node.input}
    for init in [i for i in model.graph.initializer if i.name in replaced - used]:
        model.graph.initializer.remove(init)
    return len(removed)


def _gather_block_quantized_8bit(model: onnx.ModelProto, weight: Weight, block_size: int) -> None:
    """Replace Gather(table, ids) by com.microsoft GatherBlockQuantized with 8-bit blocks along the width."""
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    table = numpy_helper.to_array(inits[weight.name]).astype(np.float32)
    rows, width = table.shape
    blocks = table.reshape(rows, width // block_size, block_size)
    low, high = np.minimum(blocks.min(-1), 0.0), np.maximum(blocks.max(-1), 0.0)
    scale = ((high - low) / 255.0).astype(np.float32)
    scale[scale == 0] = 1.0  # an all-zero block
    zero = np.clip(np.round(-low / scale), 0, 255)
    data = np.clip(np.round(blocks / scale[..., None]) + zero[..., None], 0, 255).astype(np.uint8).reshape(rows, width)
    names = (f"{weight.name}_Q8", f"{weight.name}_scales", f"{weight.name}_zero_points")
    model.graph.initializer.extend([numpy_helper.from_array(data, names[0]), numpy_helper.from_array(scale, names[1]),
                                    numpy_helper.from_array(zero.astype(np.uint8), names[2])])
    for node in model.graph.node:
        if node.op_type == "Gather" and node.domain in ("", "ai.onnx") and node.input[0] == weight.name:
            axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
            replacement = onnx.helper.make_node(
                "GatherBlockQuantized", [names[0], node.input[1], names[1], names[2]], list(node.output),
                name=node.name, domain="com.microsoft", bits=8, block_size=block_size, gather_axis=axis,
                quantize_axis=1)
            node.CopyFrom(replacement)
    if not any(weight.name in n.input for n in model.graph.node):
        model.graph.initializer.remove(inits[weight.name])
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))


# -- fp16 ---------------------------------------------------------------------------------------------

def _gain_nodes(graph) -> set:
    """The nodes the exporter tagged as computing FeedbackAttention's gain γ (ops/mixer.py's GAIN)."""
    return {node for node in graph if node.metadata_props.get(ROLE_KEY) == GAIN}


def to_float16(model: onnx.ModelProto, keep: list[Weight]) -> onnx.ModelProto:
    """Weights, activations, logits and state in float16; float32 where precision needs it (module docstring)."""
    import onnx_ir as ir

    F32, F16 = ir.DataType.FLOAT, ir.DataType.FLOAT16
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    except (onnx.shape_inference.InferenceError, ValueError) as exc:
        raise SessaExportError(f"fp16: ONNX shape inference failed on the export ({str(exc).splitlines()[0]}); "
                               "re-run the export") from None
    irm = ir.serde.deserialize_model(inferred)
    graph = irm.graph
    kept_names = {w.name for w in keep}
    original = {}  # value -> dtype before conversion
    for node in graph:
        for v in (*node.inputs, *node.outputs):
            if v is not None:
                original[v] = v.dtype
    for v in graph.inputs:
        original[v] = v.dtype
    now = dict(original)  # value -> dtype after conversion so far

    def is_float(v) -> bool:
        return v is not None and original.get(v) == F32

    def set_dtype(v, dtype) -> None:
        now[v] = dtype
        v.dtype = dtype

    for v in graph.inputs:
        if is_float(v):
            set_dtype(v, F16)

    casts: dict[tuple, ir.Value] = {}

    def cast(v, dtype, before) -> ir.Value:
        key = (id(v), dtype)
        if key not in casts:
            node = ir.node("Cast", [v], attributes={"to": dtype}, name=f"{v.name}_to_{dtype.name.lower()}")
            node.outputs[0].name = f"{v.name}_{dtype.name.lower()}"
            node.outputs[0].dtype = dtype
            node.outputs[0].shape = v.shape
            graph.insert_before(before, node)
            now[node.outputs[0]] = dtype
            original[node.outputs[0]] = dtype
            casts[key] = node.outputs[0]
        return casts[key]

    converted: dict[str, ir.Value] = {}

    def half_initializer(v) -> ir.Value:
        """The float16 version of a float32 initializer (in place when nothing needs it in float32)."""
        if v.name in converted:
            return converted[v.name]
        array = v.const_value.numpy().astype(np.float16)
        if any(u in fp32_nodes for u, _ in v.uses()):
            new = ir.Value(name=f"{v.name}_fp16", type=ir.TensorType(F16), shape=v.shape,
                           const_value=ir.tensor(array, name=f"{v.name}_fp16"))
            graph.register_initializer(new)
        else:
            v.const_value = ir.tensor(array, name=v.name)
            new = v
        set_dtype(new, F16)
        original[new] = F16
        converted[v.name] = new
        return new

    gain = _gain_nodes(graph)
    positional: set = set()  # values derived only from positions (RoPE angles, cos, sin): float32
    fp32_nodes: set = set()
    nodes = list(graph)
    for node in nodes:
        floats = [v for v in node.inputs if is_float(v)]
        data = [v for v in floats if not v.is_initializer()]
        if node.op_type == "Cast" and any(a.name == "to" and a.value == F32 for a in node.attributes.values()) \
                and not any(is_float(v) for v in node.inputs):
            fp32_nodes.add(node)  # int positions -> float32 angles
            positional.update(node.outputs)
        elif node.op_type == "CastLike" and node.inputs[0] in positional:
            fp32_nodes.add(node)  # keep the angles float32 instead of casting them like the activations
            node.replace_input_with(1, node.inputs[0])
            positional.update(node.outputs)
        elif data and all(v in positional for v in data):
            fp32_nodes.add(node)
            positional.update(o for o in node.outputs if is_float(o))
        elif (node.op_type in FP32_OPS and node.domain in ("", "ai.onnx")) or _is_forward_attention(node) or node in gain \
                or any(v is not None and v.name in kept_names for v in node.inputs):
            fp32_nodes.add(node)

    for node in nodes:
        for index, v in enumerate(node.inputs):
            if not is_float(v):
                continue
            if node in fp32_nodes:
                if now[v] == F16:
                    node.replace_input_with(index, cast(v, F32, node))
            elif v.is_initializer():  # not a kept weight: every node that reads one is in fp32_nodes
                node.replace_input_with(index, half_initializer(v))
            elif now[v] == F32:
                node.replace_input_with(index, cast(v, F16, node))
        if node not in fp32_nodes:
            for out in node.outputs:
                if is_float(out):
                    set_dtype(out, F16)
            if node.op_type == "Cast":
                for attr in node.attributes.values():
                    if attr.name == "to" and attr.value == F32:
                        node.attributes["to"] = ir.AttrInt64("to", F16)

    for i, out in enumerate(list(graph.outputs)):
        if is_float(out) and now[out] == F32:
            name = out.name
            out.name = f"{name}_fp32"
            node = ir.node("Cast", [out], attributes={"to": F16}, name=f"{name}_to_float16")
            graph.append(node)
            new = node.outputs[0]
            new.name, new.dtype, new.shape = name, F16, out.shape
            graph.outputs[i] = new
    for name, v in list(graph.initializers.items()):
        if not v.uses() and not v.is_graph_output():
            graph.initializers.pop(name)
    # intermediate types were only needed here; let consumers infer them again
    for node in graph:
        for out in node.outputs:
            if not out.is_graph_output():
                out.type, out.shape = None, None
    return ir.serde.serialize_model(irm)


# -- the command ---------------------------------------------------------------------------------------

def _feedback_attention_nodes(model: onnx.ModelProto) -> int:
    """How many ai.sessa.FeedbackAttention nodes the main graph holds."""
    return sum(1 for n in model.graph.node if n.domain == fa_op.DOMAIN and n.op_type == fa_op.OP_TYPE)


def _ensure_function(model: onnx.ModelProto, expected_nodes: int) -> None:
    """The FeedbackAttention nodes and their ONNX function must survive; re-attach the function if dropped."""
    nodes = _feedback_attention_nodes(model)
    if nodes != expected_nodes:
        raise SessaExportError(f"internal error: quantization left {nodes} of {expected_nodes} "
                               f"{fa_op.DOMAIN}.{fa_op.OP_TYPE} nodes")
    if not any(f.domain == fa_op.DOMAIN and f.name == fa_op.OP_TYPE for f in model.functions):
        model.functions.append(fa_op.function_proto())
    if not any(o.domain == fa_op.DOMAIN for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(fa_op.DOMAIN, fa_op.VERSION))


def _load_source(src: Path, mode_name: str) -> tuple[dict, onnx.ModelProto]:
    if not src.exists():
        raise SessaExportError(f"not found: {src}")
    if not src.is_dir() or not (src / MANIFEST_NAME).is_file():
        raise SessaExportError(f"{src} is not an export directory (no {MANIFEST_NAME}); "
                               "quantize the OUT directory written by `sessa-export export`")
    manifest = read_manifest(src)
    if manifest["format"] != "onnx":
        raise SessaExportError(f"{src} is a {manifest['format']!r} artifact; quantize works on ONNX exports "
                               "(`sessa-export export`)")
    quant = manifest.get("quantization")
    if quant:
        raise SessaExportError(f"{src} is already quantized (mode {quant.get('mode', '?')}); quantize the float32 "
                               f"export it came from ({quant.get('source_export') or 'its source'}) instead")
    if mode_name == "fp16" and (manifest.get("state_contract") or {}).get("kind", GROW) != GROW:
        raise SessaExportError(f"{src} keeps its state in place: fp16 converts exports of the growing "
                               "contract only; export with --state grow to convert it")
    if manifest.get("dtype", "float32") != "float32":
        raise SessaExportError(f"{src} holds a {manifest['dtype']} model; quantize starts from a float32 export")
    state_dtype = (manifest.get("state_contract") or {}).get("dtype", "float32")
    if mode_name == "fp16" and state_dtype != "float32":
        raise SessaExportError(f"{src} stores its state in {state_dtype}; fp16 stores the state in float16 itself: "
                               "convert a float32-state export (export --state-dtype float32)")
    model_file = member(src, manifest, "model_file", MODEL_NAME)
    try:
        model = onnx.load(str(model_file))
    except Exception as exc:  # protobuf decode errors have many types
        raise SessaExportError(f"{model_file}: cannot read the ONNX model ({str(exc).splitlines()[0]}); "
                               "re-run the export") from None
    return manifest, model


def quantize_export(src: str | Path, out: str | Path, mode: str, block_size: int | None = None,
                    keep: Iterable[str] = (), progress: Callable[[str], None] = lambda _: None) -> dict:
    """Write OUT/model.onnx + OUT/sessa_config.json quantized from the export at `src`; return the manifest.

    Nothing is left at `out` on failure.
    """
    src, out = Path(src), Path(out)
    qmode = quant_mode(mode, "onnx", "mode")
    block = qmode.resolve_block_size(block_size)
    check_replaceable(out, inputs=(src,))
    keep = list(dict.fromkeys(k.strip() for k in keep if k and k.strip()))

    progress(f"reading {src}")
    manifest, model = _load_source(src, qmode.name)
    _name_nodes(model)
    weights = find_weights(model)
    if not weights:
        raise SessaExportError(f"{src}: no linear (MatMul) or embedding (Gather) weights to quantize")
    to_quantize, kept = split_kept(weights, keep)
    # A table tied to the LM head stays float32 under int8 / int4: stored once, read by the Gather and
    # (transposed) by the head, whose 8-bit form with int8 activations failed int8's top-1 bar on a tied model.
    tied = [w for w in to_quantize if w.tied] if qmode.blocks else []
    to_quantize = [w for w in to_quantize if w not in tied]
    if qmode.blocks and not to_quantize:
        raise SessaExportError(f"--keep {', '.join(keep)} keeps all {len(weights)} linear and embedding weights in "
                               f"full precision: {qmode.name} would quantize nothing; keep fewer")
    if qmode.blocks:
        bad = [w for w in to_quantize if w.input_width % block]
        if bad:
            listing = ", ".join(f"{w.name} (input width {w.input_width})" for w in bad[:6])
            more = f" and {len(bad) - 6} more" if len(bad) > 6 else ""
            raise SessaExportError(f"--block-size {block} does not divide the input width of {listing}{more}; "
                                   f"choose a block size that divides it, or --keep those layers")
    elif not any(_role(node) == GAIN for node in model.graph.node):
        raise SessaExportError(f"{src} was exported by an older sessa-export that did not tag the feedback gain; "
                               "re-run `sessa-export export` before converting to fp16")
    fa_nodes = _feedback_attention_nodes(model)
    files = export_files(src, manifest)
    source_size = sum(f.stat().st_size for f in files)
    source_sha = files_sha256(files)

    progress(f"{qmode.name}: {qmode.summary}" + (f", block {block}" if block else "") + f", {len(to_quantize)} weights")
    if qmode.blocks:
        qmodel = quantize_nbits(model, to_quantize, qmode.bits, block)
        fuse_shared_input(qmodel)
    else:
        qmodel = to_float16(model, kept)
    _ensure_function(qmodel, fa_nodes)
    still_float32 = {w.name for w in find_weights(qmodel)}
    qmodel.producer_name = model.producer_name
    qmodel.producer_version = model.producer_version

    record = dict(
        mode=qmode.name, bits=qmode.bits, block_size=block, keep=keep,
        kept_weights=[w.name for w in kept],
        quantized_weights=[w.name for w in to_quantize if w.name not in still_float32],
        # weights a mode leaves in float32 by design: fp16 computes the feedback gain in float32; int8 and
        # int4 keep an embedding table tied to the LM head
        float_weights=[w.name for w in to_quantize if w.name in still_float32] + [w.name for w in tied],
        method=(f"onnxruntime.quantization.matmul_nbits_quantizer.MatMulNBitsQuantizer(bits={qmode.bits}, "
                f"block_size={block}, asymmetric, round to nearest, accuracy_level={ACCURACY_LEVEL}); those of one "
                "activation fused (to_onnx.quantize.fuse_shared_input)"
                + "".join(f"; {w.name} {TIED_REASON}" for w in tied)
                if qmode.blocks else
                "sessa_export.to_onnx.quantize.to_float16 (float32 softmax, LayerNorm, Gelu, gain, RoPE angles, "
                "feedback recurrence; the gain's weights stay float32)"),
        source_export=str(src.resolve()), source_sha256=source_sha, source_size_bytes=source_size)
    dropped = {"files", "ort_model_file", "ort_operators_config",  # new files are recorded; the .ort and mobile
               "mobile_decode_file", "mobile_prefill_file", "mobile_weights_file", "mobile"}  # models are not rewritten
    new_manifest = {**{k: v for k, v in manifest.items() if k not in dropped},
                    "dtype": "float16" if qmode.name == "fp16" else manifest.get("dtype", "float32"),
                    "model_file": MODEL_NAME}
    if qmode.name == "fp16" and manifest.get("state_contract"):
        new_manifest["state_contract"] = {**manifest["state_contract"], "dtype": "float16"}
    with atomic_directory(out, inputs=(src,)) as tmp:
        size = qmodel.ByteSize()
        progress(f"saving {size / 2**20:.1f} MiB")
        model_path = tmp / MODEL_NAME
        if size > EXTERNAL_DATA_LIMIT:
            onnx.save(qmodel, str(model_path), save_as_external_data=True, all_tensors_to_one_file=True,
                      location=MODEL_NAME + ".data")
        else:
            onnx.save(qmodel, str(model_path))
        check_model(model_path, progress)
        new_manifest["quantization"] = quantization_record(**record, size_bytes=export_size(tmp, new_manifest))
        for key in GENAI_FILES:  # GenAI's config and tokenizer config name tensors and shapes, not weights
            if manifest.get(key):
                shutil.copyfile(member(src, manifest, key, manifest[key]), tmp / manifest[key])
        new_manifest = write_manifest(tmp, add_tokenizer(tmp, new_manifest, recorded_tokenizer(src, manifest)))
        progress("loading in ONNX Runtime")
        _smoke_test(tmp)
    return new_manifest


def left_in_float(quant: dict) -> str:
    """What quantize left in float32 by itself (the record's float_weights), for its one-line summary."""
    names = quant["float_weights"]
    if not names:
        return ""
    why = ("the feedback gain, computed in float32" if quant["mode"] == "fp16"
           else "tied to the LM head: the head keeps float32 precision, the table is stored once")
    return f"; left in float32: {', '.join(names)} ({why})"


def _role(node: onnx.NodeProto) -> str | None:
    """The role the exporter tagged a node with (to_onnx.ROLE_KEY), or None."""
    return next((p.value for p in node.metadata_props if p.key == ROLE_KEY), None)


def _smoke_test(path: Path) -> None:
    """One step of two tokens through ONNX Runtime: the saved model loads and runs."""
    from ..runtime.ort_runner import OrtRunner

    runner = OrtRunner(path)
    kind = runner.manifest["input"]["kind"]
    if kind == "tokens":
        feed = np.zeros((1, 2), dtype=np.int64)
    else:
        feed = np.zeros((1, 2, runner.manifest["input"]["width"]), dtype=np.float32)
    logits, _ = runner.step(feed, runner.empty_state(1))
    if not np.all(np.isfinite(logits)):
        raise SessaExportError("internal error: the quantized model gives non-finite outputs")


def linear_weight_bytes(path: Path) -> int:
    """Bytes of the initializers that hold the linear and embedding weights (quantized or not)."""
    manifest = read_manifest(path)
    model = onnx.load(str(member(path, manifest, "model_file", MODEL_NAME)))
    quant = manifest.get("quantization") or {}
    if quant:
        names = [n for key in ("quantized_weights", "kept_weights", "float_weights") for n in quant.get(key, [])]
    else:
        names = [w.name for w in find_weights(model)]
    total = 0
    for init in model.graph.initializer:
        if any(init.name == n or init.name.startswith(n + "_") for n in names):
            total += onnx.numpy_helper.to_array(init).nbytes if not init.raw_data else len(init.raw_data)
    return total


__all__ = ["quantize_export", "to_float16", "find_weights", "export_size", "left_in_float",
           "linear_weight_bytes"]
