"""ONNX back end: lower a StepGraph to one ONNX model with the `ai.sessa.FeedbackAttention` op.

Standard ops where ONNX has them (opset 23: LayerNormalization, Gelu, RotaryEmbedding with
interleaved = 1, Attention with past key/value and grouped heads, in causal blocks of query rows
written by ops/causal_attention.py and inlined here); the feedback recurrence is one
`ai.sessa.FeedbackAttention` node per layer whose function body ships in the model, so stock
ONNX Runtime runs it with nothing registered.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import onnx_ir as ir
from onnx_ir.passes.common import InlinePass
import torch

from . import __version__
from .checkpoint import atomic_directory, check_replaceable
from .errors import SessaExportError
from .model import SessaMixer
from .ops import causal_attention as causal_op
from .ops import feedback_attention as fa_op
from .runtime import ARTIFACT_KIND, MANIFEST_NAME
from .stepgraph import (BINARY, STATE_FIELDS, Node, StepGraph, feature_widths, layer_norm_affine, past_name,
                        present_name, split_sizes)

OPSET = 23
IR_VERSION = 10
MODEL_NAME = "model.onnx"
EXTERNAL_DATA_LIMIT = 2 * 1024**3  # protobuf cannot hold more in one file
ONNX_OPS = {"add": "Add", "sub": "Sub", "mul": "Mul", "div": "Div", "relu": "Relu", "tanh": "Tanh",
            "sigmoid": "Sigmoid", "identity": "Identity"}


def weights_hash(graph: StepGraph) -> str:
    """sha256 over every weight the graph uses, in graph order: ties an export to its checkpoint."""
    digest = hashlib.sha256()
    for node in graph.nodes:
        if node.module is not None:
            for name, tensor in node.module.state_dict().items():
                digest.update(f"{node.path}.{name}".encode())
                digest.update(tensor.detach().float().contiguous().numpy().tobytes())
    return digest.hexdigest()


class _Builder:
    """Emits ONNX nodes for one StepGraph on an onnx_ir tape."""

    def __init__(self, graph: StepGraph) -> None:
        self.graph = graph
        self.tape = ir.tape.Tape()
        self.values: dict[str, ir.Value] = {}
        self.inputs: list[ir.Value] = []
        self.outputs: list[ir.Value] = []
        self.cache: dict[str, ir.Value] = {}

    # -- small helpers ---------------------------------------------------------------------------
    def const(self, array: np.ndarray | torch.Tensor, name: str) -> ir.Value:
        """An initializer (weights) or a small constant, named once."""
        if name not in self.cache:
            if isinstance(array, torch.Tensor):
                array = array.detach().cpu().contiguous().numpy()
            self.cache[name] = self.tape.initializer(ir.tensor(np.ascontiguousarray(array), name=name), name=name)
        return self.cache[name]

    def op(self, op_type: str, inputs: list, **attrs) -> ir.Value:
        return self.tape.op(op_type, inputs, attributes=attrs or None)

    def linear(self, x: ir.Value, module: torch.nn.Linear, path: str) -> ir.Value:
        """x @ W^T + b, with W stored transposed ([in, out]) as MatMul quantizers expect."""
        y = self.op("MatMul", [x, self.const(module.weight.T, f"{path}.weight")])
        if module.bias is not None:
            y = self.op("Add", [y, self.const(module.bias, f"{path}.bias")])
        return y

    def typed(self, value: ir.Value, name: str, shape: list) -> ir.Value:
        """Name a graph output and give it the model's dtype and a symbolic shape."""
        value.name, value.type, value.shape = name, ir.TensorType(self.dtype), ir.Shape(shape)
        return value

    def new_input(self, name: str, dtype: ir.DataType, shape: list) -> ir.Value:
        value = ir.Value(name=name, type=ir.TensorType(dtype), shape=ir.Shape(shape))
        self.inputs.append(value)
        return value

    def positions(self) -> dict[str, ir.Value]:
        """Shared per-step values: past length P, new length S, positions P..P+S-1, the causal mask."""
        if "positions" not in self.cache:
            past = self.op("Shape", [self.past[0]["feedback_key"]], start=1, end=2)
            new = self.op("Shape", [self.data_input], start=1, end=2)
            total = self.op("Add", [past, new])
            one = self.const(np.array(1, dtype=np.int64), "one")
            positions = self.op("Range", [self.op("Squeeze", [past]), self.op("Squeeze", [total]), one])
            keys = self.op("Range", [self.const(np.array(0, dtype=np.int64), "zero"), self.op("Squeeze", [total]), one])
            visible = self.op("LessOrEqual", [self.op("Unsqueeze", [keys, self.const(np.array([0]), "axis0")]),
                                              self.op("Unsqueeze", [positions, self.const(np.array([1]), "axis1")])])
            batch_seq = self.op("Shape", [self.data_input], start=0, end=2)
            self.cache.update(positions=positions, visible=visible, batch_seq=batch_seq)
        return self.cache

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

    # -- ops ----------------------------------------------------------------------------------
    def mixer(self, a: ir.Value, mixer: SessaMixer, path: str, index: int) -> ir.Value:
        """Forward attention f, gain γ and FeedbackAttention for one Sessa mixer, state in and out."""
        H, Hkv, d, D = mixer.n_heads, mixer.n_kv_heads, mixer.head_dim, mixer.D
        past = self.past[index]
        q = self.linear(a, mixer.q_proj, f"{path}.q_proj")
        k = self.linear(a, mixer.k_proj, f"{path}.k_proj")
        v = self.linear(a, mixer.v_proj, f"{path}.v_proj")
        if mixer.use_forward_rope:
            cos, sin = self.rope_tables(d, mixer.rope_inv_freq, a)
            q = self.op("RotaryEmbedding", [q, cos, sin], interleaved=1, num_heads=H)
            k = self.op("RotaryEmbedding", [k, cos, sin], interleaved=1, num_heads=Hkv)
        heads, key, value = self.tape.op_multi_out(
            causal_op.OP_TYPE, [q, k, v, self.positions()["visible"], past["key"], past["value"]],
            attributes={"q_num_heads": H, "kv_num_heads": Hkv, "scale": float(d ** -0.5)},
            domain=causal_op.DOMAIN, num_outputs=3)
        f = heads if H == 1 else self.linear(heads, mixer.out_proj, f"{path}.out_proj")
        q_b, k_b = self.tape.op_multi_out("Split", [self.linear(a, mixer.proj_fb, f"{path}.proj_fb")],
                                          attributes={"axis": -1, "num_outputs": 2}, num_outputs=2)
        ctx = self.linear(a, mixer.gamma_ctx, f"{path}.gamma_ctx")
        gain = self.op("Mul", [self.op("Tanh", [self.op("Add", [ctx, self.const(mixer.gamma_bias.reshape(1), f"{path}.gamma_bias")])]),
                               self.const(np.array([mixer.gamma_max], dtype=np.float32), f"{path}.gamma_max")])
        s, feedback_key, feedback_state = self.tape.op_multi_out(
            fa_op.OP_TYPE, [q_b, k_b, f, gain, past["feedback_key"], past["feedback_state"]],
            attributes={"scale": float(D ** -0.5)}, domain=fa_op.DOMAIN, num_outputs=3)
        for field_name, value_out in zip(STATE_FIELDS, (key, value, feedback_key, feedback_state)):
            shape = [("total" if dim == "past" else dim) for dim in self.state_shapes[index][field_name]]
            self.outputs.append(self.typed(value_out, present_name(index, field_name), shape))
        return s

    def node(self, node: Node) -> ir.Value:
        args = [self.values[i] if isinstance(i, str) else i for i in node.inputs]
        if node.op == "embedding":
            return self.op("Gather", [self.const(node.module.weight, f"{node.path}.weight"), args[0]], axis=0)
        if node.op == "linear":
            return self.linear(args[0], node.module, node.path)
        if node.op == "layer_norm":
            weight, bias = layer_norm_affine(node.module)
            return self.op("LayerNormalization", [args[0], self.const(weight, f"{node.path}.weight"),
                                                  self.const(bias, f"{node.path}.bias")],
                           axis=-1, epsilon=float(node.attrs["eps"]))
        if node.op == "gelu":
            return self.op("Gelu", args, approximate=node.attrs.get("approximate", "none"))
        if node.op == "silu":
            return self.op("Mul", [args[0], self.op("Sigmoid", args)])
        if node.op in BINARY:
            operands = [a if isinstance(a, ir.Value) else self.const(np.array(a, dtype=np.float32), f"scalar.{a!r}")
                        for a in args]
            return self.op(ONNX_OPS[node.op], operands)
        if node.op == "split":
            sizes = split_sizes(node, self.widths[node.inputs[0]])
            return tuple(self.tape.op_multi_out("Split", [args[0], self.const(np.array(sizes), f"sizes.{sizes}")],
                                                attributes={"axis": -1}, num_outputs=len(sizes)))
        if node.op == "getitem":
            return args[0][node.attrs["index"]]
        if node.op == "mixer":
            return self.mixer(args[0], node.module, node.path, node.attrs["index"])
        return self.op(ONNX_OPS[node.op], args)

    def build(self, dtype: ir.DataType) -> ir.Model:
        g = self.graph
        self.dtype = dtype
        if g.input_kind == "tokens":
            self.data_input = self.new_input(g.input_name, ir.DataType.INT64, ["batch", "sequence"])
        else:
            self.data_input = self.new_input(g.input_name, dtype, ["batch", "sequence", g.input_width])
        self.values[g.input_name] = self.data_input
        self.state_shapes = [layer["shapes"] for layer in g.state_layout()]
        self.past = [{f: self.new_input(past_name(i, f), dtype, shape) for f, shape in shapes.items()}
                     for i, shapes in enumerate(self.state_shapes)]
        self.widths = feature_widths(g)
        for node in g.nodes:
            self.values[node.output] = self.node(node)
        results = []
        for out_name, value_name in g.outputs.items():
            shape = ["batch", "sequence", self.widths.get(value_name, "width")]
            results.append(self.typed(self.op("Identity", [self.values[value_name]]), out_name, shape))
        graph = ir.Graph(self.inputs, results + self.outputs, nodes=self.tape.nodes,
                         initializers=self.tape.initializers,
                         opset_imports={"": OPSET, fa_op.DOMAIN: fa_op.VERSION, causal_op.DOMAIN: 1},
                         name="sessa_step")
        functions = [ir.serde.deserialize_function(m.function_proto()) for m in (fa_op, causal_op)]
        model = ir.Model(graph, ir_version=IR_VERSION, producer_name="sessa-export",
                         producer_version=__version__, functions=functions)
        # CausalAttention is only a way to write the forward attention: its standard ops replace it
        InlinePass(criteria=lambda function: function.domain == causal_op.DOMAIN)(model)
        del model.graph.opset_imports[causal_op.DOMAIN]
        return model


