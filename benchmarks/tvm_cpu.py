"""TVM CPU against ONNX Runtime and the PyTorch reference, float32, for the 125M-class config.

The model (vocab 32000, d_model 768, 12 layers, 12 heads, random weights) is compiled with
`sessa_export.to_tvm` (`--target cpu`, capacity 2048) and exported to ONNX; then, for each
back end (TVM `TvmRunner`, ONNX Runtime `OrtRunner`, PyTorch `TorchRunner`), timed in turns by
`sessa_export.bench.time_runners`:
- prefill tokens/s: one step over T = 1024 tokens from an empty state (median of 4);
- decode ms/token at a context of 1024: prefill 1024 tokens, then one token per step (median over
  --decode-steps steps, the context growing from 1024).

The decode bound is the memory-bandwidth floor of one decode step: the bytes a step must read
(every weight once - one row of the embedding table - plus the state it attends over: forward
keys/values and feedback keys/states of 1024 positions in all layers) over the machine's read
bandwidth, measured with numpy sums over a 1 GiB array, one slice per thread.

The prefill ceiling is the other way round: the linear layers' FLOPs over the fastest float32
matmul rate measured here (torch's kernels, ONNX Runtime's MatMul or TVM's packed-panel rule, one
q/k/v-sized product).

With --quantized (issue 12's benchmark), in one run: TVM float32, q8 and q4 (`compile --quantization`)
and ONNX Runtime float32, int8 and int4 (`quantize --mode`, MatMulNBits; in-place state exports),
timed in turns at each of --contexts (default 64 and 1024): decode ms/token as a fraction of each
artifact's own bound (every weight but the embedding table, the LM head included, at its precision:
4 bytes, or 8 / 4 bits plus a 16-bit scale per 32 inputs, plus one read of the float32 state of the
context, over the measured read bandwidth), and prefill tokens/s at the largest context as a
fraction of the ceiling (the linear layers' FLOPs at the fastest float32 matmul rate on the
q/k/v-sized product, 1024 x D @ D x 3D, of torch, ONNX Runtime and TVM, measured in the same run);
then the issue's targets, met or not (the TVM q8 / q4 prefill kernels' rate on the same product
against that fastest float32 rate; the attention kernels' share of a prefill from the two kernels
of every layer timed alone after the run, against the TVM fp32 prefill of the run).

Run: python benchmarks/tvm_cpu.py [--threads N] [--context 1024] [--skip-onnx] [--skip-torch] [--config 125m|1b]
     python benchmarks/tvm_cpu.py --quantized [--contexts 64,1024] [--workdir DIR] [--config 1b]
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (CONFIGS, DECODE_CONTEXT, DECODE_STEPS, machine_description, read_bandwidth,  # noqa: E402
                    median_ms, print_table, set_threads, tvm_linear, tvm_quantized_linear, weight_bytes)

from sessa_export.bench import time_runners  # noqa: E402
from sessa_export.model import SessaLM, init_weights  # noqa: E402
from sessa_export.state import STATE_DTYPES  # noqa: E402
from sessa_export.tracer import trace  # noqa: E402


def matmul_rates(cpu_name: str, threads: int, inputs: int, rows: int = 1024, repeat: int = 10,
                 quantized: tuple[str, ...] = ()) -> dict[str, float]:
    """FLOP/s of one float32 [rows, inputs] @ [inputs, 3 x inputs] product (the size of a prefill's
    q/k/v projections) with torch (the reference's kernels), ONNX Runtime (one MatMul: MLAS) and TVM
    (targets/cpu.py's packed weight panels and CpuMatmul rule, built for --cpu `cpu_name` as the
    artifacts are): what the dense layers of a prefill can run at here; the fastest is the ceiling.
    Then, as "TVM <mode>", the same product through the quantized prefill kernel of each of
    `quantized` (2 x rows x inputs x outputs over its time)."""
    import onnx
    import onnxruntime as ort
    import tvm

    outputs = 3 * inputs
    rng = np.random.default_rng(0)
    weight = (rng.standard_normal((outputs, inputs)) * inputs**-0.5).astype(np.float32)
    x = rng.standard_normal((1, rows, inputs)).astype(np.float32)
    linear = tvm_linear(weight, rows, cpu_name=cpu_name)
    x_tvm, x_torch, w_torch = tvm.runtime.tensor(x), torch.from_numpy(x), torch.from_numpy(weight)
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("MatMul", ["x", "w"], ["y"])], "matmul",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, list(x.shape))],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, rows, outputs])],
        [onnx.numpy_helper.from_array(np.ascontiguousarray(weight.T), "w")])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(onnx.helper.make_model(graph).SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    flops = 2 * rows * inputs * outputs
    kernels = {"torch": lambda: torch.nn.functional.linear(x_torch, w_torch),
               "ONNX Runtime": lambda: session.run(None, {"x": x}), "TVM": lambda: linear(x_tvm)}
    for mode in quantized:
        kernel = tvm_quantized_linear(weight, rows, mode, cpu_name)
        kernels[f"TVM {mode}"] = lambda kernel=kernel: kernel(x_tvm)
    return {name: flops / (median_ms(fn, repeat) / 1e3) for name, fn in kernels.items()}


def attention_prefill_ms(model: SessaLM, tokens: int, cpu_name: str, repeat: int = 3) -> float:
    """ms of the two attention kernels of a `tokens`-long float32 prefill from an empty state over all
    layers, each kernel built as the CPU build emits it and timed alone (once per head layout)."""
    import tvm

    from sessa_export.ops import tvm_attention, tvm_kernels
    from sessa_export.targets import build_feedback_attention, cpu

    config = model.config
    D, H, d, tgt = config.d_model, config.n_heads, config.head_dim, cpu.tvm_target(cpu=cpu_name)
    rng = np.random.default_rng(0)
    rows = lambda width: tvm.runtime.tensor(rng.standard_normal((1, tokens, width)).astype(np.float32))  # noqa: E731
    total = 0.0
    for kv, layers in collections.Counter(config.layer_kv_heads).items():
        tiling = cpu.attention_tiling(d, tgt)
        func = tvm_attention.forward_attention_kernel(H, kv, d, bool(config.use_forward_rope), "float32", tiling)
        attn = tvm.compile(tvm.IRModule({"attn": func.with_attr("global_symbol", "attn")}), target=tgt)["attn"]
        inv_freq = tvm.runtime.tensor((10000.0 ** (-np.arange(0, d, 2) / d)).astype(np.float32))
        caches = [tvm.runtime.tensor(np.zeros((1, kv, tokens, d), np.float32)) for _ in range(2)]
        args = (rows(H * d), rows(kv * d), rows(kv * d), inv_freq, *caches, 0, rows(H * d))
        total += layers * median_ms(lambda: attn(*args), repeat)
    kernel = build_feedback_attention("cpu", D, "float32", cpu=cpu_name)[tvm_kernels.PREFILL]
    gain = tvm.runtime.tensor(np.full((1, tokens, 1), 0.5, np.float32))
    caches = [tvm.runtime.tensor(np.zeros((1, tokens, D), np.float32)) for _ in range(2)]
    args = (rows(D), rows(D), rows(D), gain, *caches, 0, rows(D))
    return total + config.n_layers * median_ms(lambda: kernel(*args), repeat)


def dense_flops(model: SessaLM, tokens: int) -> int:
    """Multiply-adds x 2 of every linear layer (LM head included) over `tokens` positions."""
    return 2 * tokens * sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, torch.nn.Linear))


def decode_bytes(model: SessaLM, context: int) -> int:
    """Bytes one decode step at `context` must read: every weight once (one row of the embedding
    table), plus the state of `context` positions (forward keys/values, feedback keys/states)."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    embed = model.embed.weight
    if not model.config.tie_embeddings:  # a tied table is read whole by the LM head anyway
        weights -= (embed.shape[0] - 1) * embed.shape[1] * embed.element_size()
    state = model.config.state_values_per_token() * context * 4
    return weights + state


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=None, help="threads for all three (default: all cores)")
    parser.add_argument("--context", type=int, default=DECODE_CONTEXT, help="prefill length and decode context")
    from sessa_export.targets.cpu import cpu_choices

    parser.add_argument("--cpu", default="native", choices=cpu_choices(None)[0], help="compile --cpu of the TVM builds (default native: the "
                        "machine's limit; the figures before 2026-12-01 were native builds too)")
    parser.add_argument("--decode-steps", type=int, default=DECODE_STEPS)
    parser.add_argument("--capacity", type=int, default=2048, help="compiled TVM capacity")
    parser.add_argument("--skip-onnx", action="store_true")
    parser.add_argument("--skip-torch", action="store_true")
    parser.add_argument("--quantized", action="store_true", help="TVM fp32 / q8 / q4 against ONNX Runtime fp32 / "
                        "int8 / int4 at --contexts, each against its own bound (issue 12)")
    parser.add_argument("--contexts", default="64,1024", help="--quantized: decode contexts (the largest is also "
                        "the prefill length)")
    parser.add_argument("--state-dtypes", default="", help="--quantized: also TVM q4 with these narrower caches "
                        "(compile --state-dtype), e.g. float16")
    parser.add_argument("--tvm-modes", default="fp32,q8,q4", help="--quantized: the TVM builds (a 1b float32 "
                        "build takes about 90 s and 15 GiB of memory)")
    parser.add_argument("--config", choices=sorted(CONFIGS), default="125m", help="the model: 125m (default) or "
                        "1b (d_model 2048, 24 layers, 16 heads)")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the artifacts here (default: temp)")
    parser.add_argument("--reuse", action="store_true", help="--quantized: time the artifacts already in --workdir "
                        "instead of building them again")
    args = parser.parse_args(argv)

    threads = set_threads(args.threads)
    os.environ["TVM_NUM_THREADS"] = str(threads)  # the size of TVM's thread pool, read when the pool starts
    # (at the first parallel kernel, after this line: --cpu's choices above import TVM, not the pool)
    print(f"machine: {machine_description()}", flush=True)
    single, bandwidth = read_bandwidth(threads)
    print(f"read bandwidth (numpy sum over 1 GiB): {single / 1e9:.1f} GB/s on one thread, "
          f"{bandwidth / 1e9:.1f} GB/s on {threads} threads (the bound uses the latter)", flush=True)

    model = init_weights(SessaLM(CONFIGS[args.config]()), seed=0, std=0.02).eval()
    graph = trace(model)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="sessa-bench-tvm-"))
    vocab = model.config.vocab_size
    if args.quantized:
        return quantized(args, model, graph, work, threads, bandwidth)

    from sessa_export.to_tvm import CompileTarget, compile_graph
    from sessa_export.runtime.tvm_runner import TvmRunner

    start = time.perf_counter()
    compile_graph(graph, work / "tvm", CompileTarget("cpu", cpu=args.cpu), max_len=args.capacity,
                  progress=lambda msg: print(f"  tvm: {msg}", flush=True))
    print(f"TVM compile: {time.perf_counter() - start:.1f} s", flush=True)
    runners = [("TVM CPU", TvmRunner(work / "tvm", threads))]
    print(f"TVM threads: {runners[0][1].threads}", flush=True)
    for mode in ("q8", "q4") if args.quantized else ():
        compile_graph(graph, work / f"tvm-{mode}", CompileTarget("cpu", cpu=args.cpu), max_len=args.capacity, quantization=mode)
        runners.append((f"TVM CPU {mode}", TvmRunner(work / f"tvm-{mode}", threads)))
    ids = torch.randint(0, vocab, (1, 64), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        ref = model(ids).numpy()
    got, _ = runners[0][1].step(ids.numpy(), runners[0][1].empty_state(1))
    print(f"TVM parity on a 64-token prefill: max |logits - PyTorch| = {np.abs(got - ref).max():.2e}", flush=True)
    if not args.skip_onnx:
        from sessa_export.to_onnx import export_onnx
        from sessa_export.runtime import OrtRunner

        export_onnx(graph, work / "onnx")
        runners.append(("ONNX Runtime", OrtRunner(work / "onnx", threads)))

    if not args.skip_torch:
        from sessa_export.runtime import TorchRunner

        runners.append(("PyTorch", TorchRunner(model)))
    timings = time_runners(dict(runners), vocab, args.context, args.decode_steps)
    results = {name: (statistics.median(t.prefill_s), statistics.median(t.decode_s)) for name, t in timings.items()}
    rows = []
    moved = decode_bytes(model, args.context)
    bound = moved / bandwidth
    for name, (prefill, decode) in results.items():
        share = "-" if name.startswith("TVM CPU q") else f"{bound / decode:.0%}"  # the bound is for float32 weights
        rows.append((name, f"{args.context / prefill:,.0f}", f"{decode * 1e3:.2f}", share))
    rows.append(("decode bound (bytes / bandwidth)", "-", f"{bound * 1e3:.2f}", "100%"))
    print_table(("back end", f"prefill tokens/s (T={args.context})",
                 f"decode ms/token (context {args.context})", "of the bound"), rows,
                title=f"125M-class Sessa LM, float32, {threads} threads; a decode step reads "
                      f"{moved / 2**20:.0f} MiB ({bandwidth / 1e9:.1f} GB/s read bandwidth)")
    D = model.config.d_model
    rates = matmul_rates(args.cpu, threads, D)
    flops, fastest = dense_flops(model, args.context), max(rates.values())
    print(f"dense matmul rate (1024x{D} @ {D}x{3 * D}, float32): " + ", ".join(f"{n} {r / 1e9:.0f} GFLOP/s"
                                                                             for n, r in rates.items()))
    print(f"prefill ceiling: the linear layers of a {args.context}-token prefill are {flops / 1e9:.0f} GFLOP; at "
          f"{fastest / 1e9:.0f} GFLOP/s they alone take {flops / fastest:.2f} s, so no back end here prefills "
          f"faster than {args.context * fastest / flops:,.0f} tokens/s (before the two attentions)")
    if "PyTorch" in results:
        print(f"prefill target 2x PyTorch: {2 * args.context / results['PyTorch'][0]:,.0f} tokens/s")
    return 0


BITS = {"TVM fp32": None, "TVM q8": 8, "TVM q4": 4, "ORT fp32": None, "ORT int8": 8, "ORT int4": 4}


def quantized(args, model: SessaLM, graph, work: Path, threads: int, bandwidth: float) -> int:
    """Issue 12's benchmark (module docstring): six artifacts, decode at each context, prefill at the largest."""
    from sessa_export.runtime import OrtRunner
    from sessa_export.runtime.tvm_runner import TvmRunner
    from sessa_export.to_onnx import export_onnx
    from sessa_export.to_onnx.quantize import quantize_export
    from sessa_export.to_tvm import CompileTarget, compile_graph

    contexts = sorted({int(c) for c in args.contexts.split(",")})
    runners = {}
    built = lambda name: args.reuse and (work / name.replace(" ", "-") / "sessa_config.json").exists()  # noqa: E731
    narrow = [d for d in args.state_dtypes.split(",") if d]
    states = {f"TVM q4 {d} state": d for d in narrow}  # artifact -> its caches' dtype (default float32)
    builds = [(f"TVM {m}", None if m == "fp32" else m) for m in args.tvm_modes.split(",") if m]
    for name, mode in (*builds, *((n, "q4") for n in states)):
        start = time.perf_counter()
        if not built(name):
            compile_graph(graph, work / name.replace(" ", "-"), CompileTarget("cpu", cpu=args.cpu),
                          max_len=args.capacity, quantization=mode, state_dtype=states.get(name, "float32"))
            print(f"{name}: compiled in {time.perf_counter() - start:.0f} s", flush=True)
        runners[name] = TvmRunner(work / name.replace(" ", "-"), threads)
    if not args.skip_onnx:
        if not built("ORT fp32"):
            export_onnx(graph, work / "ORT-fp32", state="inplace")
        for mode in ("int8", "int4"):
            if not built(f"ORT {mode}"):
                quantize_export(work / "ORT-fp32", work / f"ORT-{mode}", mode)
        for name in ("ORT fp32", "ORT int8", "ORT int4"):
            runners[name] = OrtRunner(work / name.replace(" ", "-"), threads)
    timings = {}
    for context in contexts:
        print(f"timing at context {context} ({time.strftime('%H:%M:%S UTC', time.gmtime())})", flush=True)
        timings[context] = time_runners(runners, model.config.vocab_size, context, args.decode_steps)
    again = read_bandwidth(threads)[1]  # the machine is shared: the bound uses the best read rate seen in the run
    print(f"read bandwidth after the timings: {again / 1e9:.1f} GB/s (before: {bandwidth / 1e9:.1f})", flush=True)
    bandwidth = max(bandwidth, again)
    D = model.config.d_model
    kernel_rates = matmul_rates(args.cpu, threads, D, quantized=tuple(m for m in ("q8", "q4") if f"TVM {m}" in runners))
    rates = {name: r for name, r in kernel_rates.items() if name in ("torch", "ONNX Runtime", "TVM")}  # float32
    rate = max(rates.values())
    prefill_at = contexts[-1]
    flops = dense_flops(model, prefill_at)
    ceiling = prefill_at * rate / flops  # tokens/s
    state = {name: model.config.state_values_per_token() * STATE_DTYPES[states.get(name, "float32")].itemsize
             for name in runners}  # bytes of one position's state
    bits = {name: BITS.get(name, 4) for name in runners}  # the narrow-state builds are q4
    bound = {name: {c: (weight_bytes(model, bits[name]) + state[name] * c) / bandwidth for c in contexts}
             for name in runners}
    rows = []
    for name in runners:
        row = [name]
        for c in contexts:
            ms = timings[c][name].decode_ms_per_token
            row += [f"{ms:.2f}", f"{bound[name][c] * 1e3:.2f}", f"{bound[name][c] * 1e3 / ms:.0%}"]
        tokens = timings[prefill_at][name].prefill_tokens_per_s
        rows.append(row + [f"{tokens:,.0f}", f"{tokens / ceiling:.0%}"])
    headers = ["artifact"]
    for c in contexts:
        headers += [f"decode ms @{c}", "bound ms", "of bound"]
    print_table(headers + [f"prefill tok/s T={prefill_at}", "of ceiling"], rows,
                title=f"{args.config} Sessa LM ({sum(p.numel() for p in model.parameters()) / 1e6:,.0f}M parameters), "
                      f"batch 1, {threads} threads, TVM --cpu {args.cpu}; read bandwidth "
                      f"{bandwidth / 1e9:.1f} GB/s; float32 matmul (1024x{D} @ {D}x{3 * D}) "
                      + ", ".join(f"{n} {r / 1e9:.0f}" for n, r in rates.items())
                      + f" GFLOP/s: prefill ceiling {ceiling:,.0f} tokens/s ({flops / 1e9:.0f} GFLOP at the fastest)")
    print("targets:")
    ms = {(name, c): timings[c][name].decode_ms_per_token for name in runners for c in contexts}
    for name in [n for n in ("TVM fp32", "TVM q8", "TVM q4") if n in runners]:
        for c in contexts:
            share = bound[name][c] * 1e3 / ms[name, c]
            print(f"  {name} decode at {c} >= 85% of its bound: {share:.0%} {'met' if share >= 0.85 else 'NOT met'}")
        share = timings[prefill_at][name].prefill_tokens_per_s / ceiling
        print(f"  {name} prefill >= 70% of the ceiling: {share:.0%} {'met' if share >= 0.7 else 'NOT met'}")
    for c, target in ((contexts[-1], 1.8), (contexts[0], 3.0)) if {"TVM fp32", "TVM q4"} <= set(runners) else ():
        speedup = ms["TVM fp32", c] / ms["TVM q4", c]
        print(f"  TVM q4 >= {target}x TVM fp32 at {c}: {speedup:.2f}x {'met' if speedup >= target else 'NOT met'}")
    tokens = {name: timings[prefill_at][name].prefill_tokens_per_s for name in runners}
    for tvm_name, ort_name in (("TVM fp32", "ORT fp32"), ("TVM q8", "ORT int8"), ("TVM q4", "ORT int4")):
        if {tvm_name, ort_name} <= set(runners):
            ratio = tokens[tvm_name] / tokens[ort_name]
            print(f"  {tvm_name} prefill no slower than {ort_name}: {ratio:.2f}x {'met' if ratio >= 1 else 'NOT met'}")
    for name, measured in kernel_rates.items():
        if name.startswith("TVM"):
            share = measured / rate
            rule = "dense rule" if name == "TVM" else f"{name[4:]} prefill kernel"
            print(f"  TVM {rule} >= 70% of the fastest float32 matmul: {measured / 1e9:.0f} GFLOP/s, {share:.0%} "
                  f"{'met' if share >= 0.7 else 'NOT met'}")
    if "TVM fp32" in runners:
        kernels_ms = attention_prefill_ms(model, prefill_at, args.cpu)
        prefill_ms = prefill_at / tokens["TVM fp32"] * 1e3
        print(f"  attention kernels <= 25% of the TVM fp32 prefill: {kernels_ms:.0f} of {prefill_ms:.0f} ms "
              f"({kernels_ms / prefill_ms:.0%}, the kernels timed alone after the run) "
              f"{'met' if kernels_ms <= prefill_ms / 4 else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
