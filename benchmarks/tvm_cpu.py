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
matmul rate measured here (torch's kernels or TVM's packed-panel rule, one q/k/v-sized product).

With --quantized, `compile --quantization q8` and `q4` builds are timed in the same turns.

Run: python benchmarks/tvm_cpu.py [--threads N] [--context 1024] [--skip-onnx] [--skip-torch] [--quantized]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (DECODE_CONTEXT, DECODE_STEPS, config_125m, machine_description, read_bandwidth,  # noqa: E402
                    median_ms, print_table, set_threads, tvm_linear)

from sessa_export.bench import time_runners  # noqa: E402
from sessa_export.model import SessaLM, init_weights  # noqa: E402
from sessa_export.tracer import trace  # noqa: E402


def matmul_rates(rows: int = 1024, inputs: int = 768, outputs: int = 2304, repeat: int = 10) -> dict[str, float]:
    """FLOP/s of one float32 [rows, inputs] @ [inputs, outputs] product (the size of a prefill's
    q/k/v projections) with torch (the reference's kernels) and with TVM (targets/cpu.py's packed
    weight panels and CpuMatmul rule): what the dense layers of a prefill can run at here."""
    import tvm

    rng = np.random.default_rng(0)
    weight = rng.standard_normal((outputs, inputs)).astype(np.float32)
    x = rng.standard_normal((1, rows, inputs)).astype(np.float32)
    linear = tvm_linear(weight, rows)
    x_tvm, x_torch, w_torch = tvm.runtime.tensor(x), torch.from_numpy(x), torch.from_numpy(weight)
    flops = 2 * rows * inputs * outputs
    return {name: flops / (median_ms(fn, repeat) / 1e3)
            for name, fn in (("torch", lambda: torch.nn.functional.linear(x_torch, w_torch)),
                             ("TVM", lambda: linear(x_tvm)))}


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
    parser.add_argument("--cpu", default="native", help="compile --cpu of the TVM builds (default native: the "
                        "machine's limit; the figures before 2026-12-01 were native builds too)")
    parser.add_argument("--decode-steps", type=int, default=DECODE_STEPS)
    parser.add_argument("--capacity", type=int, default=2048, help="compiled TVM capacity")
    parser.add_argument("--skip-onnx", action="store_true")
    parser.add_argument("--skip-torch", action="store_true")
    parser.add_argument("--quantized", action="store_true", help="also compile and time --quantization q8 and q4")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the artifacts here (default: temp)")
    args = parser.parse_args(argv)

    threads = set_threads(args.threads)
    os.environ["TVM_NUM_THREADS"] = str(threads)  # the size of TVM's thread pool: set before TVM is imported
    print(f"machine: {machine_description()}", flush=True)
    single, bandwidth = read_bandwidth(threads)
    print(f"read bandwidth (numpy sum over 1 GiB): {single / 1e9:.1f} GB/s on one thread, "
          f"{bandwidth / 1e9:.1f} GB/s on {threads} threads (the bound uses the latter)", flush=True)

    model = init_weights(SessaLM(config_125m()), seed=0, std=0.02).eval()
    graph = trace(model)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="sessa-bench-tvm-"))
    vocab = model.config.vocab_size

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
    rates = matmul_rates()
    flops, fastest = dense_flops(model, args.context), max(rates.values())
    print("dense matmul rate (1024x768 @ 768x2304, float32): " + ", ".join(f"{n} {r / 1e9:.0f} GFLOP/s"
                                                                          for n, r in rates.items()))
    print(f"prefill ceiling: the linear layers of a {args.context}-token prefill are {flops / 1e9:.0f} GFLOP; at "
          f"{fastest / 1e9:.0f} GFLOP/s they alone take {flops / fastest:.2f} s, so no back end here prefills "
          f"faster than {args.context * fastest / flops:,.0f} tokens/s (before the two attentions)")
    if "PyTorch" in results:
        print(f"prefill target 2x PyTorch: {2 * args.context / results['PyTorch'][0]:,.0f} tokens/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
