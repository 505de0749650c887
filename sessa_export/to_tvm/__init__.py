"""TVM back end: lower a StepGraph to one Relax function `step`, compile it for CPU, CUDA or Metal.

The Relax module has one entry, `step`, for prefill, chunked prefill and decode alike::

    step(input_ids [B, S] int64 (or embeddings [B, S, W]), past: R.Shape([P]),
         key_0 [B, Hkv, C, d], value_0 [B, Hkv, C, d], feedback_key_0 [B, C, D],
         feedback_state_0 [B, C, D], key_1, ...) -> logits [B, S, V]

C is the capacity fixed at compile time. The caches are preallocated by the caller and the
kernels write the S new rows (positions P..P+S-1) into them in place (`R.call_tir_inplace`,
the function carries `relax.force_pure`): a step never copies the state. Rows < P are only
read. Position-wise ops are plain Relax ops with the weights bound as constants (they live in
the compiled library, so a deployment loads one file); the two attentions are TIR kernels:
`ops/tvm_attention.py` (forward attention with RoPE, GQA and the KV append) and
`ops/tvm_kernels.py` (FeedbackAttention, decode and blocked prefill; CPUs prefill with
`ops/tvm_feedback_prefill.py`). `RelaxBuilder` walks the
graph: each node is emitted by its op's `relax` face (ops/registry.py); what only TVM has is here:
the caches of the state contract (sessa_export/state.py) and the two attention kernels.
With `quantization="q8"|"q4"` (CPU), linear weights (the LM head included) and the embedding table
are stored group-quantized (groups of 32 inputs, one float16 scale each; `keep` leaves named modules
in float32): decode runs integer dot products over activations quantized per group, prefill
dequantizes inside the matmul kernels (`ops/tvm_dequant_matmul.py`); no float copy of a quantized
weight exists at run time.

Artifacts (`compile_graph`), all in one directory written atomically: the library and device
code the target's file in targets/ packages (targets/__init__.py's table lists them), and
`sessa_config.json` (sessa_export/artifact.py) with target, arch, host, capacity, the library's
name and the calling convention.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from .. import __version__
from ..artifact import (add_tokenizer, atomic_directory, check_replaceable, new_manifest, quantization_record,
                        scratch_directory, write_manifest)
from ..config import available_cores
from ..errors import SessaExportError
from ..model import SessaMixer
from ..ops.op import Applied
from ..ops.registry import OPS
from ..quantization import QuantMode, keep_matches
from ..quantization import mode as quant_mode
from ..state import FIELDS, FIXED, PAST, StateLayout
from ..state import state_dtype as state_dtype_of
from ..stepgraph import StepGraph, feature_widths
from ..targets import TARGETS, Target

ENTRY = "step"
DEFAULT_CAPACITY = 2048
MIN_QUANTIZED_OUTPUTS = 16  # narrower layers (gamma_ctx has one output) stay float32: a negligible share


# -- what to build for ---------------------------------------------------------------------------
@dataclass(frozen=True)
class CompileTarget:
    """What to build for: a target of targets.TARGETS by `name`, its CUDA `arch`, a `host` triple,
    and for CPU libraries the `cpu` they may assume (targets/cpu.py's CPUS; default DEFAULT_CPU).

    `host` cross-compiles host code for one of the target's hosts (default: the target's default,
    or this machine).
    """

    name: str = "cpu"
    arch: str | None = None
    host: str | None = None
    cpu: str | None = None

    def __post_init__(self) -> None:
        if self.name not in TARGETS:
            raise SessaExportError(f"unknown target {self.name!r}; choose one of {', '.join(TARGETS)}")
        entry = self.entry
        if entry.archs:
            arch = self.arch or entry.archs[0]
            if arch not in entry.archs:
                raise SessaExportError(f"unknown {self.name} arch {arch!r}; choose one of {', '.join(entry.archs)}")
            object.__setattr__(self, "arch", arch)
        elif self.arch is not None:
            raise SessaExportError(f"--arch is for --target {', '.join(t.name for t in TARGETS.values() if t.archs)}, "
                                   f"not {self.name}")
        if self.host is not None and self.host not in entry.hosts:
            if not entry.hosts:
                raise SessaExportError(f"--host is not supported for --target {self.name} (host code is for this machine)")
            raise SessaExportError(f"unknown --host {self.host!r} for --target {self.name}; "
                                   f"choose one of {', '.join(entry.hosts)}")
        if self.host is None and entry.default_host is not None:
            object.__setattr__(self, "host", entry.default_host)
        if entry.cpus:
            choices, default = entry.implementation().cpu_choices(self.host)
            cpu = self.cpu or default
            if cpu not in choices:
                raise SessaExportError(f"unknown --cpu {cpu!r} for {self.host or 'this machine'}; choose one of "
                                       f"{', '.join(choices)}")
            object.__setattr__(self, "cpu", cpu)
        elif self.cpu is not None:
            raise SessaExportError(f"--cpu is for --target {', '.join(t.name for t in TARGETS.values() if t.cpus)}, "
                                   f"not {self.name}")

    @property
    def entry(self) -> Target:
        return TARGETS[self.name]

    @property
    def gpu(self) -> bool:
        return self.entry.gpu

    @property
    def library_name(self) -> str:
        return self.entry.implementation().library_name(self.host)

    @property
    def options(self) -> dict:
        """What the target's file takes besides arch and host (the --cpu of CPU builds)."""
        return {"cpu": self.cpu} if self.entry.cpus else {}

    def cpu_features(self) -> list[str] | None:
        """The /proc/cpuinfo features the library needs of the CPU that runs it (None: not a CPU library)."""
        return self.entry.implementation().cpu_features(self.cpu, self.host) if self.entry.cpus else None

    def tvm_target(self):
        """The TVM target, as the target's file in targets/ builds it."""
        return self.entry.implementation().tvm_target(self.arch, self.host, **self.options)

    def host_target(self):
        """The LLVM target of the host code."""
        target = self.tvm_target()
        return target.host if self.gpu else target

    def describe(self) -> str:
        where = self.arch or self.host or "this machine"
        return f"{self.name} ({where}{f', --cpu {self.cpu}' if self.cpu else ''})"


