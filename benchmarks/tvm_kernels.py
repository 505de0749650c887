"""The TVM CPU kernels of one 125M-class layer, alone: where a TVM step's time goes.

Times (median of --repeat calls, after one untimed call), at the 125M config's shapes (D = 768,
12 heads of 64, vocab 32000):
- the forward-attention kernel (`ops/tvm_attention.py`): decode (S = 1 at context P) and
  prefill (S = T from an empty cache);
- the FeedbackAttention kernels (`ops/tvm_kernels.py` with `targets/cpu.py`'s rule): decode,
  and prefill with D cut into 1 and 2 chunks; and a decode step's pass over --layers layers' caches
  (default 12; 96 to read them from memory) with the keys in 1 slice and in the rule's
  DECODE_KEY_SPLITS; the forward attention's decode (--layers layers) with vectors of 16 and of 8
  lanes, in turns; each with the read bandwidth of its caches;
- exact GELU over T x D from Relax's `gelu` (libm's erf) and from `positionwise.gelu_te`, in turns;
- the LM head's matrix-vector product (768 x 32000) the way the compiler emits it: `--layout
  packed` (the CPU panel layout) or `plain` (W^T as [in, out], through Relax's matmul; what GPUs
  get), with its read bandwidth;
- the float32 prefill matmul of the q/k/v-sized product (T x 768 @ 768 x 2304, packed panels), in
  GFLOP/s.

Run it on an older install (`pip install --no-deps --target DIR <checkout>`, then
`PYTHONPATH=DIR python benchmarks/tvm_kernels.py --layout plain --threads 2`) to compare
kernels across commits with one script.

Every kernel is built for `--cpu` (default native, as benchmarks/tvm_cpu.py builds).

Run: python benchmarks/tvm_kernels.py [--threads N] [--context 1024] [--layout packed|plain] [--cpu NAME]
     [--layers 12]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DECODE_CONTEXT, median_ms, median_ms_in_turns, print_table, tvm_linear  # noqa: E402

HEADS, HEAD_DIM, VOCAB = 12, 64, 32000
D = HEADS * HEAD_DIM
CPU = {"cpu": "native"}  # compile --cpu of every kernel here (main sets it from --cpu)


def target():
    """The TVM target of the kernels: targets/cpu.py's for --cpu."""
    from sessa_export.targets import cpu

    return cpu.tvm_target(**CPU)


def attention_ms(seq: int, past: int, repeat: int) -> float:
    import tvm

    from sessa_export.ops import tvm_attention
    from sessa_export.targets import cpu

    func = tvm_attention.forward_attention_kernel(HEADS, HEADS, HEAD_DIM, True, "float32", rule_attention_tiling()).with_attr("global_symbol", "attn")
    lib = tvm.compile(tvm.IRModule({"attn": func}), target=target())
    rng = np.random.default_rng(0)
    capacity = past + seq
    q, k, v = (rng.standard_normal((1, seq, D)).astype(np.float32) for _ in range(3))
    inv_freq = (10000.0 ** (-np.arange(0, HEAD_DIM, 2) / HEAD_DIM)).astype(np.float32)
    caches = [rng.standard_normal((1, HEADS, capacity, HEAD_DIM)).astype(np.float32) for _ in range(2)]
    args = [tvm.runtime.tensor(a) for a in (q, k, v, inv_freq, *caches)]
    out = tvm.runtime.tensor(np.zeros((1, seq, D), np.float32))
    return median_ms(lambda: lib["attn"](*args, past, out), repeat)


def rule_attention_tiling():
    """targets/cpu.py's forward-attention tiling for its default target."""
    from sessa_export.targets import cpu

    try:
        return cpu.attention_tiling(HEAD_DIM, target())
    except TypeError:  # an install from before the prefill register tiles: no target argument
        return cpu.attention_tiling(HEAD_DIM)


def feedback_ms(seq: int, past: int, d_chunks: int, repeat: int) -> float:
    import tvm

    from sessa_export.ops import tvm_kernels
    from sessa_export.targets import build_feedback_attention

    lib = build_feedback_attention("cpu", D, "float32", d_chunks=d_chunks, **CPU)
    rng = np.random.default_rng(0)
    steps = [rng.standard_normal((1, seq, D)).astype(np.float32) for _ in range(3)]
    gain = rng.uniform(-0.9, 0.9, (1, seq, 1)).astype(np.float32)
    caches = [rng.standard_normal((1, past + seq, D)).astype(np.float32) for _ in range(2)]
    args = [tvm.runtime.tensor(a) for a in (*steps, gain, *caches)]
    out = tvm.runtime.tensor(np.zeros((1, seq, D), np.float32))
    kernel = lib[tvm_kernels.DECODE if seq == 1 else tvm_kernels.PREFILL]
    return median_ms(lambda: kernel(*args, past, out), repeat)


