"""The position-wise ops: each one row of a table, with its torch matches and both faces.

A position-wise op works on each position alone, so a step of S positions is S independent
applications: these are what may sit outside Sessa mixers. Adding one is adding a row here.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import nn

from .op import Op


def layer_norm_affine(module: nn.LayerNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """A LayerNorm's weight and bias; ones and zeros when it has none (elementwise_affine=False)."""
    weight = module.weight if module.weight is not None else torch.ones(module.normalized_shape)
    bias = module.bias if module.bias is not None else torch.zeros(module.normalized_shape)
    return weight, bias


def split_sizes(node, width: int) -> list[int]:
    """Piece widths of `x.split(size_or_sizes, -1)` or `x.chunk(k, -1)` on a width-`width` value."""
    if "chunk" in node.attrs:
        size = -(-width // int(node.attrs["chunk"]))
    elif isinstance(node.attrs["split"], (list, tuple)):
        return [int(x) for x in node.attrs["split"]]
    else:
        size = int(node.attrs["split"])
    return [min(size, width - start) for start in range(0, width, size)]


# -- faces shared by both back ends -------------------------------------------------------------
def _linear(b, node, x):
    return b.linear(x, node.module, node.path)


def _split(b, node, x):
    return b.split(x, split_sizes(node, b.widths[node.inputs[0]]))


def _getitem(b, node, parts):
    return parts[node.attrs["index"]]


def _identity(b, node, x):
    return x


# -- ONNX faces ---------------------------------------------------------------------------------
def _onnx_op(op_type: str):
    return lambda b, node, *args: b.op(op_type, [b.operand(a) for a in args])


def _onnx_embedding(b, node, ids):
    return b.op("Gather", [b.const(node.module.weight, f"{node.path}.weight"), ids], axis=0)


def _onnx_layer_norm(b, node, x):
    weight, bias = layer_norm_affine(node.module)
    return b.op("LayerNormalization", [x, b.const(weight, f"{node.path}.weight"), b.const(bias, f"{node.path}.bias")],
                axis=-1, epsilon=float(node.attrs["eps"]))


def _onnx_gelu(b, node, x):
    return b.op("Gelu", [x], approximate=node.attrs.get("approximate", "none"))


def _onnx_silu(b, node, x):
    return b.op("Mul", [x, b.op("Sigmoid", [x])])


# -- Relax faces --------------------------------------------------------------------------------
def _relax_op(name: str):
    """A Relax op by its path under relax.op ("add", "nn.relu")."""
    def face(b, node, *args):
        fn = b.rx.op
        for part in name.split("."):
            fn = getattr(fn, part)
        return b.emit(fn(*(b.operand(a) for a in args)))
    return face


def _relax_embedding(b, node, ids):
    # "clip" keeps an out-of-range id inside the table (runners check ids; C++ hosts may not)
    return b.emit(b.rx.op.take(b.const(node.module.weight, f"{node.path}.weight"), ids, axis=0, mode="clip"))


def _relax_layer_norm(b, node, x):
    weight, bias = layer_norm_affine(node.module)
    return b.emit(b.rx.op.nn.layer_norm(x, b.const(weight, f"{node.path}.weight"), b.const(bias, f"{node.path}.bias"),
                                        axes=[-1], epsilon=float(node.attrs["eps"])))


def gelu_te(t):
    """te: exact GELU as x/2 (1 + erf(x/sqrt 2)) with topi's polynomial erf, which vectorises (Relax's
    gelu lowers to a scalar libm erf call per element: 4% of a 125M prefill)."""
    from tvm import te, topi

    erf = topi.fast_erf(te.compute(t.shape, lambda *i: t(*i) * 0.7071067811865476, name="gelu_scaled"))
    return te.compute(t.shape, lambda *i: t(*i) * 0.5 * (1.0 + erf(*i)), name="gelu")


def _relax_gelu(b, node, x):
    if node.attrs.get("approximate", "none") == "tanh":
        return b.emit(b.rx.op.nn.gelu_tanh(x))
    return b.bb.emit_te(gelu_te, x)


def _gelu_approximate(kwargs: dict) -> dict:
    return {"approximate": kwargs.get("approximate", "none")}


def _split_width(node, widths, graph):
    split = next(n for n in graph.nodes if n.output == node.inputs[0])
    return split_sizes(split, widths[split.inputs[0]])[node.attrs["index"]]


OPS = (
    Op("embedding", _onnx_embedding, _relax_embedding, modules=(nn.Embedding,),
       width=lambda node, widths, graph: node.module.embedding_dim),
    Op("linear", _linear, _linear, modules=(nn.Linear,), width=lambda node, widths, graph: node.module.out_features),
    Op("layer_norm", _onnx_layer_norm, _relax_layer_norm, modules=(nn.LayerNorm,),
       module_attrs=lambda module: {"eps": module.eps}),
    Op("gelu", _onnx_gelu, _relax_gelu, modules=(nn.GELU,), functions=(F.gelu,),
       module_attrs=lambda module: {"approximate": module.approximate}, call_attrs=_gelu_approximate),
    Op("relu", _onnx_op("Relu"), _relax_op("nn.relu"), modules=(nn.ReLU,), functions=(F.relu, torch.relu),
       methods=("relu",)),
    Op("silu", _onnx_silu, _relax_op("nn.silu"), modules=(nn.SiLU,), functions=(F.silu,)),
    Op("tanh", _onnx_op("Tanh"), _relax_op("tanh"), modules=(nn.Tanh,), functions=(torch.tanh,), methods=("tanh",)),
    Op("sigmoid", _onnx_op("Sigmoid"), _relax_op("sigmoid"), modules=(nn.Sigmoid,), functions=(torch.sigmoid,),
       methods=("sigmoid",)),
    Op("identity", _identity, _identity, modules=(nn.Dropout, nn.Identity), functions=(F.dropout,)),
    Op("add", _onnx_op("Add"), _relax_op("add"), arity=2, functions=(operator.add, torch.add), methods=("add",)),
    Op("sub", _onnx_op("Sub"), _relax_op("subtract"), arity=2, functions=(operator.sub, torch.sub), methods=("sub",)),
    Op("mul", _onnx_op("Mul"), _relax_op("multiply"), arity=2, functions=(operator.mul, torch.mul), methods=("mul",)),
    Op("div", _onnx_op("Div"), _relax_op("divide"), arity=2, functions=(operator.truediv, torch.div),
       methods=("div",)),
    Op("split", _split, _split, methods=("split", "chunk")),
    Op("getitem", _getitem, _getitem, width=_split_width),
)

__all__ = ["OPS", "layer_norm_affine", "split_sizes"]
