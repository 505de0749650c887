"""Decode speed and size of quantized ONNX exports: fp32 vs int8 vs int4 (and fp16 with --fp16).

The 125M-class config of benchmarks/common.py (vocab 32000, width 768, 12 layers, 12 heads, no
MLP, untied head) with random weights (init_weights, std 0.02) is exported once, quantized with
`sessa-export quantize`'s code, and each export is run by OrtRunner (ONNX Runtime, CPU):
prefill 1024 tokens in one step, then decode one token at a time; the figure is the median
ms/token over 32 decode steps (context 1024 -> 1060), after 3 untimed warm-up steps. The
exports are timed in turns by `sessa_export.bench.time_runners` (4 rounds of one prefill and a
block of decode steps each), so load from elsewhere on the machine hits them alike; a single
step per export in turn measured ORT's spinning pools instead (fp32 doubled).

Targets at batch 1: int8 >= 2x and int4 >= 2.5x faster than fp32 (judged on the medians; the
speedup of the best steps is printed too, as it is less sensitive to a busy machine).

A second table at a context of 64 shows the weights' share alone: at 1024 every step also reads the
whole state (4 tensors per layer, 12 layers, ~144 MiB in float32) and copies it into the grown
`present` tensors, the same work for every export; --profile breaks the step down by op type.

Run: python benchmarks/quantized.py [--threads N] [--steps 32] [--contexts 1024,64] [--profile]
                                    [--fp16] [--workdir DIR [--reuse]]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (DECODE_CONTEXT, DECODE_STEPS, config_125m, op_times,  # noqa: E402
                    machine_description, print_table)

from sessa_export.bench import time_runners  # noqa: E402
from sessa_export.model import SessaLM, init_weights  # noqa: E402
from sessa_export.to_onnx import export_onnx  # noqa: E402
from sessa_export.to_onnx.quantize import export_size, linear_weight_bytes, quantize_export  # noqa: E402
from sessa_export.runtime import OrtRunner, available_cores  # noqa: E402
from sessa_export.tracer import trace  # noqa: E402

TARGETS = {"int8": 2.0, "int4": 2.5}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=None, help="ORT intra-op threads (default: available cores)")
    p.add_argument("--steps", type=int, default=DECODE_STEPS, help="timed decode steps")
    p.add_argument("--contexts", type=lambda v: [int(x) for x in v.split(",")], default=[DECODE_CONTEXT, 64],
                   help="prefill lengths before decoding, comma-separated; the first is the one with targets "
                        f"(default {DECODE_CONTEXT},64: the short context shows the weights' share alone)")
    p.add_argument("--profile", action="store_true", help="also break decode time down by op type (ORT profiler)")
    p.add_argument("--block-size", type=int, default=32, help="int4 block size")
    p.add_argument("--fp16", action="store_true", help="also time an fp16 export (ORT's CPU float16 kernels are slow)")
    p.add_argument("--workdir", type=Path, default=None, help="keep the exports here (default: a temp dir)")
    p.add_argument("--reuse", action="store_true", help="with --workdir: reuse the exports already there")
    args = p.parse_args(argv)
    threads = args.threads or available_cores()

    config = config_125m()
    print(f"machine: {machine_description()}; ONNX Runtime threads {threads}", flush=True)
    with tempfile.TemporaryDirectory(prefix="sessa-bench-q-") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        fp32 = work / "fp32"
        start = time.perf_counter()
        reuse = args.reuse and args.workdir is not None
        if not (reuse and (fp32 / "sessa_config.json").is_file()):
            model = init_weights(SessaLM(config), seed=0, std=0.02).eval()
            export_onnx(trace(model), fp32)
            del model
            print(f"exported 125M-class model ({config.n_layers} layers, d_model {config.d_model}, vocab "
                  f"{config.vocab_size}) in {time.perf_counter() - start:.1f} s", flush=True)
        variants = {"fp32": fp32}
        modes = ["int8", "int4"] + (["fp16"] if args.fp16 else [])
        for mode in modes:
            start = time.perf_counter()
            variants[mode] = work / mode
            if reuse and (variants[mode] / "sessa_config.json").is_file():
                continue
            quantize_export(fp32, variants[mode], mode, args.block_size if mode == "int4" else None)
            print(f"quantized {mode} in {time.perf_counter() - start:.1f} s", flush=True)

        sizes = {name: (export_size(path), linear_weight_bytes(path)) for name, path in variants.items()}
        fp32_size, fp32_linear = sizes["fp32"]
        tables = []
        for context in args.contexts:
            runners = {name: OrtRunner(path, threads) for name, path in variants.items()}
            timings = {name: {"prefill_s": statistics.median(t.prefill_s), "median_ms": t.decode_ms_per_token,
                              "best_ms": t.best_decode_ms}
                       for name, t in time_runners(runners, config.vocab_size, context, args.steps).items()}
            del runners
            base, base_best, rows = timings["fp32"]["median_ms"], timings["fp32"]["best_ms"], []
            for name in variants:
                t, (size, linear) = timings[name], sizes[name]
                speedup = base / t["median_ms"]
                target = TARGETS.get(name) if context == args.contexts[0] else None
                verdict = "" if target is None else (f">= {target:g}x " + ("met" if speedup >= target else "MISSED"))
                rows.append([name, f"{size / 2**20:.1f}", f"{size / fp32_size:.2f}", f"{linear / fp32_linear:.2f}",
                             f"{t['prefill_s']:.2f}", f"{t['median_ms']:.2f}", f"{t['best_ms']:.2f}",
                             f"{speedup:.2f}", f"{base_best / t['best_ms']:.2f}", verdict])
            tables.append((context, rows))
            print(f"  context {context}: " + ", ".join(f"{n} {timings[n]['median_ms']:.1f} ms" for n in variants),
                  flush=True)
        breakdown = profile_decode(variants, args.contexts[0], threads, config.vocab_size) if args.profile else None
    for context, rows in tables:
        print()
        print_table(["export", "size MiB", "size ratio", "weights ratio", f"prefill {context} s",
                     "decode ms/token", "best ms", "speedup", "speedup (best)", "target"], rows,
                    title=f"decode at batch 1, context {context} and up "
                          f"(median of {args.steps} steps), ONNX Runtime CPU, {threads} threads")
    if breakdown:
        print()
        ops = sorted({op for b in breakdown.values() for op in b},
                     key=lambda op: -max(b.get(op, 0) for b in breakdown.values()))
        print_table(["op"] + list(breakdown), [[op] + [f"{breakdown[n].get(op, 0):.2f}" for n in breakdown]
                                               for op in ops[:14]],
                    title=f"where decode time goes at context {args.contexts[0]}: ms/token by op type "
                          "(ORT profiler; graph-level ops, FeedbackAttention inlined)")
    return 0


def profile_decode(paths: dict[str, Path], context: int, threads: int, vocab: int, steps: int = 8) -> dict:
    """ms/token by op type over `steps` decode steps after a prefill of `context`, from ORT's profiler
    (common.profile_decode, one OrtRunner with the profiler on per export)."""
    return {name: op_times(path, context, threads, vocab, steps) for name, path in paths.items()}


if __name__ == "__main__":
    sys.exit(main())