# -- Relax builder -------------------------------------------------------------------------------
class RelaxBuilder:
    """Emits Relax bindings for one StepGraph on a BlockBuilder: a walker over the op table."""

    def __init__(self, graph: StepGraph, capacity: int, target: CompileTarget, dtype: str = "float32",
                 quantization: QuantMode | None = None, state_dtype: str = "float32", keep: Sequence[str] = ()) -> None:
        from tvm import relax, tirx

        self.graph, self.capacity, self.target, self.dtype = graph, capacity, target, dtype
        self.state_dtype = state_dtype  # the caches' (state.STATE_DTYPES); the kernels read them as float32
        self.rules = target.entry.implementation()
        self.quantization = quantization
        self.quantized: dict[str, tuple[int, int]] = {}  # path -> (in, out) of each quantized weight
        self.float_weights: list[str] = []  # linear layers left in float32 under --quantization (see `linear`)
        self.keep = check_keep(graph, keep)  # --keep: module paths (prefixes) left in float32
        self.kept_weights: list[str] = []  # the weights --keep left in float32
        self.rx, self.tirx = relax, tirx
        self.bb = relax.BlockBuilder()
        self.decode = False
        self.values: dict[str, object] = {}
        self.kernels: dict[tuple, object] = {}
        self.consts: dict[str, object] = {}
        self.widths = feature_widths(graph)

    # -- the builders' shared vocabulary (ops/op.py's Builder) -----------------------------------
    def const(self, array, name: str, dtype: str | None = None):
        """A weight or small constant bound into the module (named once)."""
        if name not in self.consts:
            if isinstance(array, torch.Tensor):
                array = array.detach().cpu().float().numpy() if (dtype or self.dtype) == "float32" else array.detach().cpu().numpy()
            array = np.ascontiguousarray(np.asarray(array, dtype=dtype or self.dtype))
            self.consts[name] = self.rx.const(array)
        return self.consts[name]

    def operand(self, value):
        """A Relax value, or a Python number as a scalar constant."""
        return self.rx.const(np.array(value, dtype=self.dtype)) if isinstance(value, float) else value

    def emit(self, expr, name: str = ""):
        return self.bb.emit(expr, name_hint=name)

    def apply(self, name: str, *inputs, **attrs):
        return OPS[name].relax(self, Applied(attrs), *inputs)

    def split(self, x, sizes: Sequence[int]) -> tuple:
        parts = self.emit(self.rx.op.split(x, list(np.cumsum(sizes)[:-1].tolist()), axis=-1))
        return tuple(self.emit(self.rx.TupleGetItem(parts, k)) for k in range(len(sizes)))

    @contextmanager
    def role(self, name: str):
        """Relax needs no role tags: the policy is applied here (see `linear`)."""
        yield

    def tensor_type(self, shape, dtype: str | None = None):
        return self.rx.TensorType(list(shape), dtype or self.dtype)

    def linear(self, x, module: torch.nn.Linear, path: str):
        """x @ W^T + b: W packed in panels on CPU, stored transposed ([in, out]) on GPUs,
        group-quantized under --quantization."""
        return self.linears(x, [(module, path)])[0]

    def linears(self, x, layers: Sequence[tuple[torch.nn.Linear, str]]) -> tuple:
        """Linear layers of one input (`(module, path)` pairs), one output each. Layers stored alike
        (quantized or float32, bias or none, one input width) run as one product over their weights
        side by side, split after: a decode step then streams the mixer's q/k/v/proj_fb weights in
        one launch, not four. Each output column is computed as it would be alone."""
        quantize = [self.quantizes(module, path) for module, path in layers]
        if len({(q, m.in_features, m.bias is not None) for q, (m, _) in zip(quantize, layers)}) > 1:
            return tuple(self.linears(x, [layer]) for layer in layers)
        modules, name = [m for m, _ in layers], "+".join(p for _, p in layers)
        if quantize[0]:
            self.quantized.update({p: (m.in_features, m.out_features) for m, p in layers})
            y = self.quantized_linear(x, modules, name)
        else:
            y = self.float_linear(x, modules, name)
        return (y,) if len(layers) == 1 else self.split(y, [m.out_features for m in modules])

    def quantizes(self, module: torch.nn.Linear, path: str) -> bool:
        """Whether --quantization stores this layer's weight quantized; a layer it leaves in float32 is
        noted (``float_weights``, or --keep's ``kept_weights``)."""
        if self.quantization is None or self.kept(path):  # CPU only (check_quantization)
            return False
        # Kept in float32: layers whose inputs are not whole groups (of 8 inputs at least) or whose
        # outputs fill no panel; and layers narrower than MIN_QUANTIZED_OUTPUTS.
        from ..targets import cpu

        if (module.in_features % self.quantization.block_size == 0 and self.quantization.block_size % 8 == 0
                and module.out_features >= MIN_QUANTIZED_OUTPUTS and cpu.weight_panel(module.out_features)):
            return True
        if path not in self.float_weights:
            self.float_weights.append(path)
        return False

    def float_linear(self, x, modules: Sequence[torch.nn.Linear], name: str):
        """x @ W^T + b in float32 for the layers' weights side by side (W [out, in]): packed in panels
        on CPU, transposed ([in, out]) on GPUs."""
        from ..ops.tvm_matmul import pack_weight
        from ..targets import cpu

        op, out = self.rx.op, sum(m.out_features for m in modules)
        panel = None if self.target.gpu else cpu.weight_panel(out)
        weight = self.consts.get(f"{name}.weight")
        if weight is None:  # the decode and prefill bodies both emit this layer: stack and lay it out once
            stack = stacked([m.weight for m in modules])
            weight = self.const(stack.T if panel is None else pack_weight(stack.numpy(), panel), f"{name}.weight")
        bias = None if modules[0].bias is None else stacked([m.bias for m in modules])
        if panel is None:
            y = self.emit(op.matmul(x, weight))
            return y if bias is None else self.emit(op.add(y, self.const(bias, f"{name}.bias")))
        bias = None if bias is None else self.const(bias.reshape(-1, panel), f"{name}.bias")
        return cpu.emit_linear(self.bb, x, weight, bias, [self.batch, self.seq, out])

    def kept(self, path: str) -> bool:
        """Whether --keep names the module at `path` (its weight stays float32), noted once."""
        kept = any(keep_matches(f"{path}.weight", k) for k in self.keep)
        if kept and f"{path}.weight" not in self.kept_weights:
            self.kept_weights.append(f"{path}.weight")
        return kept

    def embedding(self, node, ids):
        """The token embedding: under --quantization its table stored by rows of int8 / packed int4
        with a scale per group (ops/tvm_dequant_matmul.py), one row dequantized per token."""
        from ..ops import tvm_dequant_matmul as dq

        table, path, qmode = node.module.weight, node.path, self.quantization
        if qmode is None or self.kept(path) or table.shape[1] % qmode.block_size or qmode.block_size % 2:
            if qmode is not None and not self.kept(path) and path not in self.float_weights:
                self.float_weights.append(path)
            return OPS[node.op].relax(self, node, ids)
        if f"{path}.weight.rows" not in self.consts:
            rows, scales = dq.quantize_rows(table.detach().cpu().float().numpy(), qmode.name, qmode.block_size)
            self.consts[f"{path}.weight.rows"], self.consts[f"{path}.weight.scales"] = \
                self.rx.const(rows), self.rx.const(scales)
            self.quantized[path] = tuple(table.shape[::-1])
        return self.bb.emit_te(dq.embedding, ids, self.consts[f"{path}.weight.rows"],
                               self.consts[f"{path}.weight.scales"], qmode.name, qmode.block_size)

    def quantized_linear(self, x, modules: Sequence[torch.nn.Linear], name: str):
        """x @ W^T + b through ops/tvm_dequant_matmul.py for the layers' weights side by side: int8 /
        packed int4 W ([out, in]) in CPU panels with a float16 scale per group of inputs; the kernel
        for this build and step is targets/cpu.py's `quantized_matmul_kernel`."""
        from ..ops import tvm_dequant_matmul as dq
        from ..targets import cpu

        N, K, mode, decode = sum(m.out_features for m in modules), modules[0].in_features, \
            self.quantization.name, self.decode
        group, panel = self.quantization.block_size, cpu.weight_panel(N)
        bias = None if modules[0].bias is None else stacked([m.bias for m in modules])
        if f"{name}.weight.q" not in self.consts:
            q, scales = dq.quantize(stacked([m.weight for m in modules]).numpy(), mode, panel, group)
            self.consts[f"{name}.weight.q"] = self.rx.const(q)
            self.consts[f"{name}.weight.scales"] = self.rx.const(scales)
        gv = self.kernel(("quantized_matmul", K, N, mode, bias is not None, decode), lambda: cpu.quantized_matmul_kernel(
            K, N, mode, bias is not None, group, decode, self.target.tvm_target()))
        args = [x, self.consts[f"{name}.weight.q"], self.consts[f"{name}.weight.scales"]]
        if bias is not None:
            args.append(self.const(bias.reshape(-1, panel), f"{name}.bias"))
        y = self.emit(self.rx.op.call_tir(gv, args, self.tensor_type([self.batch, self.seq, N // panel, panel])))
        return self.emit(self.rx.op.memory.view(y, self.rx.ShapeExpr([self.batch, self.seq, N])))

    def kernel(self, key: tuple, build: Callable):
        """Add a PrimFunc once per distinct shape key; returns its GlobalVar."""
        if key not in self.kernels:
            name, func = build()
            self.kernels[key] = self.bb.add_func(func.with_attr("global_symbol", name), name)
        return self.kernels[key]

    # -- what only TVM has: the attention kernels over in-place caches -----------------------------
    def forward_attention(self, q, k, v, mixer: SessaMixer, path: str, layer: int):
        """ops/tvm_attention.py's kernel: RoPE, the KV append in place, the causal attention."""
        from ..ops import tvm_attention

        rx, B, S, P, C = self.rx, self.batch, self.seq, self.past, self.capacity
        H, Hkv, d = mixer.n_heads, mixer.n_kv_heads, mixer.head_dim
        caches = self.caches[layer]
        inv_freq = mixer.rope_inv_freq.float() if mixer.use_forward_rope else torch.zeros(max(1, d // 2))
        out = self.emit(rx.op.call_tir_inplace(
            self.attention_kernel(mixer),
            [q, k, v, self.const(inv_freq, f"{path}.rope_inv_freq", "float32"), caches["key"], caches["value"],
             rx.prim_value(P)],
            tvm_attention.inplace_indices(),
            [self.tensor_type([B, Hkv, C, d], self.state_dtype), self.tensor_type([B, Hkv, C, d], self.state_dtype),
             self.tensor_type([B, S, H * d])]),
            f"attention_{layer}")
        return self.emit(rx.TupleGetItem(out, 2))

    def feedback_attention(self, q_b, k_b, f, gain, mixer: SessaMixer, layer: int):
        """The target's FeedbackAttention decode (S = 1) or prefill kernel, writing the feedback caches in place."""
        rx, B, S, P, C, D = self.rx, self.batch, self.seq, self.past, self.capacity, mixer.D
        caches = self.caches[layer]
        result = self.emit(rx.op.call_tir_inplace(
            self.feedback_kernel(D, self.decode),
            [q_b, k_b, f, gain, caches["feedback_key"], caches["feedback_state"], rx.prim_value(P)], [4, 5, -1],
            [self.tensor_type([B, C, D], self.state_dtype), self.tensor_type([B, C, D], self.state_dtype),
             self.tensor_type([B, S, D])]),
            f"feedback_{layer}")
        return self.emit(rx.TupleGetItem(result, 2))

    def attention_kernel(self, mixer: SessaMixer):
        """GlobalVar of the forward-attention kernel for this head layout, tiled for the target."""
        from ..ops import tvm_attention

        H, Hkv, d, rope = mixer.n_heads, mixer.n_kv_heads, mixer.head_dim, bool(mixer.use_forward_rope)
        return self.kernel(
            ("attention", H, Hkv, d, rope),
            lambda: (f"forward_attention_h{H}_kv{Hkv}_d{d}" + ("_rope" if rope else ""),
                     tvm_attention.forward_attention_kernel(H, Hkv, d, rope, self.dtype, self.rules.attention_tiling(d, self.target.tvm_target()),
                                                            self.state_dtype)))

    def feedback_kernel(self, D: int, decode: bool):
        """GlobalVar of the decode (S = 1) or prefill FeedbackAttention kernel, scheduled for the target."""
        from ..ops import tvm_kernels

        if ("feedback", D) not in self.kernels:
            try:
                _, kernels = self.rules.scheduled_feedback_attention(D, self.dtype, D ** -0.5, arch=self.target.arch,
                                                                     host=self.target.host, cache_dtype=self.state_dtype,
                                                                     **self.target.options)
            except Exception as exc:  # s_tir raises ScheduleError & co. with the whole PrimFunc in the message
                raise SessaExportError(f"the FeedbackAttention kernels (D={D}) could not be scheduled for "
                                       f"{self.target.describe()}: {last_line(exc)}") from None
            self.kernels[("feedback", D)] = {
                key: self.bb.add_func(func.with_attr("global_symbol", f"{key}_d{D}"), f"{key}_d{D}")
                for key, func in kernels.items()}
        return self.kernels[("feedback", D)][tvm_kernels.DECODE if decode else tvm_kernels.PREFILL]

    # -- the walk ---------------------------------------------------------------------------------
    def signature(self, seq):
        """Fresh symbolic (batch, seq_len, past) and the parameters of a step function."""
        rx, tirx, g, C = self.rx, self.tirx, self.graph, self.capacity
        B, P = tirx.Var("batch", "int64"), tirx.Var("past", "int64")
        S = tirx.Var("seq_len", "int64") if seq is None else seq
        if g.input_kind == "tokens":
            data = rx.Var(g.input_name, self.tensor_type([B, S], "int64"))
        else:
            data = rx.Var(g.input_name, self.tensor_type([B, S, g.input_width]))
        caches, params = [], [data, rx.Var("past", rx.ShapeType([P]))]
        for layer in g.state.layers:
            shapes = {f: [B if a == "batch" else C if a == PAST else a for a in layer.axes(f)] for f in FIELDS}
            caches.append({f: rx.Var(f"{f}_{layer.layer}", self.tensor_type(shapes[f], self.state_dtype)) for f in FIELDS})
            params += caches[-1].values()
        return (B, S, P), params, caches

    def body(self, name: str, decode: bool):
        """A private Relax function running the graph for S = 1 (`decode`) or any S."""
        rx, g = self.rx, self.graph
        (self.batch, self.seq, self.past), params, self.caches = self.signature(1 if decode else None)
        self.decode = decode
        self.values = {g.input_name: params[0]}
        with self.bb.function(name, params, attrs={"relax.force_pure": True}, private=True):
            with self.bb.dataflow():
                for node in g.nodes:
                    args = [self.values[i] if isinstance(i, str) else i for i in node.inputs]
                    face = (lambda _, n, *a: self.embedding(n, *a)) if node.op == "embedding" else OPS[node.op].relax
                    self.values[node.output] = face(self, node, *args)
                results = [self.values[v] for v in g.outputs.values()]
                out = self.bb.emit_output(results[0] if len(results) == 1 else rx.Tuple(results))
            self.bb.emit_func_output(out)
        return self.bb.get().get_global_var(name)

    def build(self):
        """The IRModule: `step` dispatches on S to a decode body (S = 1) or a prefill body (any S).

        The two bodies differ in their kernels only: FeedbackAttention's decode kernel, and
        matmuls scheduled as matrix-vector products, for S = 1.
        """
        rx, tirx = self.rx, self.tirx
        for mixer in self.graph.mixers:  # kernels first: one that fails to build fails before any function
            self.attention_kernel(mixer)
            self.feedback_kernel(mixer.D, True)
        decode_gv = self.body(f"{ENTRY}_decode", decode=True)
        prefill_gv = self.body(f"{ENTRY}_prefill", decode=False)
        (B, S, P), params, _ = self.signature(None)
        g = self.graph
        one = rx.Var(g.input_name, self.tensor_type([B, 1], "int64") if g.input_kind == "tokens"
                     else self.tensor_type([B, 1, g.input_width]))
        decode_branch = rx.SeqExpr([rx.BindingBlock([rx.MatchCast(one, params[0], one.ty)])],
                                   rx.Call(decode_gv, [one, *params[1:]]))
        prefill_branch = rx.SeqExpr([], rx.Call(prefill_gv, params))
        with self.bb.function(ENTRY, params, attrs={"relax.force_pure": True}):
            out = self.bb.emit(rx.If(rx.prim_value(tirx.EQ(S, tirx.IntImm("int64", 1))),
                                     decode_branch, prefill_branch))
            if len(g.outputs) == 1:  # give the result its full type back: [batch, seq_len, width]
                width = self.widths.get(next(iter(g.outputs.values())))
                if width is not None:
                    out = self.bb.match_cast(out, self.tensor_type([B, S, width]))
            self.bb.emit_func_output(out)
        return self.bb.get()


def stacked(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The tensors one after the other along dim 0, float32 on the CPU (one tensor: itself, uncopied)."""
    tensors = [t.detach().cpu().float() for t in tensors]
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)


def check_quantization(quantization: str | None, target: CompileTarget | None = None) -> QuantMode | None:
    """None for float32 weights, else a TVM mode of quantization.MODES (q8, q4), for --target cpu."""
    qmode = quant_mode(quantization, "tvm", "--quantization")
    if qmode is not None and target is not None and target.name != "cpu":
        raise SessaExportError(f"--quantization {qmode.name} is supported for --target cpu only, not {target.name}")
    return qmode


def check_keep(graph: StepGraph, keep: Sequence[str]) -> tuple[str, ...]:
    """--keep names (lm_head, embed, a module path prefix), each matching a linear or embedding weight."""
    keep = tuple(dict.fromkeys(k.strip() for k in keep if k and k.strip()))
    weights = [f"{n.path}.weight" for n in graph.nodes if n.op in ("linear", "embedding")]
    unmatched = [k for k in keep if not any(keep_matches(w, k) for w in weights)]
    if unmatched:
        raise SessaExportError(f"--keep {', '.join(unmatched)} matches no linear or embedding weight; "
                               f"name a module such as lm_head, embed or layers.0")
    return keep


def build_module(graph: StepGraph, capacity: int, target: CompileTarget | None = None,
                 quantization: str | None = None, keep: Sequence[str] = ()):
    """The step graph as a Relax IRModule (not yet lowered)."""
    target = target or CompileTarget()
    return RelaxBuilder(graph, capacity, target, quantization=check_quantization(quantization, target),
                        keep=keep).build()


# -- lowering and export -------------------------------------------------------------------------
def lower(mod, target: CompileTarget):
    """Run the target's Relax pipeline (targets/) and build the VM executable (not yet exported).

    What `tvm.compile` does, except that a CPU build's kernels are LLVM modules of one kernel each,
    built on every core and kept for the process (targets/kernel_cache.py: the next library with the
    same kernel for the same target reuses it); targets/packaging.py writes their objects in parallel
    too. A GPU build stays one module: its packagers expect one device module."""
    import tvm
    from tvm import relax
    from tvm.relax import vm_build

    from ..targets.kernel_cache import build_kernels

    tvm_target = target.tvm_target()
    with tvm_target:
        mod = target.entry.implementation().pipeline(tvm_target)(mod)
    attrs = dict(mod.attrs) if mod.attrs else {}
    builder = relax.ExecBuilder()
    mod = vm_build._vmcodegen(builder, mod, "bytecode")
    kernels = [(gv, f) for gv, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc)]
    if target.gpu:
        library = tvm.tirx.build(tvm.IRModule(dict(kernels), attrs=mod.attrs), target=tvm_target)
    else:
        library = build_kernels(kernels, tvm_target, available_cores())
    return vm_build.VMExecutable(vm_build._ffi_api.VMLink(builder, tvm_target, library,
                                                          list(attrs.get("external_mods", [])),
                                                          dict(attrs.get("const_name_to_constant", {}))))


def last_line(exc: BaseException) -> str:
    """The last line of an exception message that says something (TVM messages end with it)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


def tool_error(exc: BaseException) -> str:
    """What a failed compiler or linker said first (TVM's message puts its output between "Compilation
    error:" and the command line it ends with), else the message's last line."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    said = [line for line in lines if not line.lower().startswith(("compilation error", "command line"))]
    return said[0] if said and len(said) < len(lines) else last_line(exc)


def resolve_capacity(graph: StepGraph, max_len: int | None, state_dtype: str = "float32") -> int:
    """Compiled capacity C: --max-len, else the model's max_len, else DEFAULT_CAPACITY; refused when the
    caches of one sequence would not fit this machine's memory."""
    from ..config import memory_bytes

    if max_len is not None:
        if max_len < 1:
            raise SessaExportError(f"--max-len must be a positive integer, got {max_len}")
        if graph.max_len is not None and max_len > graph.max_len:
            raise SessaExportError(f"--max-len {max_len} exceeds the model's max_len={graph.max_len}")
    capacity = int(max_len or graph.max_len or DEFAULT_CAPACITY)
    caches, memory = capacity * graph.state.values_per_position() * state_dtype_of(state_dtype).itemsize, memory_bytes()
    if caches > memory:
        raise SessaExportError(f"a capacity of {capacity:,} positions needs {caches / 2**30:,.1f} GiB of caches for "
                               f"one sequence, more than this machine's {memory / 2**30:,.1f} GiB: lower --max-len")
    return capacity


def compile_graph(graph: StepGraph, out: str | Path, target: CompileTarget | None = None,
                  max_len: int | None = None, progress: Callable[[str], None] = lambda _: None,
                  source: str | None = None, quantization: str | None = None, factory: str | None = None,
                  inputs: tuple = (), tokenizer: str | Path | None = None, state_dtype: str = "float32",
                  keep: Sequence[str] = ()) -> Path:
    """Compile `graph` for `target` into OUT/ (library + sessa_config.json); nothing left on failure.
    OUT may not be, contain or lie inside `source` or any of `inputs` (an export it was compiled from).

    `source` (the checkpoint or weights) and `factory` (a custom model's package.module:factory) are
    recorded for `validate`. `quantization` "q8" / "q4" stores the linear layers' weights (the LM
    head included) and the embedding table as int8 / packed int4 with a float16 scale per group of
    inputs, but the modules `keep` names (quantization.keep_matches) in float32. `tokenizer` (a tokenizer.json) is copied into OUT and named in the manifest.
    `state_dtype` (state.STATE_DTYPES) is the caches' precision.
    """
    target = target or CompileTarget()
    qmode = check_quantization(quantization, target)
    out = Path(out)
    inputs = (source, *inputs)
    check_replaceable(out, inputs=inputs)  # before minutes of compiling, not after
    keep = check_keep(graph, keep)
    if keep and qmode is None:
        raise SessaExportError("--keep applies to quantized builds: add --quantization q8 or q4, or drop --keep")
    capacity = resolve_capacity(graph, max_len, state_dtype)
    layout = StateLayout(graph.state.layers, FIXED, state_dtype_of(state_dtype).name, capacity)
    started = time.perf_counter()
    progress(f"building the Relax module (capacity {capacity}" + (f", {qmode.name} weights)" if qmode else ")"))
    builder = RelaxBuilder(graph, capacity, target, quantization=qmode, state_dtype=state_dtype, keep=keep)
    mod = builder.build()
    progress(f"compiling for {target.describe()}")
    try:
        executable = lower(mod, target)
    except SessaExportError:
        raise
    except Exception as exc:  # TVM raises its own error types from the pipeline and codegen
        raise SessaExportError(f"TVM could not compile the model for {target.describe()}: {last_line(exc)}") from None
    library = target.library_name
    with atomic_directory(out, inputs=inputs) as tmp, scratch_directory(out) as work:
        progress(f"writing {library}")
        try:
            target.entry.implementation().package(executable, tmp / library, target.arch, target.host, work)
        except (SessaExportError, KeyboardInterrupt):
            raise
        except Exception as exc:  # compilers, linkers and TVM's exporters raise many types
            raise SessaExportError(f"writing {library} for {target.describe()} failed: {tool_error(exc)}") from None
        manifest = new_manifest(graph, "tvm", layout,
                                target=target.name, arch=target.arch, host=target.host,
                                cpu=target.cpu, cpu_features=target.cpu_features(),
                                triple=str(target.host_target().attrs["mtriple"]),
                                tvm_target=str(target.tvm_target()),
                                capacity=capacity, library=library, entry=ENTRY,
                                tvm_version=_tvm_version(), compiled_by=__version__,
                                calling_convention=calling_convention(graph, layout),
                                compile_seconds=round(time.perf_counter() - started, 2),
                                source=source, factory=factory)
        if qmode is not None:
            manifest["quantization"] = _quantization(builder, qmode, (tmp / library).stat().st_size)
        write_manifest(tmp, add_tokenizer(tmp, manifest, tokenizer))
    return out


def _quantization(builder: RelaxBuilder, qmode: QuantMode, size: int) -> dict:
    """The manifest's quantization record for a compiled library of `size` bytes."""
    values = sum(k * n for k, n in builder.quantized.values())
    stored = values * qmode.bits // 8 + 2 * values // qmode.block_size  # weights and float16 scales
    return quantization_record(
        mode=qmode.name, bits=qmode.bits, block_size=qmode.block_size, keep=list(builder.keep),
        kept_weights=builder.kept_weights,
        quantized_weights=sorted(f"{path}.weight" for path in builder.quantized),
        float_weights=[f"{path}.weight" for path in builder.float_weights],
        method=f"sessa_export.ops.tvm_dequant_matmul ({qmode.summary}; symmetric, a float16 scale per "
               f"{qmode.block_size} inputs)",
        size_bytes=size, source_size_bytes=size - stored + 4 * values, source_export=None, source_sha256=None)


def calling_convention(graph: StepGraph, layout: StateLayout) -> dict:
    """How a host program calls `step` on the caches of `layout` (the "fixed" contract): argument order and
    meaning (also in the manifest)."""
    args = [f"{graph.input_name}: " + ("int64 [batch, seq_len]" if graph.input_kind == "tokens"
                                       else f"float32 [batch, seq_len, {graph.input_width}]"),
            "past: shape tuple (P,), positions already in the caches"]
    for layer, field in layout.tensors():
        args.append(f"{field}_{layer.layer}: {layout.dtype} [{', '.join(map(str, layout.axes(layer, field)))}]")
    return {"function": ENTRY, "arguments": args, "returns": list(graph.outputs),
            "in_place": layout.contract_manifest()["in_place"]}


def _tvm_version() -> str:
    import tvm

    return tvm.__version__


__all__ = ["CompileTarget", "build_module", "compile_graph", "lower", "resolve_capacity",
           "check_quantization", "calling_convention"]
