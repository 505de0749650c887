"""The recurrent step graph: what the tracer produces and every back end (ONNX, TVM) lowers.

One graph serves prefill, chunked prefill and decode: it takes S new positions and the state of
the P earlier ones, and returns the outputs of the S positions and the state of all P + S.
Nodes are position-wise ops plus `mixer` nodes, the only place where positions meet; each node's
`op` names one entry of `ops/registry.OPS`, which knows how every back end emits it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from torch import nn

from .config import SessaConfig
from .model import SessaMixer
from .ops.registry import output_width
from .state import StateLayout


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

    @property
    def state(self) -> StateLayout:
        """The state contract of this graph's mixers."""
        return StateLayout.from_mixers(self.mixers)

    @property
    def vocab_size(self) -> int | None:
        """Rows of the token embedding (None for a model that takes embeddings)."""
        return next((n.module.num_embeddings for n in self.nodes if n.op == "embedding"), None)

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
        width = output_width(node, widths, graph)
        if width is not None:
            widths[node.output] = width
    return widths