def feedback_layers_ms(past: int, key_splits: tuple[int, ...], repeat: int, layers: int = 12) -> dict[int, float]:
    """One decode step's FeedbackAttention over `layers` layers' caches (more than the L3 holds), its
    keys cut into each of `key_splits` slices, timed in turns: what a batch-1 decode step reads."""
    import dataclasses

    import tvm

    from sessa_export.ops import tvm_kernels
    from sessa_export.targets import cpu

    tgt, kernels = target(), {}
    for n in key_splits:
        tilings = cpu.feedback_tilings(D, tgt)
        tilings[tvm_kernels.DECODE] = dataclasses.replace(tilings[tvm_kernels.DECODE], key_splits=n)
        func = cpu.schedule_feedback_attention(
            tvm_kernels.feedback_attention_kernels(D, "float32", None, tilings)[tvm_kernels.DECODE], tgt)
        kernels[n] = tvm.compile(tvm.IRModule({tvm_kernels.DECODE: func}), target=tgt)[tvm_kernels.DECODE]
    rng = np.random.default_rng(0)
    steps = [tvm.runtime.tensor(rng.standard_normal((1, 1, D)).astype(np.float32)) for _ in range(3)]
    gain = tvm.runtime.tensor(np.full((1, 1, 1), 0.5, np.float32))
    caches = [[tvm.runtime.tensor(rng.standard_normal((1, past + 1, D)).astype(np.float32)) for _ in range(2)]
              for _ in range(layers)]
    out = tvm.runtime.tensor(np.zeros((1, 1, D), np.float32))
    return median_ms_in_turns({n: lambda kernel=kernel: [kernel(*steps, gain, *layer, past, out) for layer in caches]
                               for n, kernel in kernels.items()}, repeat)


def attention_lanes_ms(seq: int, past: int, lanes: tuple[int, ...], repeat: int, layers: int) -> dict[int, float]:
    """The forward-attention kernel built with each of `lanes` (the decode's vectors), timed in turns:
    a step over `layers` layers' caches (decode: more than the L3 holds)."""
    import dataclasses

    import tvm

    from sessa_export.ops import tvm_attention
    from sessa_export.targets import cpu

    kernels = {}
    for n in lanes:
        func = tvm_attention.forward_attention_kernel(HEADS, HEADS, HEAD_DIM, True, "float32",
                                                      dataclasses.replace(rule_attention_tiling(), lanes=n))
        kernels[n] = tvm.compile(tvm.IRModule({"attn": func.with_attr("global_symbol", "attn")}),
                                 target=target())["attn"]
    rng = np.random.default_rng(0)
    q, k, v = (tvm.runtime.tensor(rng.standard_normal((1, seq, D)).astype(np.float32)) for _ in range(3))
    inv_freq = tvm.runtime.tensor((10000.0 ** (-np.arange(0, HEAD_DIM, 2) / HEAD_DIM)).astype(np.float32))
    caches = [[tvm.runtime.tensor(rng.standard_normal((1, HEADS, past + seq, HEAD_DIM)).astype(np.float32))
               for _ in range(2)] for _ in range(layers)]
    out = tvm.runtime.tensor(np.zeros((1, seq, D), np.float32))
    return median_ms_in_turns({n: lambda kernel=kernel: [kernel(q, k, v, inv_freq, *layer, past, out) for layer in caches]
                               for n, kernel in kernels.items()}, repeat)


def gelu_ms(rows: int, repeat: int) -> dict[str, float]:
    """Exact GELU over [rows, D] as targets/cpu.py's pipeline builds it, from Relax's `gelu` (libm's erf)
    and from ops/positionwise.py's `gelu_te` (a polynomial erf), timed in turns."""
    import tvm
    from tvm import relax

    from sessa_export.ops import positionwise
    from sessa_export.targets import cpu

    tgt = target()
    forms = {"Relax gelu": lambda bb, x: bb.emit(relax.op.nn.gelu(x)),
             "gelu_te": lambda bb, x: bb.emit_te(positionwise.gelu_te, x)}
    data = tvm.runtime.tensor(np.random.default_rng(2).standard_normal((rows, D)).astype(np.float32))
    calls = {}
    for name, form in forms.items():
        bb = relax.BlockBuilder()
        x = relax.Var("x", relax.TensorType([rows, D], "float32"))
        with bb.function("main", [x]):
            with bb.dataflow():
                out = bb.emit_output(form(bb, x))
            bb.emit_func_output(out)
        vm = relax.VirtualMachine(tvm.compile(bb.get(), target=tgt, relax_pipeline=cpu.pipeline(tgt)), tvm.cpu())
        calls[name] = lambda vm=vm: vm["main"](data)
    return median_ms_in_turns(calls, repeat)


