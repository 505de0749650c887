"""An op of the step graph as one unit: how the tracer finds it and how each back end emits it.

Every op of `StepGraph.nodes` is one `Op` in `ops/registry.py`'s table. Its faces:

- matching: the torch modules, functions and tensor methods it stands for in a torch.fx graph,
  and the attributes it keeps from them;
- `width`: the last-dim width of its output, given its inputs' widths;
- `onnx`, `relax`: its emission, `face(builder, node, *inputs) -> value`, on the ONNX builder
  (`sessa_export.to_onnx`) or the Relax builder (`sessa_export.to_tvm`). An op written only
  with the builders' shared vocabulary (`Builder` below) passes one function as both faces.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

Face = Callable[..., Any]


class Builder(Protocol):
    """What both back ends' builders offer an op: their shared vocabulary."""

    def const(self, array, name: str) -> Any: ...  # a weight or constant, named once
    def linear(self, x, module, path: str) -> Any: ...  # x @ W^T + b in the back end's weight layout
    def linears(self, x, layers: Sequence[tuple[Any, str]]) -> tuple: ...  # linear layers of one input, one output each
    def split(self, x, sizes: Sequence[int]) -> tuple: ...  # pieces of the last dim
    def apply(self, op: str, *inputs, **attrs) -> Any: ...  # another op of the table, by name
    def role(self, name: str): ...  # a context: what is emitted inside computes `name` (e.g. "gain")


@dataclass(frozen=True)
class Op:
    """One op: its name in the step graph, how torch.fx shows it, and its faces."""

    name: str
    onnx: Face
    relax: Face
    arity: int = 1  # data inputs (binary ops also take a Python number in either place)
    modules: tuple[type, ...] = ()  # nn.Module classes, matched by exact type
    functions: tuple = ()  # callables of call_function nodes
    methods: tuple[str, ...] = ()  # tensor methods of call_method nodes
    module_attrs: Callable[[Any], dict] = field(default=lambda module: {})  # attrs kept from a module
    call_attrs: Callable[[dict], dict] = field(default=lambda kwargs: {})  # attrs kept from a call's kwargs
    width: Callable[..., int | None] | None = None  # (node, input widths) -> output width; None: the first input's


class Applied:
    """The node an op sees when another op applies it by name (`Builder.apply`): no module, given attrs."""

    def __init__(self, attrs: dict) -> None:
        self.attrs, self.module, self.path, self.inputs = attrs, None, "", ()
