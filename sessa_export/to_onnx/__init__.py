"""ONNX back end: lower a StepGraph to one ONNX model with the `ai.sessa.FeedbackAttention` op.

Standard ops where ONNX has them (opset 23: LayerNormalization, Gelu, RotaryEmbedding with
interleaved = 1, Attention with past key/value and grouped heads, in causal blocks of query rows
written by ops/causal_attention.py and inlined here); the feedback recurrence is one
`ai.sessa.FeedbackAttention` node per layer whose function body ships in the model, so stock
ONNX Runtime runs it with nothing registered.

`OnnxBuilder` walks the graph: each node is emitted by its op's `onnx` face (ops/registry.py);
what only ONNX has is here: the state inputs and outputs of the state contract (sessa_export/
state.py), the per-step positions, and the two attentions.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import onnx
import onnx_ir as ir
import torch
from onnx_ir.passes.common import InlinePass

from .. import __version__
from ..artifact import add_tokenizer, atomic_directory, check_replaceable, new_manifest, write_manifest
from ..errors import SessaExportError
from ..model import SessaMixer
from ..ops import causal_attention as causal_op
from ..ops import causal_attention_cache as causal_cache_op
from ..ops import feedback_attention as fa_op
from ..ops import feedback_attention_cache as fa_cache_op
from ..ops.op import Applied
from ..ops.registry import OPS
from ..state import ATTENTION_MASK, BATCH, FIELDS, GENAI, GROW, PAST_LENGTH, StateLayout
from ..stepgraph import StepGraph, feature_widths
from ..tokenizer import MANIFEST_KEY as TOKENIZER_KEY
from .genai import write_genai_files
from .ort_format import write_ort_format

OPSET = 23
INPLACE_OPSET = 24  # TensorScatter writes the in-place contract's caches
IR_VERSION = 10
MODEL_NAME = "model.onnx"
EXTERNAL_DATA_LIMIT = 2 * 1024**3  # protobuf cannot hold more in one file
ROLE_KEY = "sessa.role"  # node metadata: what a node computes (ops/mixer.py's GAIN), for the quantizers


class OnnxBuilder:
    """Emits ONNX nodes for one StepGraph on an onnx_ir tape: a walker over the op table."""

    def __init__(self, graph: StepGraph, contract: str = GROW, state_dtype: str = "float32") -> None:
        self.graph = graph
        self.layout = StateLayout.from_mixers(graph.mixers, contract, state_dtype)
        self.state_type = ir.DataType(self.layout.precision.onnx_type)
        self.tape = ir.tape.Tape()
        self.values: dict[str, ir.Value] = {}
        self.inputs: list[ir.Value] = []
        self.outputs: list[ir.Value] = []
        self.cache: dict[str, ir.Value] = {}
        self.widths = feature_widths(graph)
        # embedding tables by the identity of their Parameter: a linear layer sharing one is tied to it
        self.tied = {id(n.module.weight): f"{n.path}.weight" for n in graph.nodes if n.op == "embedding"}

    # -- the builders' shared vocabulary (ops/op.py's Builder) -----------------------------------
    def const(self, array: np.ndarray | torch.Tensor, name: str) -> ir.Value:
        """An initializer (weights) or a small constant, named once."""
        if name not in self.cache:
            if isinstance(array, torch.Tensor):
                array = array.detach().cpu().contiguous().numpy()
            self.cache[name] = self.tape.initializer(ir.tensor(np.ascontiguousarray(array), name=name), name=name)
        return self.cache[name]

    def operand(self, value: ir.Value | float) -> ir.Value:
        """A value, or a Python number as a float32 constant."""
        if isinstance(value, ir.Value):
            return value
        return self.const(np.array(value, dtype=np.float32), f"scalar.{value!r}")

    def op(self, op_type: str, inputs: list, **attrs) -> ir.Value:
        return self.tape.op(op_type, inputs, attributes=attrs or None)

    def apply(self, name: str, *inputs, **attrs):
        return OPS[name].onnx(self, Applied(attrs), *inputs)

    def linear(self, x: ir.Value, module: torch.nn.Linear, path: str) -> ir.Value:
        """x @ W^T + b, with W stored transposed ([in, out]) as MatMul quantizers expect; a weight tied
        to an embedding table (tie_embeddings) is that table, stored once, through a Transpose named
        `{path}.weight`."""
        table = self.tied.get(id(module.weight))
        if table is not None:
            weight = self.op("Transpose", [self.const(module.weight, table)], perm=[1, 0])
            weight.name = f"{path}.weight"
        else:
            weight = self.const(module.weight.T, f"{path}.weight")
        y = self.op("MatMul", [x, weight])
        if module.bias is not None:
            y = self.op("Add", [y, self.const(module.bias, f"{path}.bias")])
        return y

    def linears(self, x: ir.Value, layers: Sequence[tuple[torch.nn.Linear, str]]) -> tuple[ir.Value, ...]:
        """One MatMul per layer: each weight keeps its own initializer, which quantize and --keep name."""
        return tuple(self.linear(x, module, path) for module, path in layers)

    def split(self, x: ir.Value, sizes: Sequence[int]) -> tuple[ir.Value, ...]:
        return tuple(self.tape.op_multi_out("Split", [x, self.const(np.array(sizes), f"sizes.{list(sizes)}")],
                                            attributes={"axis": -1}, num_outputs=len(sizes)))

    @contextmanager
    def role(self, name: str):
        """Tag the nodes emitted inside with `sessa.role = name` (node metadata)."""
        start = len(self.tape.nodes)
        yield
        for node in self.tape.nodes[start:]:
            node.metadata_props[ROLE_KEY] = name

    # -- what only ONNX has: per-step positions, the attentions over growing state ----------------
    def positions(self) -> dict[str, ir.Value]:
        """Shared per-step values: positions P..P+S-1, P + S, and [batch, sequence]."""
        if "positions" not in self.cache:
            if self.layout.contract != GROW:
                past = self.op("Reshape", [self.past_length, self.const(np.array([1]), "shape1")])
            else:
                past = self.op("Shape", [self.past[0]["feedback_key"]], start=1, end=2)
            new = self.op("Shape", [self.data_input], start=1, end=2)
            total = self.op("Add", [past, new])
            one = self.const(np.array(1, dtype=np.int64), "one")
            positions = self.op("Range", [self.op("Squeeze", [past]), self.op("Squeeze", [total]), one])
            batch_seq = self.op("Shape", [self.data_input], start=0, end=2)
            self.cache.update(positions=positions, total=total, batch_seq=batch_seq)
        return self.cache

    def visible(self) -> ir.Value:
        """The growing contract's causal mask [S, P+S]: key j is visible to the row at position t when j <= t."""
        if "visible" not in self.cache:
            p = self.positions()
            keys = self.op("Range", [self.const(np.array(0, dtype=np.int64), "zero"),
                                     self.op("Squeeze", [p["total"]]), self.const(np.array(1, dtype=np.int64), "one")])
            self.cache["visible"] = self.op("LessOrEqual", [
                self.op("Unsqueeze", [keys, self.const(np.array([0]), "axis0")]),
                self.op("Unsqueeze", [p["positions"], self.const(np.array([1]), "axis1")])])
        return self.cache["visible"]

    def rope_tables(self, head_dim: int, inv_freq: torch.Tensor, like: ir.Value) -> tuple[ir.Value, ir.Value]:
        """cos and sin [B, S, d/2] of θ = t·inv_freq (float32, then the activation dtype, as the reference)."""
        key = f"rope{head_dim}"
        if key not in self.cache:
            p = self.positions()
            theta = self.op("Mul", [self.op("Unsqueeze", [self.op("Cast", [p["positions"]], to=ir.DataType.FLOAT),
                                                          self.const(np.array([1]), "axis1")]),
                                    self.const(inv_freq.float()[None, :], f"rope_inv_freq.{head_dim}")])
            theta = self.op("CastLike", [theta, like])
            shape = self.op("Concat", [p["batch_seq"], self.const(np.array([head_dim // 2]), f"half_dim.{head_dim}")], axis=0)
            self.cache[key] = (self.op("Expand", [self.op("Cos", [theta]), shape]),
                               self.op("Expand", [self.op("Sin", [theta]), shape]))
        return self.cache[key]

    def forward_attention(self, q, k, v, mixer: SessaMixer, path: str, layer: int) -> ir.Value:
        """RoPE, then the causal attention over the past and new keys; present key/value are outputs."""
        H, Hkv, d = mixer.n_heads, mixer.n_kv_heads, mixer.head_dim
        past = self.past[layer]
        if mixer.use_forward_rope:
            cos, sin = self.rope_tables(d, mixer.rope_inv_freq, q)
            q = self.op("RotaryEmbedding", [q, cos, sin], interleaved=1, num_heads=H)
            k = self.op("RotaryEmbedding", [k, cos, sin], interleaved=1, num_heads=Hkv)
        attributes = {"q_num_heads": H, "kv_num_heads": Hkv, "scale": float(d ** -0.5)}
        if self.layout.contract != GROW:
            heads, key, value = self.tape.op_multi_out(
                causal_cache_op.OP_TYPE, [q, k, v, self.past_length, past["key"], past["value"]],
                attributes=attributes, domain=causal_op.DOMAIN, num_outputs=3)
        else:
            heads, key, value = self.tape.op_multi_out(
                causal_op.OP_TYPE, [q, k, v, self.visible(), past["key"], past["value"]],
                attributes=attributes, domain=causal_op.DOMAIN, num_outputs=3)
        self.present(layer, key=key, value=value)
        return heads

    def feedback_attention(self, q_b, k_b, f, gain, mixer: SessaMixer, layer: int) -> ir.Value:
        """One ai.sessa.FeedbackAttention node: s of the new rows; present feedback key/state are outputs."""
        past = self.past[layer]
        inputs = [q_b, k_b, f, gain, past["feedback_key"], past["feedback_state"]]
        op_type = fa_op.OP_TYPE
        if self.layout.contract != GROW:
            op_type, inputs = fa_cache_op.OP_TYPE, [*inputs, self.past_length]
        s, feedback_key, feedback_state = self.tape.op_multi_out(
            op_type, inputs, attributes={"scale": float(mixer.D ** -0.5)}, domain=fa_op.DOMAIN, num_outputs=3)
        self.present(layer, feedback_key=feedback_key, feedback_state=feedback_state)
        return s

    def present(self, layer: int, **values: ir.Value) -> None:
        """Name state outputs `present.{layer}.{field}`: P + S ("total") positions, or the capacity, in the
        state's dtype (the in-place caches are in it already; a grown state is cast to it)."""
        for field, value in values.items():
            axes = self.layout.axes(self.layout.layers[layer], field)
            shape = ["total" if a == "past" else a for a in axes]
            if self.layout.contract == GROW and self.state_type != self.dtype:
                value = self.op("Cast", [value], to=self.state_type)
            self.outputs.append(self.typed(value, self.layout.graph_name(layer, field, present=True), shape,
                                           self.state_type))

    # -- the walk ---------------------------------------------------------------------------------
    def typed(self, value: ir.Value, name: str, shape: list, dtype: ir.DataType | None = None) -> ir.Value:
        """Name a graph output and give it a dtype (default the model's) and a symbolic shape."""
        value.name, value.type, value.shape = name, ir.TensorType(dtype or self.dtype), ir.Shape(shape)
        return value

    def new_input(self, name: str, dtype: ir.DataType, shape: list) -> ir.Value:
        value = ir.Value(name=name, type=ir.TensorType(dtype), shape=ir.Shape(shape))
        self.inputs.append(value)
        return value

    def build(self, dtype: ir.DataType) -> ir.Model:
        g, layout = self.graph, self.layout
        self.dtype = dtype
        if g.input_kind == "tokens":
            self.data_input = self.new_input(g.input_name, ir.DataType.INT64, [BATCH, "sequence"])
        else:
            self.data_input = self.new_input(g.input_name, dtype, [BATCH, "sequence", g.input_width])
        self.values[g.input_name] = self.data_input
        if layout.contract == GENAI:  # P = the mask's width − S, as a scalar
            mask = self.new_input(ATTENTION_MASK, ir.DataType.INT64, [BATCH, "total"])
            past = self.op("Sub", [self.op("Shape", [mask], start=1, end=2),
                                   self.op("Shape", [self.data_input], start=1, end=2)])
            self.past_length = self.op("Reshape", [past, self.const(np.array([], dtype=np.int64), "shape0")])
        elif layout.contract != GROW:
            self.past_length = self.new_input(PAST_LENGTH, ir.DataType.INT64, [])
        self.past = [{f: self.new_input(layout.graph_name(layer.layer, f), self.state_type, layout.axes(layer, f))
                      for f in FIELDS} for layer in layout.layers]
        for node in g.nodes:
            args = [self.values[i] if isinstance(i, str) else i for i in node.inputs]
            self.values[node.output] = OPS[node.op].onnx(self, node, *args)
        results = []
        for out_name, value_name in g.outputs.items():
            shape = [BATCH, "sequence", self.widths.get(value_name, "width")]
            results.append(self.typed(self.op("Identity", [self.values[value_name]]), out_name, shape))
        inplace = layout.contract != GROW
        opset = INPLACE_OPSET if inplace else OPSET
        graph = ir.Graph(self.inputs, results + self.outputs, nodes=self.tape.nodes,
                         initializers=self.tape.initializers,
                         opset_imports={"": opset, fa_op.DOMAIN: fa_op.VERSION, causal_op.DOMAIN: 1},
                         name="sessa_step")
        ops = (fa_op, causal_op, fa_cache_op, causal_cache_op) if inplace else (fa_op, causal_op)
        functions = [ir.serde.deserialize_function(function_proto(m, opset)) for m in ops]
        model = ir.Model(graph, ir_version=IR_VERSION, producer_name="sessa-export",
                         producer_version=__version__, functions=functions)
        # CausalAttention is only a way to write the forward attention: its standard ops replace it
        InlinePass(criteria=lambda function: function.domain == causal_op.DOMAIN)(model)
        del model.graph.opset_imports[causal_op.DOMAIN]
        return model


def function_proto(module, opset: int) -> onnx.FunctionProto:
    """An op module's function for a model of standard opset `opset`, importing every domain its body
    calls (onnxscript lists only its own). The 23 functions use no op that opset 24 changed."""
    proto = module.function_proto()
    for imported in proto.opset_import:
        if imported.domain == "":
            imported.version = opset
    imported = {o.domain for o in proto.opset_import}
    for domain in sorted(_domains(proto.node) - imported):
        proto.opset_import.append(onnx.helper.make_opsetid(domain, 1))
    return proto


def _domains(nodes) -> set[str]:
    """The domains of `nodes` and of the nodes in their subgraphs."""
    found = set()
    for node in nodes:
        found.add(node.domain)
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                found |= _domains(attribute.g.node)
    return found


def build_onnx(graph: StepGraph, dtype: ir.DataType = ir.DataType.FLOAT, contract: str = GROW,
               state_dtype: str = "float32") -> ir.Model:
    """The step graph as an in-memory ONNX model under the state `contract` (state.CONTRACTS), its state
    stored in `state_dtype` (state.STATE_DTYPES)."""
    return OnnxBuilder(graph, contract, state_dtype).build(dtype)


def export_onnx(graph: StepGraph, out: str | Path, progress: Callable[[str], None] = lambda _: None,
                source: str | None = None, factory: str | None = None, state: str = GROW,
                state_dtype: str = "float32", tokenizer: str | Path | None = None, ort_format: bool = False,
                mobile: bool = False) -> Path:
    """Write OUT/model.onnx and OUT/sessa_config.json under the state contract `state`, the state stored
    in `state_dtype`, with a copy of `tokenizer` (a tokenizer.json) when given, and with `ort_format` the
    ORT-format model and its required operators (ort_format.py); under the "genai" contract also
    genai_config.json (and a byte-level tokenizer.json when no tokenizer is given: genai.py), so ONNX
    Runtime GenAI loads OUT as it is; with `mobile` the fixed-shape ORT Mobile step graphs (mobile.py).
    Nothing is left at OUT on failure."""
    out = Path(out)
    layout = check_state(graph.mixers, state, state_dtype)  # before any work
    inputs = (source,)
    check_replaceable(out, inputs=inputs)
    progress("building ONNX graph")
    model = build_onnx(graph, contract=state, state_dtype=state_dtype)
    size = sum(v.const_value.nbytes for v in model.graph.initializers.values())
    with atomic_directory(out, inputs=inputs) as tmp:
        progress(f"saving {size / 2**20:.1f} MiB of weights")
        ir.save(model, tmp / MODEL_NAME, external_data="model.onnx.data" if size > EXTERNAL_DATA_LIMIT else None)
        check_model(tmp / MODEL_NAME, progress)
        ort_files = write_ort_format(tmp, MODEL_NAME, progress) if ort_format else {}
        if mobile:
            from .mobile import write_mobile  # here: mobile.py imports OnnxBuilder from this module

            ort_files.update(write_mobile(tmp, graph, progress))
        manifest = add_tokenizer(tmp, new_manifest(graph, "onnx", layout, opset=model.graph.opset_imports[""],
                                                   model_file=MODEL_NAME, source=source, factory=factory,
                                                   **ort_files), tokenizer)
        if state == GENAI:
            manifest.update(write_genai_files(tmp, graph, layout, MODEL_NAME, manifest.get(TOKENIZER_KEY)))
        write_manifest(tmp, manifest)
    return out


def check_state(mixers: Sequence, state: str, state_dtype: str) -> StateLayout:
    """The state layout of an export of these mixers; a clear error for a contract or dtype it cannot run."""
    layout = StateLayout.from_mixers(mixers, state, state_dtype)
    if state_dtype == "bfloat16" and state == GROW:
        raise SessaExportError("--state-dtype bfloat16 needs --state inplace: a growing bfloat16 state cannot be "
                               "read back by ONNX Runtime's Python API (numpy has no bfloat16), so it could not be "
                               "validated; use --state inplace, or float16")
    if state_dtype == "bfloat16" and state == GENAI:
        raise SessaExportError("--genai takes --state-dtype float32 or float16: ONNX Runtime GenAI allocates its KV "
                               "buffers in the model's float types")
    return layout


def check_model(path: Path, progress: Callable[[str], None]) -> None:
    """onnx.checker's full check (types and shapes too) on a saved model; one line when it fails."""
    progress("checking with onnx.checker (full_check)")
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise SessaExportError(f"{path.name} failed onnx.checker: {str(exc).splitlines()[0]}") from None


__all__ = ["OPSET", "MODEL_NAME", "OnnxBuilder", "build_onnx", "export_onnx", "check_state", "check_model"]
