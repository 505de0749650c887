"""`sessa-export convert`: a custom module's weights as a SessaLM checkpoint, when it computes a SessaLM.

The module and a SessaLM of the shape read off it (vocabulary, width, layers, heads, per-layer kv heads,
RoPE, MLPs, tied or biased head) are both traced into step graphs; the conversion holds only when the
two graphs are the same node for node (same ops, same wiring, same module shapes). The weights are
then copied module by module, and the SessaLM's logits are checked against the module's own forward.
Anything that does not map is named: the module path, what it is, and what SessaLM has there.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from .checkpoint import save_checkpoint
from .config import SessaConfig
from .errors import SessaExportError
from .model import SessaLM
from .stepgraph import Node, StepGraph, feature_widths
from .tracer import trace
from .validate import FP32


def _describe(node: Node) -> str:
    module = node.module
    if isinstance(module, nn.Linear):
        return f"`{node.path}` (Linear {module.in_features}->{module.out_features}" \
               f"{'' if module.bias is not None else ', no bias'})"
    if isinstance(module, nn.Embedding):
        return f"`{node.path}` (Embedding {module.num_embeddings}x{module.embedding_dim})"
    if node.op == "mixer":
        return f"`{node.path}` (Sessa mixer, {module.n_heads} heads, {module.n_kv_heads} kv heads)"
    if node.path:
        return f"`{node.path}` ({type(module).__name__})"
    return f"`{node.op}`" + (f" {node.attrs}" if node.attrs else "")


def _signature(node: Node, widths: dict[str, int]) -> tuple:
    """What must agree between a node of the module and its SessaLM counterpart (not the weights)."""
    module = node.module
    if node.op == "linear":
        return ("linear", module.in_features, module.out_features, module.bias is not None)
    if node.op == "embedding":
        return ("embedding", module.num_embeddings, module.embedding_dim)
    if node.op == "layer_norm":
        return ("layer_norm", tuple(module.normalized_shape), float(module.eps))
    if node.op == "mixer":
        return ("mixer", module.D, module.n_heads, module.n_kv_heads, module.use_forward_rope,
                float(module.gamma_max), module.max_len)
    if node.op == "split":
        from .ops.positionwise import split_sizes

        return ("split", tuple(split_sizes(node, widths[node.inputs[0]])))
    if node.op == "gelu":
        return ("gelu", node.attrs.get("approximate", "none"))
    return (node.op, tuple(sorted((k, str(v)) for k, v in node.attrs.items())))


def _candidate_config(graph: StepGraph, module: nn.Module, spec: str) -> SessaConfig:
    """The SessaLM shape the module would have, read off its step graph; refuse what SessaLM cannot hold."""
    embeddings = [n for n in graph.nodes if n.op == "embedding"]
    if graph.input_kind != "tokens" or len(embeddings) != 1:
        raise SessaExportError(f"{spec}: SessaLM takes token ids through one embedding; this module "
                               f"{'takes embeddings' if graph.input_kind != 'tokens' else 'has several'}")
    if list(graph.outputs) != ["logits"]:
        raise SessaExportError(f"{spec}: SessaLM returns one logits tensor; the module returns "
                               f"{', '.join(graph.outputs)}")
    embed = embeddings[0].module
    mixers = graph.mixers
    for what, values in (("n_heads", [m.n_heads for m in mixers]), ("use_forward_rope", [m.use_forward_rope for m in mixers]),
                         ("gamma_max", [m.gamma_max for m in mixers]), ("max_len", [m.max_len for m in mixers])):
        if len(set(values)) > 1:
            paths = ", ".join(f"{n.path}: {v}" for n, v in zip((n for n in graph.nodes if n.op == "mixer"), values))
            raise SessaExportError(f"{spec}: SessaLM has one {what} for all layers; the mixers have {paths}")
    norms = [n.module for n in graph.nodes if n.op == "layer_norm"]
    if len({float(m.eps) for m in norms}) > 1:
        raise SessaExportError(f"{spec}: SessaLM has one ln_eps; the LayerNorms have {sorted({m.eps for m in norms})}")
    mlp_ratio = 0.0
    if len(norms) == 2 * len(mixers) + 1:  # a LayerNorm per layer and per MLP, and the final one
        mlp_norm = [n for n in graph.nodes if n.op == "layer_norm"][1]  # the first MLP's, after layer 0
        fc_in = next((n for n in graph.nodes if n.op == "linear" and n.inputs[0] == mlp_norm.output), None)
        if fc_in is not None:
            mlp_ratio = fc_in.module.out_features / embed.embedding_dim
    head = next((n for n in reversed(graph.nodes) if n.op == "linear"), None)
    kv = [m.n_kv_heads for m in mixers]
    try:
        return SessaConfig(
            vocab_size=embed.num_embeddings, d_model=embed.embedding_dim, n_layers=len(mixers),
            n_heads=mixers[0].n_heads, n_kv_heads=kv[0] if len(set(kv)) == 1 else tuple(kv),
            max_len=mixers[0].max_len, ln_eps=float(norms[0].eps) if norms else 1e-5,
            gamma_max=float(mixers[0].gamma_max), use_forward_rope=bool(mixers[0].use_forward_rope),
            mlp_ratio=mlp_ratio, tie_embeddings=head is not None and head.module.weight is embed.weight,
            lm_head_bias=head is not None and head.module.bias is not None).validate()
    except SessaExportError as exc:
        raise SessaExportError(f"{spec}: no SessaLM has this shape: {exc}") from None


def match_graphs(custom: StepGraph, target: StepGraph, spec: str) -> list[tuple[Node, Node]]:
    """The (module node, SessaLM node) pairs of two step graphs that compute the same thing; refuse,
    naming the first node that differs, when they do not."""
    widths_a, widths_b = feature_widths(custom), feature_widths(target)
    names = {custom.input_name: target.input_name}
    alias: dict[str, str] = {}  # identity ops (Dropout, Identity) compute nothing: their output is their input
    nodes = []
    for node in custom.nodes:
        if node.op == "identity":
            alias[node.output] = alias.get(node.inputs[0], node.inputs[0])
        else:
            nodes.append(node)
    pairs = []
    for index, (a, b) in enumerate(zip(nodes, target.nodes)):
        inputs = [names.get(alias.get(i, i), f"?{i}") if isinstance(i, str) else i for i in a.inputs]
        commutes = a.op in ("add", "mul") and sorted(map(str, inputs)) == sorted(map(str, b.inputs))
        if _signature(a, widths_a) != _signature(b, widths_b) or (list(inputs) != list(b.inputs) and not commutes):
            after = (f", after {_describe(pairs[-1][0])} taken as SessaLM's {_describe(pairs[-1][1])}"
                     if pairs and pairs[-1][0].path != pairs[-1][1].path else "")
            raise SessaExportError(
                f"{spec} does not map onto SessaLM: node {index}, {_describe(a)}, where SessaLM has "
                f"{_describe(b)}{after} (SessaLM: embed -> per layer ln, W_in, split, gelu, mixer, * gate, W_out, "
                "+ residual [-> MLP ln, fc_in, gelu, fc_out, + residual] -> norm_f -> lm_head)")
        names[a.output] = b.output
        pairs.append((a, b))
    if len(nodes) != len(target.nodes):
        longer, other = (nodes, "the module") if len(nodes) > len(target.nodes) else (target.nodes, "SessaLM")
        extra = ", ".join(_describe(n) for n in longer[len(pairs):][:4])
        raise SessaExportError(f"{spec} does not map onto SessaLM: {other} goes on with {extra}")
    logits = custom.outputs["logits"]
    if names.get(alias.get(logits, logits)) != target.outputs["logits"]:
        raise SessaExportError(f"{spec} does not map onto SessaLM: its logits are not the last linear layer's output")
    return pairs


def _unmapped(module: nn.Module, pairs: list[tuple[Node, Node]]) -> list[str]:
    """Parameters and buffers of the module that no matched node reads (they would be dropped)."""
    used = {id(t) for a, _ in pairs if a.module is not None and a.op != "mixer" for t in a.module.state_dict(keep_vars=True).values()}
    mixer_paths = [a.path for a, _ in pairs if a.op == "mixer"]
    return [name for name, tensor in module.state_dict(keep_vars=True).items()
            if id(tensor) not in used and not any(name.startswith(p + ".") for p in mixer_paths)]


def to_sessa_lm(module: nn.Module, spec: str) -> SessaLM:
    """The SessaLM with `module`'s weights; SessaExportError naming what does not map."""
    module = module.eval()
    custom = trace(module)
    config = _candidate_config(custom, module, spec)
    lm = SessaLM(config).eval()
    pairs = match_graphs(custom, trace(lm), spec)
    dropped = _unmapped(module, pairs)
    if dropped:
        raise SessaExportError(f"{spec} does not map onto SessaLM: its keys {', '.join(dropped[:8])}"
                               f"{' ...' if len(dropped) > 8 else ''} are read by nothing SessaLM has")
    target = dict(lm.named_modules())
    with torch.no_grad():
        for a, b in pairs:
            if a.module is None:
                continue
            source = a.module.state_dict()
            destination = target[b.path]
            if b.op == "layer_norm" and not source:  # elementwise_affine=False: ones and zeros
                continue
            if b.op == "linear" and b.path == "lm_head" and config.tie_embeddings:
                continue  # the embedding's table
            destination.load_state_dict(source)
    _check_logits(module, lm, spec)
    return lm


@torch.inference_mode()
def _check_logits(module: nn.Module, lm: SessaLM, spec: str, length: int = 64) -> None:
    length = min(length, lm.config.max_len or length)
    ids = torch.from_numpy(np.random.default_rng(0).integers(0, lm.config.vocab_size, (2, length)))
    expected, got = module(ids), lm(ids)
    error = float((expected.float() - got.float()).abs().max())
    scale = float(expected.abs().max())
    if not FP32.allows(error, scale):
        raise SessaExportError(f"{spec}: the converted SessaLM's logits differ from the module's by {error:.3g} "
                               f"(max |logits| {scale:.3g}); the module is not converted")


def convert(module: nn.Module, spec: str, out: str | Path, inputs: tuple = ()) -> SessaLM:
    """Write OUT/config.json + OUT/model.safetensors: `module` as a SessaLM checkpoint."""
    lm = to_sessa_lm(module, spec)
    save_checkpoint(lm, out, inputs)
    return lm


__all__ = ["convert", "to_sessa_lm", "match_graphs"]
