"""The recurrent step graph: what the tracer produces and every back end (ONNX, TVM) lowers.

One graph serves prefill, chunked prefill and decode: it takes S new positions and the state of
the P earlier ones, and returns the outputs of the S positions and the state of all P + S.
Nodes are position-wise ops plus `mixer` nodes, the only place where positions meet.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from .config import SessaConfig
from .model import SessaMixer

# Position-wise ops a back end lowers besides embedding, linear, layer_norm, split, getitem and mixer.
UNARY = ("gelu", "relu", "silu", "tanh", "sigmoid", "identity")
BINARY = ("add", "sub", "mul", "div")

STATE_FIELDS = ("key", "value", "feedback_key", "feedback_state")


def past_name(layer: int, field_name: str) -> str:
    return f"past_key_values.{layer}.{field_name}"


def present_name(layer: int, field_name: str) -> str:
    return f"present.{layer}.{field_name}"


def layer_norm_affine(module: nn.LayerNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """A LayerNorm's weight and bias; ones and zeros when it has none (elementwise_affine=False)."""
    weight = module.weight if module.weight is not None else torch.ones(module.normalized_shape)
    bias = module.bias if module.bias is not None else torch.zeros(module.normalized_shape)
    return weight, bias


@dataclass(frozen=True)
class Node:
    """One op: `output = op(*inputs)`; inputs are value names or Python scalars (binary ops)."""

    op: str
    output: str
    inputs: tuple[str | float, ...]
    module: nn.Module | None = None  # weights of embedding, linear, layer_norm, mixer
    path: str = ""  # module path in the source model, used to name weights
    attrs: dict = field(default_factory=dict)


@dataclass
class StepGraph:
    """Nodes in execution order, one data input, named outputs, and the Sessa mixers in order."""

    input_name: str
    input_kind: Literal["tokens", "embeddings"]
    input_width: int | None  # D for embeddings inputs
    nodes: list[Node]
    outputs: dict[str, str]  # graph output name -> value name
    mixers: list[SessaMixer]
    config: SessaConfig | None = None  # set when the source is a SessaLM

    def state_layout(self) -> list[dict]:
        """Per mixer: the past/present tensor names and their shapes (symbolic dims as strings)."""
        layout = []
        for i, m in enumerate(self.mixers):
            kv = ["batch", m.n_kv_heads, "past", m.head_dim]
            fb = ["batch", "past", m.D]
            layout.append({
                "layer": i,
                "past": {f: past_name(i, f) for f in STATE_FIELDS},
                "present": {f: present_name(i, f) for f in STATE_FIELDS},
                "shapes": {"key": kv, "value": kv, "feedback_key": fb, "feedback_state": fb},
                "n_heads": m.n_heads, "n_kv_heads": m.n_kv_heads, "head_dim": m.head_dim,
                "d_model": m.D, "use_forward_rope": m.use_forward_rope, "gamma_max": m.gamma_max,
            })
        return layout

    @property
    def max_len(self) -> int | None:
        limits = [m.max_len for m in self.mixers if m.max_len is not None]
        return min(limits) if limits else None


def feature_widths(graph: StepGraph) -> dict[str, int]:
    """Last-dim width of each value (when known), for resolving splits and typing outputs."""
    widths: dict[str, int] = {}
    if graph.input_width:
        widths[graph.input_name] = graph.input_width
    for node in graph.nodes:
        first = node.inputs[0] if node.inputs and isinstance(node.inputs[0], str) else None
        if node.op == "embedding":
            widths[node.output] = node.module.embedding_dim
        elif node.op == "linear":
            widths[node.output] = node.module.out_features
        elif node.op == "mixer":
            widths[node.output] = node.module.D
        elif node.op == "getitem":
            split = next(n for n in graph.nodes if n.output == node.inputs[0])
            widths[node.output] = split_sizes(split, widths[split.inputs[0]])[node.attrs["index"]]
        elif first in widths:
            widths[node.output] = widths[first]
    return widths


def split_sizes(node: Node, width: int) -> list[int]:
    """Piece widths of `x.split(size_or_sizes, -1)` or `x.chunk(k, -1)` on a width-`width` value."""
    if "chunk" in node.attrs:
        size = -(-width // int(node.attrs["chunk"]))
    elif isinstance(node.attrs["split"], (list, tuple)):
        return [int(x) for x in node.attrs["split"]]
    else:
        size = int(node.attrs["split"])
    return [min(size, width - start) for start in range(0, width, size)]
