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
`ops/tvm_kernels.py` (FeedbackAttention, decode and blocked prefill).
With `quantization="q8"|"q4"` (CPU), linear weights are stored group-quantized (groups of 32
inputs, one float32 scale each) and dequantized inside the matmul kernels
(`ops/tvm_dequant_matmul.py`): no float copy of a quantized weight exists at run time.

Artifacts (`compile_graph`), all in one directory written atomically:
- cpu: `model.so` for this machine (or an AArch64 ELF .so with `host="aarch64-linux-gnu"`);
- cuda: `model.so` with the kernels compiled by nvcc for the asked arch (fatbin) inside;
- metal: `model.a` (or `model.tar` without llvm-ar), Mach-O arm64 objects for arm64-apple-darwin
  with the Metal shader source inside, plus `model.metal` beside it;
- `sessa_config.json`: `export_manifest(graph, "tvm", ...)` with target, arch, capacity, the
  library's name and sha256, and the calling convention.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .checkpoint import atomic_directory, check_replaceable
from .errors import SessaExportError
from .model import SessaMixer
from .ops.tvm_dequant_matmul import GROUP_SIZE, MODES
from .runtime import ARTIFACT_KIND, MANIFEST_NAME
from .stepgraph import BINARY, STATE_FIELDS, Node, StepGraph, feature_widths, layer_norm_affine, split_sizes
from .targets import AARCH64_LINUX, ARCHS, METAL_HOSTS

ENTRY = "step"
DEFAULT_CAPACITY = 2048
TARGETS = ("cpu", "cuda", "metal")
HOSTS = {AARCH64_LINUX: f"{AARCH64_LINUX}-g++"}
QUANTIZATIONS = tuple(MODES)  # --quantization: int8 / packed int4 linear weights


# -- targets -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CompileTarget:
    """What to build for: `name` in TARGETS, a CUDA `arch`, a `host` triple.

    `host` cross-compiles: for cpu one of HOSTS (default: this machine); for metal one of
    METAL_HOSTS (default arm64-apple-darwin, or arm64-apple-ios).
    """

    name: str = "cpu"
    arch: str | None = None
    host: str | None = None

    def __post_init__(self) -> None:
        if self.name not in TARGETS:
            raise SessaExportError(f"unknown target {self.name!r}; choose one of {', '.join(TARGETS)}")
        if self.name == "cuda":
            arch = self.arch or ARCHS[0]
            if arch not in ARCHS:
                raise SessaExportError(f"unknown CUDA arch {arch!r}; choose one of {', '.join(ARCHS)}")
            object.__setattr__(self, "arch", arch)
        elif self.arch is not None:
            raise SessaExportError(f"--arch is for --target cuda, not {self.name}")
        hosts = {"cpu": tuple(HOSTS), "metal": METAL_HOSTS, "cuda": ()}[self.name]
        if self.host is not None and self.host not in hosts:
            if not hosts:
                raise SessaExportError(f"--host is not supported for --target {self.name} (host code is for this machine)")
            raise SessaExportError(f"unknown --host {self.host!r} for --target {self.name}; choose one of {', '.join(hosts)}")
        if self.name == "metal" and self.host is None:
            object.__setattr__(self, "host", METAL_HOSTS[0])

    @property
    def gpu(self) -> bool:
        return self.name in ("cuda", "metal")

    @property
    def library_name(self) -> str:
        if self.name == "metal":
            return "model.a" if _llvm_ar() else "model.tar"
        return "model.so"

    def host_target(self):
        """The LLVM target of the host code: this machine for cpu, else as `tvm_target` sets it."""
        target = self.tvm_target()
        return target.host if self.gpu else target

    def tvm_target(self):
        """The TVM target, as the target's module in targets/ builds it: cpu for this machine (its
        CPU model) or a generic CPU of the --host triple; GPU host code for a generic CPU."""
        from .targets import cpu, cuda, metal

        if self.name == "cuda":
            return cuda.target(self.arch)
        if self.name == "metal":
            return metal.target(self.host)
        return cpu.target(self.host)

    def describe(self) -> str:
        if self.name == "cuda":
            return f"cuda ({self.arch})"
        if self.name == "metal":
            return f"metal ({self.host})"
        return f"cpu ({self.host or 'this machine'})"