def dense_gflops(rows: int, repeat: int) -> float:
    """The float32 prefill matmul of the fused q/k/v-sized product (rows x D @ D x 3D) the way the CPU
    build emits it (packed panels, CpuMatmul's rule), in GFLOP/s."""
    import tvm

    weight = np.random.default_rng(0).standard_normal((3 * D, D)).astype(np.float32)
    linear = tvm_linear(weight, rows=rows, packed=True, cpu_name=CPU["cpu"])
    data = tvm.runtime.tensor(np.random.default_rng(1).standard_normal((1, rows, D)).astype(np.float32))
    return 2 * rows * D * 3 * D / median_ms(lambda: linear(data), repeat) / 1e6


def lm_head_ms(layout: str, repeat: int) -> float:
    import tvm

    weight = np.random.default_rng(0).standard_normal((VOCAB, D)).astype(np.float32)  # torch layout [out, in]
    head = tvm_linear(weight, rows=1, packed=layout == "packed", cpu_name=CPU["cpu"])
    data = tvm.runtime.tensor(np.random.default_rng(1).standard_normal((1, 1, D)).astype(np.float32))
    return median_ms(lambda: head(data), repeat)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=None, help="TVM threads (default: available cores)")
    parser.add_argument("--context", type=int, default=DECODE_CONTEXT, help="decode context and prefill length")
    parser.add_argument("--layout", choices=("packed", "plain"), default="packed", help="LM head weight layout")
    from sessa_export.targets.cpu import cpu_choices

    parser.add_argument("--cpu", default="native", choices=cpu_choices(None)[0], help="compile --cpu of the kernels (default native, as "
                        "benchmarks/tvm_cpu.py builds; the figures before 2026-12-02 08:00 UTC were the default build)")
    parser.add_argument("--repeat", type=int, default=20, help="timed calls per kernel (prefill: a quarter)")
    parser.add_argument("--layers", type=int, default=12, help="layers' caches the multi-layer decode rows cycle "
                        "through (96 at P = 1024: 1.2 GB, read from memory rather than the L3)")
    args = parser.parse_args(argv)
    if args.layers < 1:
        parser.error(f"--layers must be at least 1, got {args.layers}")
    CPU["cpu"] = args.cpu
    if args.threads is None:  # an install older than runtime.available_cores needs --threads
        from sessa_export.runtime import available_cores

        args.threads = available_cores()
    threads = args.threads
    os.environ["TVM_NUM_THREADS"] = str(threads)  # read when TVM's thread pool starts
    import sessa_export

    from sessa_export.ops import positionwise
    from sessa_export.targets import cpu

    splits = getattr(cpu, "DECODE_KEY_SPLITS", None)  # an install from before split-K decode has none
    print(f"sessa_export from {Path(sessa_export.__file__).parent}; TVM threads {threads}", flush=True)
    T, few, L = args.context, max(3, args.repeat // 4), args.layers
    rows = [
        ("forward attention, decode", f"S=1, P={T}", f"{attention_ms(1, T, args.repeat):.3f}"),
        ("forward attention, prefill", f"S={T}, P=0", f"{attention_ms(T, 0, few):.2f}"),
        ("FeedbackAttention, decode", f"S=1, P={T}", f"{feedback_ms(1, T, 1, args.repeat):.3f}"),
        *((f"FeedbackAttention, decode, {L} layers, {n} key slice{'s' if n > 1 else ''}", f"S=1, P={T}",
           f"{ms:.3f} ({L * 2 * T * D * 4 / ms / 1e6:.1f} GB/s)")
          for n, ms in (feedback_layers_ms(T, (1, splits), args.repeat, L) if splits else {}).items()),
        ("FeedbackAttention, prefill, 1 D chunk", f"S={T}, P=0", f"{feedback_ms(T, 0, 1, few):.2f}"),
        ("FeedbackAttention, prefill, 2 D chunks", f"S={T}, P=0", f"{feedback_ms(T, 0, 2, few):.2f}"),
    ]
    rows += [(f"forward attention, decode, {L} layers, {n} lanes", f"S=1, P={T}",
              f"{ms:.3f} ({L * 2 * T * D * 4 / ms / 1e6:.1f} GB/s)")
             for n, ms in attention_lanes_ms(1, T, (16, 8), args.repeat, L).items()]
    rows.append(("dense float32 matmul (packed rule)", f"{T} x {D} @ {D} x {3 * D}",
                 f"{dense_gflops(T, few):.0f} GFLOP/s"))
    if hasattr(positionwise, "gelu_te"):  # an install from before the polynomial erf has none
        rows += [(f"exact GELU, {name}", f"{T} x {D}", f"{ms:.3f}") for name, ms in gelu_ms(T, args.repeat).items()]
    head = lm_head_ms(args.layout, args.repeat)
    rows.append((f"LM head GEMV ({args.layout} layout)", f"{D} x {VOCAB}",
                 f"{head:.3f} ({D * VOCAB * 4 / head / 1e6:.1f} GB/s)"))
    print_table(("kernel", "shape", "ms per call"), rows,
                title=f"TVM CPU kernels of one 125M-class layer (D={D}, {HEADS} heads of {HEAD_DIM}), {threads} threads")
    return 0


if __name__ == "__main__":
    sys.exit(main())
