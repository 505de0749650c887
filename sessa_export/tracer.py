"""The tracer: lowers a trained model into a `StepGraph`.

It traces the model with torch.fx, keeping every Sessa mixer as one opaque call, and accepts only
position-wise work outside the mixers. A model that mixes positions anywhere else (a convolution
over time, a learned absolute position table, another attention) is refused with a message that
names the module or operation: it is never exported wrong.
"""

from __future__ import annotations

import operator

from torch import fx, nn

from .errors import SessaExportError
from .model import SessaLM, SessaMixer
from .ops import registry
from .stepgraph import Node, StepGraph

# A module is a Sessa mixer by class, or by carrying the reference SessaMixer's parameters.
MIXER_STRUCTURE = ("q_proj", "k_proj", "v_proj", "proj_fb", "gamma_bias", "gamma_ctx")

TOKEN_INPUT = "input_ids"  # the name of every export's token input

POSITION_MIXERS = {nn.Conv1d: "a convolution over time", nn.Conv2d: "a convolution",
                   nn.MultiheadAttention: "an attention that is not a Sessa mixer",
                   nn.RNN: "a recurrent layer", nn.LSTM: "a recurrent layer", nn.GRU: "a recurrent layer"}


def is_sessa_mixer(module: nn.Module) -> bool:
    return (isinstance(module, SessaMixer) or type(module).__name__ == "SessaMixer"
            or all(hasattr(module, name) for name in MIXER_STRUCTURE))


def _first_attr(module: nn.Module, names: tuple[str, ...]):
    for name in names:
        if hasattr(module, name):
            return getattr(module, name)
    return None


def as_sessa_mixer(module: nn.Module, path: str) -> SessaMixer:
    """The mixer as sessa_export's SessaMixer with the same weights (reference-compatible modules)."""
    if isinstance(module, SessaMixer):
        return module
    try:
        D = module.q_proj.in_features
        heads = _first_attr(module, ("n_heads", "num_heads", "H"))
        out_proj = getattr(module, "out_proj", None)
        if heads is None and (out_proj is None or isinstance(out_proj, nn.Identity)):
            heads = 1  # the reference has no out_proj exactly when H == 1
        if heads is None:
            raise SessaExportError(f"cannot tell the head count of Sessa mixer `{path}` "
                                   f"({type(module).__name__}): give it an `n_heads` attribute")
        kv_heads = module.k_proj.out_features // (D // int(heads))
        rope = _first_attr(module, ("use_forward_rope",))
        rope = bool(rope) if rope is not None else hasattr(module, "rope_inv_freq")
        gamma_max = _first_attr(module, ("gamma_max",))
        if gamma_max is None:
            raise SessaExportError(f"Sessa mixer `{path}` has no `gamma_max` attribute")
        mixer = SessaMixer(D, int(heads), kv_heads, _first_attr(module, ("max_len",)),
                           use_forward_rope=rope, gamma_max=float(gamma_max))
        mixer.load_state_dict(module.state_dict())
    except (AttributeError, RuntimeError) as exc:
        raise SessaExportError(f"module `{path}` ({type(module).__name__}) looks like a Sessa mixer "
                               f"but does not match the reference SessaMixer: {exc}") from None
    return mixer.to(next(module.parameters()).dtype).eval()


class _MixerLeafTracer(fx.Tracer):
    """torch.fx tracer that keeps Sessa mixers (and torch.nn modules) as single calls."""

    def __init__(self, mixers: set[nn.Module]) -> None:
        super().__init__()
        self.mixers = mixers

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return m in self.mixers or super().is_leaf_module(m, module_qualified_name)


def _refuse(what: str, why: str) -> SessaExportError:
    return SessaExportError(
        f"cannot export: {what} {why}. sessa-export exports models whose positions meet only inside "
        "Sessa mixers; everything else must be position-wise (Linear, LayerNorm, Embedding of the "
        "input tokens, activations, residual adds)")