def _llvm_ar() -> str | None:
    return shutil.which("llvm-ar") or next((shutil.which(f"llvm-ar-{v}") for v in range(22, 13, -1)
                                            if shutil.which(f"llvm-ar-{v}")), None)


# -- Relax builder -------------------------------------------------------------------------------
class _Builder:
    """Emits Relax bindings for one StepGraph on a BlockBuilder: one method per op."""

    def __init__(self, graph: StepGraph, capacity: int, target: CompileTarget, dtype: str = "float32",
                 quantization: str | None = None) -> None:
        from tvm import relax, tirx

        self.graph, self.capacity, self.target, self.dtype = graph, capacity, target, dtype
        self.quantization = check_quantization(quantization, target)
        self.quantized: dict[str, tuple[int, int]] = {}  # path -> (in, out) of each quantized weight
        self.kept: list[str] = []  # linear layers left in float32 under --quantization (see `linear`)
        self.rx, self.tirx = relax, tirx
        self.bb = relax.BlockBuilder()
        self.decode = False
        self.values: dict[str, object] = {}
        self.kernels: dict[tuple, object] = {}
        self.consts: dict[str, object] = {}

    # -- helpers ---------------------------------------------------------------------------------
    def const(self, array, name: str, dtype: str | None = None):
        """A weight or small constant bound into the module (named once)."""
        if name not in self.consts:
            if isinstance(array, torch.Tensor):
                array = array.detach().cpu().float().numpy() if (dtype or self.dtype) == "float32" else array.detach().cpu().numpy()
            array = np.ascontiguousarray(np.asarray(array, dtype=dtype or self.dtype))
            self.consts[name] = self.rx.const(array)
        return self.consts[name]

    def scalar(self, value: float):
        return self.rx.const(np.array(value, dtype=self.dtype))

    def emit(self, expr, name: str = ""):
        return self.bb.emit(expr, name_hint=name)

    def tensor_type(self, shape, dtype: str | None = None):
        return self.rx.TensorType(list(shape), dtype or self.dtype)

    def linear(self, x, module: torch.nn.Linear, path: str, head: bool = False):
        """x @ W^T + b: W packed in panels on CPU, stored transposed ([in, out]) on GPUs,
        group-quantized under --quantization."""
        from .targets import cpu

        op = self.rx.op
        panel = None if self.target.gpu else cpu.weight_panel(module.out_features)
        if self.quantization is not None:  # CPU only (check_quantization)
            # Kept in float32: the LM head; layers whose inputs are not whole groups or whose outputs
            # fill no panel; and layers with fewer than 16 outputs (gamma_ctx has one), which hold a
            # negligible share of the weights.
            if not head and module.in_features % GROUP_SIZE == 0 and module.out_features >= 16 and panel:
                return self.quantized_linear(x, module, path, panel)
            if path not in self.kept:
                self.kept.append(path)
        if panel is None:
            y = self.emit(op.matmul(x, self.const(module.weight.T, f"{path}.weight")))
            if module.bias is not None:
                y = self.emit(op.add(y, self.const(module.bias, f"{path}.bias")))
            return y
        # CPU: the weight in panels (targets/cpu.py)
        weight = self.consts.get(f"{path}.weight")
        if weight is None:  # the decode and prefill bodies both emit this layer: pack its weight once
            weight = self.const(cpu.pack_weight(module.weight.detach().cpu().float().numpy(), panel), f"{path}.weight")
        bias = None if module.bias is None else self.const(module.bias.reshape(-1, panel), f"{path}.bias")
        return cpu.emit_linear(self.bb, x, weight, bias, [self.batch, self.seq, module.out_features])

    def quantized_linear(self, x, module: torch.nn.Linear, path: str, panel: int):
        """x @ W^T + b through ops/tvm_dequant_matmul.py: int8 / packed int4 weight in panels of
        `panel` columns and a float32 scale per group of GROUP_SIZE inputs, dequantized inside the
        matmul kernel."""
        from .ops import tvm_dequant_matmul as dq

        K, N, mode, bias, decode = module.in_features, module.out_features, self.quantization, \
            module.bias is not None, self.decode
        if f"{path}.weight.q" not in self.consts:
            q, scales = dq.quantize(module.weight.detach().cpu().float().numpy(), mode, panel, GROUP_SIZE)
            self.consts[f"{path}.weight.q"] = self.rx.const(q)
            self.consts[f"{path}.weight.scales"] = self.rx.const(scales)
            self.quantized[path] = (K, N)
        gv = self.kernel(("dequant_matmul", K, N, mode, bias, decode), lambda: (
            f"dequant_matmul_{mode}_k{K}_n{N}" + ("_bias" if bias else "") + ("_decode" if decode else ""),
            dq.dequant_matmul_kernel(K, N, mode, bias, panel, GROUP_SIZE, decode)))
        args = [x, self.consts[f"{path}.weight.q"], self.consts[f"{path}.weight.scales"]]
        if bias:
            args.append(self.const(module.bias.reshape(-1, panel), f"{path}.bias"))
        y = self.emit(self.rx.op.call_tir(gv, args, self.tensor_type([self.batch, self.seq, N // panel, panel])))
        return self.emit(self.rx.op.memory.view(y, self.rx.ShapeExpr([self.batch, self.seq, N])))

    def kernel(self, key: tuple, build: Callable):
        """Add a PrimFunc once per distinct shape key; returns its GlobalVar."""
        if key not in self.kernels:
            name, func = build()
            self.kernels[key] = self.bb.add_func(func.with_attr("global_symbol", name), name)
        return self.kernels[key]

    # -- ops ---------------------------------------------------------------------------------
    def mixer(self, a, mixer: SessaMixer, path: str, index: int):
        """Forward attention f (KV append in place), gain γ and FeedbackAttention (state in place)."""
        from .ops import tvm_attention

        op, rx = self.rx.op, self.rx
        H, Hkv, d, D = mixer.n_heads, mixer.n_kv_heads, mixer.head_dim, mixer.D
        B, S, P, C = self.batch, self.seq, self.past, self.capacity
        key_cache, value_cache, fb_key_cache, fb_state_cache = self.caches[index]
        q = self.linear(a, mixer.q_proj, f"{path}.q_proj")
        k = self.linear(a, mixer.k_proj, f"{path}.k_proj")
        v = self.linear(a, mixer.v_proj, f"{path}.v_proj")
        rope = bool(mixer.use_forward_rope)
        inv_freq = (mixer.rope_inv_freq.float() if rope else torch.zeros(max(1, d // 2)))
        attention = self.attention_kernel(mixer)
        out = self.emit(op.call_tir_inplace(
            attention, [q, k, v, self.const(inv_freq, f"{path}.rope_inv_freq", "float32"), key_cache, value_cache,
                        rx.prim_value(P)],
            tvm_attention.inplace_indices(),
            [self.tensor_type([B, Hkv, C, d]), self.tensor_type([B, Hkv, C, d]), self.tensor_type([B, S, H * d])]),
            f"attention_{index}")
        heads = self.emit(rx.TupleGetItem(out, 2))
        f = heads if H == 1 else self.linear(heads, mixer.out_proj, f"{path}.out_proj")
        fb = self.linear(a, mixer.proj_fb, f"{path}.proj_fb")
        parts = self.emit(op.split(fb, [D], axis=-1))
        q_b, k_b = self.emit(rx.TupleGetItem(parts, 0)), self.emit(rx.TupleGetItem(parts, 1))
        ctx = self.linear(a, mixer.gamma_ctx, f"{path}.gamma_ctx")
        gain = self.emit(op.multiply(
            op.tanh(op.add(ctx, self.const(mixer.gamma_bias.reshape(1), f"{path}.gamma_bias"))),
            self.const(np.array([mixer.gamma_max]), f"{path}.gamma_max")))
        feedback = self.feedback_kernel(D, self.decode)
        result = self.emit(op.call_tir_inplace(
            feedback, [q_b, k_b, f, gain, fb_key_cache, fb_state_cache, rx.prim_value(P)], [4, 5, -1],
            [self.tensor_type([B, C, D]), self.tensor_type([B, C, D]), self.tensor_type([B, S, D])]),
            f"feedback_{index}")
        return self.emit(rx.TupleGetItem(result, 2))

    def attention_kernel(self, mixer: SessaMixer):
        """GlobalVar of the forward-attention kernel for this head layout (one per layout)."""
        from .ops import tvm_attention

        H, Hkv, d, rope = mixer.n_heads, mixer.n_kv_heads, mixer.head_dim, bool(mixer.use_forward_rope)
        return self.kernel(
            ("attention", H, Hkv, d, rope),
            lambda: (f"forward_attention_h{H}_kv{Hkv}_d{d}" + ("_rope" if rope else ""),
                     tvm_attention.forward_attention_kernel(H, Hkv, d, rope, self.dtype, gpu=self.target.gpu)))

    def feedback_kernel(self, D: int, decode: bool):
        """GlobalVar of ops/tvm_kernels.py's decode (S = 1) or prefill kernel, scheduled for the target."""
        from .ops import tvm_kernels

        name = tvm_kernels.DECODE if decode else tvm_kernels.PREFILL
        if ("feedback", D) not in self.kernels:
            kernels = feedback_kernels(self.target, D, self.dtype)
            self.kernels[("feedback", D)] = {
                key: self.bb.add_func(func.with_attr("global_symbol", f"{key}_d{D}"), f"{key}_d{D}")
                for key, func in kernels.items()}
        return self.kernels[("feedback", D)][name]

    def node(self, node: Node):
        op, rx = self.rx.op, self.rx
        args = [self.values[i] if isinstance(i, str) else i for i in node.inputs]
        if node.op == "embedding":
            # "clip" keeps an out-of-range id inside the table (runners check ids; C++ hosts may not)
            return self.emit(op.take(self.const(node.module.weight, f"{node.path}.weight"), args[0], axis=0,
                                     mode="clip"))
        if node.op == "linear":  # the LM head (a graph output) stays float32
            return self.linear(args[0], node.module, node.path, head=node.output in self.graph.outputs.values())
        if node.op == "layer_norm":
            weight, bias = layer_norm_affine(node.module)
            return self.emit(op.nn.layer_norm(args[0], self.const(weight, f"{node.path}.weight"),
                                              self.const(bias, f"{node.path}.bias"), axes=[-1],
                                              epsilon=float(node.attrs["eps"])))
        if node.op == "gelu":
            gelu = op.nn.gelu_tanh if node.attrs.get("approximate", "none") == "tanh" else op.nn.gelu
            return self.emit(gelu(args[0]))
        if node.op == "silu":
            return self.emit(op.nn.silu(args[0]))
        if node.op == "relu":
            return self.emit(op.nn.relu(args[0]))
        if node.op in ("tanh", "sigmoid"):
            return self.emit(getattr(op, node.op)(args[0]))
        if node.op == "identity":
            return args[0]
        if node.op in BINARY:
            lhs, rhs = (a if not isinstance(a, float) else self.scalar(a) for a in args)
            fn = {"add": op.add, "sub": op.subtract, "mul": op.multiply, "div": op.divide}[node.op]
            return self.emit(fn(lhs, rhs))
        if node.op == "split":
            sizes = split_sizes(node, self.widths[node.inputs[0]])
            indices = list(np.cumsum(sizes)[:-1].tolist())
            parts = self.emit(op.split(args[0], indices, axis=-1))
            return tuple(self.emit(rx.TupleGetItem(parts, k)) for k in range(len(sizes)))
        if node.op == "getitem":
            return args[0][node.attrs["index"]]
        if node.op == "mixer":
            return self.mixer(args[0], node.module, node.path, node.attrs["index"])
        raise SessaExportError(f"the TVM back end cannot lower op {node.op!r} (node {node.output})")

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
        for layer in g.state_layout():
            i, Hkv, d, D = layer["layer"], layer["n_kv_heads"], layer["head_dim"], layer["d_model"]
            shapes = {"key": [B, Hkv, C, d], "value": [B, Hkv, C, d], "feedback_key": [B, C, D],
                      "feedback_state": [B, C, D]}
            caches.append([rx.Var(f"{f}_{i}", self.tensor_type(shapes[f])) for f in STATE_FIELDS])
            params += caches[-1]
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
                    self.values[node.output] = self.node(node)
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
        self.widths = feature_widths(self.graph)
        for mixer in self.graph.mixers:  # kernels first: one that fails to build fails before any function
            self.attention_kernel(mixer)
            for decode in (True, False):
                self.feedback_kernel(mixer.D, decode)
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


def feedback_kernels(target: CompileTarget, d_model: int, dtype: str = "float32") -> dict:
    """Both FeedbackAttention PrimFuncs (decode, prefill) tiled and scheduled for `target` by its
    module in targets/ (`ops/tvm_kernels.scheduled_kernels`)."""
    from .ops import tvm_kernels

    options = {"cpu": {"triple": target.host}, "cuda": {"arch": target.arch},
               "metal": {"triple": target.host}}[target.name]
    try:
        _, kernels = tvm_kernels.scheduled_kernels(target.name, d_model, dtype, d_model ** -0.5, **options)
    except Exception as exc:  # s_tir raises ScheduleError & co. with the whole PrimFunc in the message
        raise SessaExportError(f"the FeedbackAttention kernels (D={d_model}) could not be scheduled for "
                               f"{target.describe()}: {_last_line(exc)}") from None
    return kernels


def check_quantization(quantization: str | None, target: CompileTarget | None = None) -> str | None:
    """None for float32 weights, else one of QUANTIZATIONS (q8, q4), supported for --target cpu."""
    if quantization in (None, "none"):
        return None
    if quantization not in QUANTIZATIONS:
        raise SessaExportError(f"unknown --quantization {quantization!r}; choose one of none, "
                               f"{', '.join(QUANTIZATIONS)}")
    if target is not None and target.name != "cpu":
        raise SessaExportError(f"--quantization {quantization} is supported for --target cpu only, "
                               f"not {target.name}")
    return quantization


def build_module(graph: StepGraph, capacity: int, target: CompileTarget | None = None,
                 quantization: str | None = None):
    """The step graph as a Relax IRModule (not yet lowered)."""
    return _Builder(graph, capacity, target or CompileTarget(), quantization=quantization).build()


# -- lowering and export -------------------------------------------------------------------------
def lower(mod, target: CompileTarget):
    """Run the Relax pipeline for `target` and build the VM executable (not yet exported).

    GPU targets use the target's default Relax pipeline, which schedules the position-wise
    PrimFuncs with dlight's default rules (Matmul, GEMV, Reduction, GeneralReduction, Fallback);
    the attention kernels are marked scheduled and left alone. CPU uses `cpu_pipeline`: the default
    LLVM pipeline with targets/cpu.py's CpuMatmul (parallel, vectorised matmuls) and CpuElementwise
    (parallel position-wise functions) rules.
    """
    import tvm

    tvm_target = target.tvm_target()
    pipeline = gpu_pipeline(tvm_target) if target.gpu else cpu_pipeline(tvm_target)
    return tvm.compile(mod, target=tvm_target, relax_pipeline=pipeline)


def gpu_pipeline(tvm_target):
    """Relax's generic GPU pipeline with dlight's default schedules for the position-wise PrimFuncs.

    CUDA gets dlight's Matmul rule too; Metal does not (its simdgroup matmul path crashes in
    TVM 0.27's tensorize), so Metal matmuls are scheduled by GEMV / Reduction / Fallback.
    """
    import tvm
    from tvm import relax
    from tvm.relax.backend.gpu_generic import pipeline as backend
    from tvm.s_tir import dlight as dl

    rules = [dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(), dl.gpu.Fallback()]
    if tvm_target.kind.name == "cuda":
        rules.insert(0, dl.gpu.Matmul())
    legalize = [relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(),
                relax.transform.FoldConstant(), relax.transform.FuseOps(), relax.transform.FuseTIR(),
                dl.ApplyDefaultSchedule(*rules)]

    @tvm.transform.module_pass(opt_level=0, name="SessaGpuPipeline")
    def _pipeline(mod, _ctx):
        with tvm_target:
            seq = tvm.transform.Sequential(
                backend.library_dispatch_passes(tvm_target) + legalize
                + backend.dataflow_lower_passes(tvm_target) + backend.finalize_passes(tvm_target))
            return seq(mod)

    return _pipeline


def cpu_pipeline(tvm_target):
    """The default Relax CPU pipeline with targets/cpu.py's rules scheduling the matmuls and the
    position-wise functions."""
    import tvm
    from tvm.relax.backend.cpu_generic import pipeline as backend
    from tvm.s_tir import dlight as dl

    from .targets.cpu import CpuElementwise, CpuMatmul

    @tvm.transform.module_pass(opt_level=0, name="SessaCpuPipeline")
    def _pipeline(mod, _ctx):
        with tvm_target:
            seq = tvm.transform.Sequential(
                backend.library_dispatch_passes(tvm_target) + backend.legalize_passes(tvm_target)
                + [dl.ApplyDefaultSchedule(CpuMatmul(), CpuElementwise())]
                + backend.dataflow_lower_passes(tvm_target) + backend.finalize_passes(tvm_target))
            return seq(mod)

    return _pipeline


def _device_modules(executable, kind: str) -> list:
    found, stack, seen = [], [executable.mod], set()
    while stack:
        module = stack.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        if module.kind == kind:
            found.append(module)
        stack.extend(module.imports)
    return found


def _export_cpu(executable, path: Path, target: CompileTarget, workspace: Path) -> None:
    from tvm.support import cc

    fcompile = None
    if target.host is not None:
        compiler = HOSTS[target.host]
        if shutil.which(compiler) is None:
            raise SessaExportError(f"cross compiling for {target.host} needs {compiler} on PATH "
                                   f"(Debian/Ubuntu: apt-get install g++-{target.host})")
        fcompile = cc.cross_compiler(compiler)
    executable.mod.export_library(str(path), fcompile=fcompile, fpack_imports=_elf_blob_packer(),
                                  workspace_dir=str(workspace))


def _elf_blob_packer(transform: Callable[[bytes], bytes] | None = None):
    """An `fpack_imports` for ELF libraries: the import blob (VM bytecode, weights, device code)
    goes into .rodata with an assembler `.incbin` instead of an LLVM constant array, which takes
    LLVM minutes and gigabytes for a few hundred MB of weights. `transform` may rewrite the blob."""
    import tvm

    blob_name = tvm.get_global_func("runtime.ModuleImportsBlobName")()

    def pack_imports(module, is_system_lib, prefix, workdir):
        blob = tvm.get_global_func("runtime.ModulePackImportsToTensor")(module).numpy().tobytes()
        if transform is not None:
            blob = transform(blob)
        blob_file = Path(workdir) / "devc.bin"
        blob_file.write_bytes(blob)
        symbol = f"{prefix}{blob_name}"
        asm = Path(workdir) / "devc.S"
        asm.write_text(
            f"    .section .rodata\n    .globl {symbol}\n    .type {symbol}, %object\n    .p2align 4\n"
            f'{symbol}:\n    .incbin "{blob_file}"\n    .size {symbol}, . - {symbol}\n'
            '    .section .note.GNU-stack,"",%progbits\n')
        return str(asm)

    return pack_imports


def _export_cuda(executable, path: Path, target: CompileTarget, workspace: Path) -> None:
    """model.so with the kernels compiled by nvcc into a fatbin for `target.arch` (SASS + PTX).

    TVM 0.27 keeps CUDA *source* in the library and compiles it when the library is loaded,
    through a Python callback; a C++ deployment has no Python, so the source is compiled here
    and the library's import blob is rewritten to carry the fatbin (format "fatbin").
    """
    if shutil.which("nvcc") is None:
        raise SessaExportError("--target cuda needs nvcc (the CUDA toolkit) on PATH")
    devices = _device_modules(executable, "cuda")
    if len(devices) != 1:
        raise SessaExportError(f"expected one CUDA device module in the build, found {len(devices)}")
    source = devices[0].inspect_source("cuda")
    fatbin = _nvcc_fatbin(source, target, workspace)
    packer = _elf_blob_packer(lambda blob: _replace_cuda_code(blob, source.encode(), fatbin))
    executable.mod.export_library(str(path), fpack_imports=packer, workspace_dir=str(workspace))
    (path.parent / "model.cu").write_text(source)


def _nvcc_fatbin(source: str, target: CompileTarget, workspace: Path) -> bytes:
    number = target.arch.removeprefix("sm_")
    src, out = workspace / "kernels.cu", workspace / "kernels.fatbin"
    src.write_text(source)
    cmd = ["nvcc", "--fatbin", "-O3", "-gencode", f"arch=compute_{number},code=sm_{number}",
           "-gencode", f"arch=compute_{number},code=compute_{number}", "--expt-relaxed-constexpr",
           "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__", "-o", str(out), str(src)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise SessaExportError(f"nvcc failed for {target.arch}:\n{result.stderr.strip()[-2000:]}")
    return out.read_bytes()


def _read_u64(blob, offset: int) -> tuple[int, int]:
    return int.from_bytes(blob[offset:offset + 8], "little"), offset + 8


def _replace_cuda_code(blob: bytes, source: bytes, fatbin: bytes) -> bytes:
    """Rewrite the import blob so the CUDA module's payload is [fmt "fatbin"][fmap][fatbin].

    Blob layout (tvm-ffi module serialization): u64 size, the import tree (u64-counted row_ptr
    and child_indices arrays), then per module a u64-length kind string and, except for the
    "_lib" placeholder, a u64-length payload. A CUDA payload is [fmt][fmap][code] with the code
    last; fmt is "cuda" and code is the source when TVM left it to be compiled at load time.
    """
    view = memoryview(blob)
    offset = 8
    for _ in range(2):  # row_ptr, child_indices
        count, offset = _read_u64(view, offset)
        offset += 8 * count
    pieces, start = [], 0
    while offset < len(blob):
        length, offset = _read_u64(view, offset)
        kind = bytes(view[offset:offset + length]).decode()
        offset += length
        if kind == "_lib":
            continue
        size, payload_at = _read_u64(view, offset)
        end = payload_at + size
        if kind == "cuda":
            fmt_len, at = _read_u64(view, payload_at)
            fmt = bytes(view[at:at + fmt_len]).decode()
            code_len = len(source)
            code_at = end - code_len
            if fmt != "cuda" or _read_u64(view, code_at - 8)[0] != code_len or bytes(view[code_at:end]) != source:
                raise SessaExportError(f"unexpected CUDA module layout in the library (format {fmt!r}); "
                                       "this TVM version is not supported for --target cuda")
            fmap = bytes(view[at + fmt_len:code_at - 8])
            payload = (_u64(6) + b"fatbin" + fmap + _u64(len(fatbin)) + fatbin)
            pieces += [view[start:offset], _u64(len(payload)), payload]
            start = end
        offset = end
    pieces.append(view[start:])
    body = b"".join(bytes(p) for p in pieces)[8:]
    return _u64(len(body)) + body


def _last_line(exc: BaseException) -> str:
    """The last line of an exception message that says something (TVM messages end with it)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


def _u64(value: int) -> bytes:
    return int(value).to_bytes(8, "little")


def _export_metal(executable, path: Path, target: CompileTarget, workspace: Path) -> None:
    """Mach-O arm64 objects (host code + the import blob with the Metal source) as model.a / model.tar."""
    from tvm.support import tar as tar_util

    devices = _device_modules(executable, "metal")
    if len(devices) != 1:
        raise SessaExportError(f"expected one Metal device module in the build, found {len(devices)}")
    (path.parent / "model.metal").write_text(devices[0].inspect_source("metal") or devices[0].inspect_source(""))
    tar_path = workspace / "model.tar"
    (workspace / "objects").mkdir()
    executable.export_library(str(tar_path), fcompile=tar_util.tar, workspace_dir=str(workspace / "objects"))
    if path.suffix == ".tar":
        shutil.copyfile(tar_path, path)
        return
    members = workspace / "members"
    members.mkdir()
    with tarfile.open(tar_path) as archive:
        names = [m.name for m in archive.getmembers() if m.isfile()]
        archive.extractall(members, filter="data")
    objects = sorted(str(members / name) for name in names)
    result = subprocess.run([_llvm_ar(), "rcs", "--format=darwin", str(path), *objects],
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise SessaExportError(f"llvm-ar failed: {result.stderr.strip()}")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def resolve_capacity(graph: StepGraph, max_len: int | None) -> int:
    """Compiled capacity C: --max-len, else the model's max_len, else DEFAULT_CAPACITY."""
    if max_len is not None:
        if max_len < 1:
            raise SessaExportError(f"--max-len must be a positive integer, got {max_len}")
        if graph.max_len is not None and max_len > graph.max_len:
            raise SessaExportError(f"--max-len {max_len} exceeds the model's max_len={graph.max_len}")
        return int(max_len)
    return int(graph.max_len or DEFAULT_CAPACITY)


def compile_graph(graph: StepGraph, out: str | Path, target: CompileTarget | None = None,
                  max_len: int | None = None, progress: Callable[[str], None] = lambda _: None,
                  source: str | None = None, quantization: str | None = None, factory: str | None = None) -> Path:
    """Compile `graph` for `target` into OUT/ (library + sessa_config.json); nothing left on failure.

    `source` (the checkpoint or weights) and `factory` (a custom model's package.module:factory) are
    recorded for `validate`.

    `quantization` "q8" / "q4" stores the linear layers' weights (all but the LM head) as int8 /
    packed int4 with a float32 scale per GROUP_SIZE inputs, dequantized inside the matmul kernels.
    """
    from . import __version__
    from .onnx_export import export_manifest

    target = target or CompileTarget()
    quantization = check_quantization(quantization, target)
    out = Path(out)
    check_replaceable(out, MANIFEST_NAME, ARTIFACT_KIND)  # before minutes of compiling, not after
    capacity = resolve_capacity(graph, max_len)
    started = time.perf_counter()
    progress(f"building the Relax module (capacity {capacity}"
             + (f", {quantization} weights)" if quantization else ")"))
    builder = _Builder(graph, capacity, target, quantization=quantization)
    mod = builder.build()
    progress(f"compiling for {target.describe()}")
    try:
        executable = lower(mod, target)
    except SessaExportError:
        raise
    except Exception as exc:  # TVM raises its own error types from the pipeline and codegen
        raise SessaExportError(f"TVM could not compile the model for {target.describe()}: "
                               f"{_last_line(exc)}") from None
    library = target.library_name
    with atomic_directory(out, MANIFEST_NAME, ARTIFACT_KIND) as tmp, tempfile.TemporaryDirectory(prefix="sessa-tvm-") as work:
        progress(f"writing {library}")
        export = {"cpu": _export_cpu, "cuda": _export_cuda, "metal": _export_metal}[target.name]
        try:
            export(executable, tmp / library, target, Path(work))
        except (SessaExportError, KeyboardInterrupt):
            raise
        except Exception as exc:  # compilers, linkers and TVM's exporters raise many types
            raise SessaExportError(f"writing {library} for {target.describe()} failed: {_last_line(exc)}") from None
        files = {name: _sha256(tmp / name) for name in sorted(os.listdir(tmp))}
        manifest = export_manifest(graph, "tvm", {
            "target": target.name, "arch": target.arch, "host": target.host,
            "triple": str(target.host_target().attrs["mtriple"]),
            "tvm_target": str(target.tvm_target()),
            "capacity": capacity, "library": library, "entry": ENTRY,
            "files": files, "tvm_version": _tvm_version(), "compiled_by": __version__,
            "calling_convention": calling_convention(graph),
            "compile_seconds": round(time.perf_counter() - started, 2),
            "source": source, "factory": factory,
        })
        if quantization is not None:
            values = sum(k * n for k, n in builder.quantized.values())
            bits = MODES[quantization]
            manifest["quantization"] = {
                "mode": quantization, "group_size": GROUP_SIZE, "bits": bits,
                "symmetric": True, "packed": quantization == "q4",
                "quantized_weights": sorted(builder.quantized), "kept": builder.kept,
                "float_weight_bytes": 4 * values,
                "quantized_weight_bytes": values * bits // 8 + 4 * values // GROUP_SIZE,
            }
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
    return out


def calling_convention(graph: StepGraph) -> dict:
    """How a host program calls `step`: argument order and meaning (also in the manifest)."""
    args = [f"{graph.input_name}: " + ("int64 [batch, seq_len]" if graph.input_kind == "tokens"
                                       else f"float32 [batch, seq_len, {graph.input_width}]"),
            "past: shape tuple (P,), positions already in the caches"]
    for layer in graph.state_layout():
        i = layer["layer"]
        args += [f"key_{i}: float32 [batch, {layer['n_kv_heads']}, capacity, {layer['head_dim']}]",
                 f"value_{i}: float32 [batch, {layer['n_kv_heads']}, capacity, {layer['head_dim']}]",
                 f"feedback_key_{i}: float32 [batch, capacity, {layer['d_model']}]",
                 f"feedback_state_{i}: float32 [batch, capacity, {layer['d_model']}]"]
    return {"function": ENTRY, "arguments": args, "returns": list(graph.outputs),
            "in_place": "rows P..P+seq_len-1 of every cache are written; P + seq_len <= capacity"}


def _tvm_version() -> str:
    import tvm

    return tvm.__version__