def build_onnx(graph: StepGraph, dtype: ir.DataType = ir.DataType.FLOAT) -> ir.Model:
    """The step graph as an in-memory ONNX model."""
    return _Builder(graph).build(dtype)


def export_onnx(graph: StepGraph, out: str | Path, progress: Callable[[str], None] = lambda _: None,
                source: str | None = None, factory: str | None = None) -> Path:
    """Write OUT/model.onnx and OUT/sessa_config.json; nothing is left at OUT on failure."""
    out = Path(out)
    check_replaceable(out, MANIFEST_NAME, ARTIFACT_KIND)
    progress("building ONNX graph")
    model = build_onnx(graph)
    size = sum(v.const_value.nbytes for v in model.graph.initializers.values())
    try:
        with atomic_directory(out, MANIFEST_NAME, ARTIFACT_KIND) as tmp:
            _write(graph, model, tmp, size, progress, {"source": source, "factory": factory})
    except OSError as exc:  # unwritable place, full disk, a file where a directory should be
        raise SessaExportError(f"cannot write {out}: {exc.strerror or exc}"
                               f"{f' ({exc.filename})' if exc.filename else ''}; nothing was written") from None
    return out


def _write(graph: StepGraph, model: ir.Model, tmp: Path, size: int, progress: Callable[[str], None],
           origin: dict) -> None:
    progress(f"saving {size / 2**20:.1f} MiB of weights")
    external = "model.onnx.data" if size > EXTERNAL_DATA_LIMIT else None
    ir.save(model, tmp / MODEL_NAME, external_data=external)
    progress("checking with onnx.checker (full_check)")
    try:
        onnx.checker.check_model(str(tmp / MODEL_NAME), full_check=True)
    except onnx.checker.ValidationError as exc:
        raise SessaExportError(f"exported model failed onnx.checker: {exc}") from None
    (tmp / MANIFEST_NAME).write_text(json.dumps(export_manifest(graph, "onnx", {"opset": OPSET, "model_file": MODEL_NAME, **origin}), indent=2) + "\n")


def export_manifest(graph: StepGraph, backend: str, extra: dict) -> dict:
    """What a runner needs besides the model file: config, names, state layout, version, weights hash."""
    return {
        "format": backend,
        "tool": "sessa-export", "tool_version": __version__,
        "config": graph.config.to_dict() if graph.config else None,
        "input": {"name": graph.input_name, "kind": graph.input_kind, "width": graph.input_width,
                  "vocab_size": next((n.module.num_embeddings for n in graph.nodes if n.op == "embedding"), None)},
        "outputs": list(graph.outputs),
        "state": graph.state_layout(),
        "max_len": graph.max_len,
        "dtype": "float32",
        "custom_ops": [f"{fa_op.DOMAIN}.{fa_op.OP_TYPE}"],
        "weights_sha256": weights_hash(graph),
        **extra,
    }
