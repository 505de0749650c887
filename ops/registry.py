"""The table of every op a step graph may hold (`OPS`, by name) and how torch.fx nodes find theirs."""

from __future__ import annotations

from . import mixer, positionwise
from .op import Op

OPS: dict[str, Op] = {op.name: op for op in (*positionwise.OPS, mixer.OP)}


def for_module(module) -> Op | None:
    """The op a torch module call stands for (exact type), or None."""
    return next((op for op in OPS.values() if type(module) in op.modules), None)


def for_function(fn) -> Op | None:
    """The op of a call_function target, or None."""
    return next((op for op in OPS.values() if any(fn is f for f in op.functions)), None)


def for_method(name: str) -> Op | None:
    """The op of a tensor method call, or None."""
    return next((op for op in OPS.values() if name in op.methods), None)


def output_width(node, widths: dict, graph) -> int | None:
    """The last-dim width of `node`'s output, when known."""
    op = OPS[node.op]
    if op.width is not None:
        return op.width(node, widths, graph)
    first = node.inputs[0] if node.inputs and isinstance(node.inputs[0], str) else None
    return widths.get(first)


__all__ = ["OPS", "for_module", "for_function", "for_method", "output_width"]