def trace(model: nn.Module) -> StepGraph:
    """Trace `model` (a SessaLM or any module built around Sessa mixers) into a StepGraph."""
    model = model.eval()
    mixer_paths = {m: p for p, m in model.named_modules() if p and is_sessa_mixer(m)}
    if not mixer_paths:
        raise SessaExportError(f"{type(model).__name__} contains no Sessa mixer: nothing to export")
    try:
        graph = _MixerLeafTracer(set(mixer_paths)).trace(model)
    except SessaExportError:
        raise
    except Exception as exc:  # fx raises many types for untraceable Python
        raise SessaExportError(f"cannot trace {type(model).__name__} with torch.fx: {exc}") from None
    modules = dict(model.named_modules())
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        names = ", ".join(n.target for n in placeholders)
        raise SessaExportError(f"{type(model).__name__}.forward must take one input (tokens [B, T] or "
                               f"embeddings [B, T, D]); it takes: {names}")
    # A token input is `input_ids` whatever forward() calls it, as in SessaLM exports; an embeddings
    # input keeps forward()'s argument name.
    takes_tokens = any(n.op == "call_module" and isinstance(modules.get(n.target), nn.Embedding)
                       and n.args and n.args[0] is placeholders[0] for n in graph.nodes)
    input_name = TOKEN_INPUT if takes_tokens else placeholders[0].target
    value_names = {n: (input_name if n is placeholders[0] else f"{n.name}_" if n.name == input_name else n.name)
                   for n in graph.nodes}
    # Name what mixes positions before anything else: a time convolution usually sits between
    # transposes, and refusing the first `transpose` would hide the module that is at fault.
    for n in graph.nodes:
        module = modules.get(n.target) if n.op == "call_module" else None
        if module is not None and module not in mixer_paths and isinstance(module, tuple(POSITION_MIXERS)):
            why = next(why for kind, why in POSITION_MIXERS.items() if isinstance(module, kind))
            raise _refuse(f"module `{n.target}` ({type(module).__name__})", f"is {why}")

    nodes: list[Node] = []
    mixers: list[SessaMixer] = []
    outputs: dict[str, str] = {}
    input_kind, input_width = "embeddings", None

    def name_of(arg) -> str | float:
        if isinstance(arg, fx.Node):
            return value_names[arg]
        if isinstance(arg, (int, float)) and not isinstance(arg, bool):
            return float(arg)
        raise _refuse(f"the constant {arg!r}", "is not a number")

    for n in graph.nodes:
        if n.op == "placeholder":
            continue
        if n.op == "output":
            result = n.args[0]
            if isinstance(result, fx.Node):
                outputs["logits" if input_kind == "tokens" else "output"] = value_names[result]
            elif isinstance(result, dict):
                outputs.update({str(k): value_names[v] for k, v in result.items()})
            elif isinstance(result, (tuple, list)):
                outputs.update({f"output_{k}": value_names[v] for k, v in enumerate(result)})
            continue
        if n.op == "get_attr":
            raise _refuse(f"the parameter or buffer `{n.target}`",
                          "is used outside a module the tracer knows (a learned absolute position "
                          "table, for example)")
        if n.op == "call_module":
            module = modules[n.target]
            args = [a for a in n.args if a is not None]
            if module in mixer_paths:
                if len(args) != 1 or n.kwargs:
                    raise _refuse(f"Sessa mixer `{n.target}`", "is called with more than its input ā")
                mixers.append(as_sessa_mixer(module, n.target))
                nodes.append(Node("mixer", value_names[n], (name_of(args[0]),), mixers[-1], n.target,
                                  {"index": len(mixers) - 1}))
            elif isinstance(module, nn.Embedding):
                if args[0] is not placeholders[0]:
                    raise _refuse(f"embedding `{n.target}`", "is indexed by something other than the "
                                  "input tokens (a position table, for example)")
                input_kind = "tokens"
                nodes.append(Node("embedding", value_names[n], (name_of(args[0]),), module, n.target))
            elif isinstance(module, nn.Linear):
                nodes.append(Node("linear", value_names[n], (name_of(args[0]),), module, n.target))
                input_width = input_width or (module.in_features if args[0] is placeholders[0] else None)
            elif isinstance(module, nn.LayerNorm):
                if len(module.normalized_shape) != 1:
                    raise _refuse(f"LayerNorm `{n.target}`", "normalises over more than the last dim")
                nodes.append(Node("layer_norm", value_names[n], (name_of(args[0]),), module, n.target,
                                  {"eps": module.eps}))
                input_width = input_width or (module.normalized_shape[0] if args[0] is placeholders[0] else None)
            elif (op := registry.for_module(module)) is not None and op.arity == 1:
                nodes.append(Node(op.name, value_names[n], (name_of(args[0]),), attrs=op.module_attrs(module)))
            else:
                why = POSITION_MIXERS.get(type(module), "is not a position-wise module the tracer knows")
                why = f"is {why}" if type(module) in POSITION_MIXERS else why
                raise _refuse(f"module `{n.target}` ({type(module).__name__})", why)
            continue
        op = (registry.for_function(n.target) if n.op == "call_function"
              else registry.for_method(n.target) if n.op == "call_method" else None)
        if op is not None and op.name == "split":
            nodes.append(_split_node(n, name_of, value_names[n]))
        elif op is not None and op.arity == 2 and not n.kwargs:
            nodes.append(Node(op.name, value_names[n], tuple(name_of(a) for a in n.args)))
        elif op is not None and op.arity == 1 and (n.op == "call_function" or len(n.args) == 1):
            nodes.append(Node(op.name, value_names[n], (name_of(n.args[0]),), attrs=op.call_attrs(n.kwargs)))
        elif n.op == "call_function" and n.target is operator.getitem and isinstance(n.args[1], int) \
                and isinstance(n.args[0], fx.Node) and n.args[0].target in ("split", "chunk"):
            nodes.append(Node("getitem", value_names[n], (value_names[n.args[0]],), attrs={"index": n.args[1]}))
        else:
            target = getattr(n.target, "__name__", str(n.target))
            raise _refuse(f"the operation `{target}` (node {n.name})",
                          "is not position-wise or not supported outside a Sessa mixer")
    if not outputs:
        raise SessaExportError(f"{type(model).__name__}.forward returns nothing the tracer can name")
    config = model.config if isinstance(model, SessaLM) else None
    return StepGraph(input_name, input_kind, input_width, nodes, outputs, mixers, config)


def _split_node(n: fx.Node, name_of, output: str) -> Node:
    """`x.split(size, dim=-1)` / `x.chunk(k, dim=-1)` on the feature dim only."""
    dim = n.kwargs.get("dim", n.args[2] if len(n.args) > 2 else 0)
    if dim not in (-1, 2):
        raise _refuse(f"`{n.target}` (node {n.name}) along dim {dim}",
                      "splits something other than the feature dim (-1)")
    amount = n.args[1] if len(n.args) > 1 else n.kwargs.get("split_size", n.kwargs.get("chunks"))
    return Node("split", output, (name_of(n.args[0]),), attrs={n.target: amount})
