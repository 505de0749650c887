"""ONNX Runtime against the PyTorch reference step path (`SessaLM.step`), on CPU, float32.

For the bundled model and a 125M-class model with random weights (vocab 32000, d_model 768,
12 layers, 12 heads), it exports the model with `sessa_export.to_onnx`, then prints:
- prefill tokens/s: one step over T = 1024 tokens from an empty state (median of --rounds, 4);
- decode ms/token at a context of 1024: prefill 1024 tokens, then one token per step
  (median over --decode-steps steps, the context growing from 1024);
for ONNX Runtime (`OrtRunner`, the shipped runner) beside PyTorch (`TorchRunner`, the
measurement of benchmarks/reference.py), timed in turns by `sessa_export.bench.time_runners`,
and the speed-ups ORT / PyTorch. Targets: decode >= 2x, prefill >= 1.5x.

--profile enables ONNX Runtime's profiler (SessionOptions.enable_profiling) for --profile-steps
decode steps at the same context and prints where the time goes: by op type, and by part of
the model (the inlined ai.sessa.FeedbackAttention function, forward Attention, LM head, ...);
--profile-prefill does the same for prefill.

Run: python benchmarks/onnx_runtime.py [--threads N] [--only bundled|125m] [--profile]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DECODE_CONTEXT, DECODE_STEPS, machine_description, print_table, set_threads  # noqa: E402
from reference import benchmark_models  # noqa: E402

from sessa_export.bench import ROUNDS, SETTLE_S, decode_positions, time_runners  # noqa: E402
from sessa_export.model import SessaLM  # noqa: E402
from sessa_export.to_onnx import export_onnx  # noqa: E402
from sessa_export.runtime import OrtRunner, TorchRunner  # noqa: E402
from sessa_export.tracer import trace  # noqa: E402

DECODE_TARGET, PREFILL_TARGET = 2.0, 1.5
CONTROL_FLOW = ("Loop", "If", "Scan")


def parity(model: SessaLM, runner: OrtRunner, tokens: int = 64) -> float:
    """max |ORT - PyTorch| of the logits of a short prefill: the benchmark measures a correct export."""
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        ref = model(ids).numpy()
    got, _ = runner.step(ids.numpy(), runner.empty_state(1))
    return float(np.abs(got - ref).max())


PARTS = {  # weight name (without the layers.N. prefix) -> part of the step
    "mixer.q_proj": "forward q/k/v projections", "mixer.k_proj": "forward q/k/v projections",
    "mixer.v_proj": "forward q/k/v projections", "mixer.out_proj": "forward out_proj",
    "mixer.proj_fb": "feedback q/k projection (proj_fb)", "mixer.gamma_ctx": "gain (gamma_ctx)",
    "mixer.gamma_bias": "gain (gamma_ctx)", "W_in": "W_in", "W_out": "W_out", "lm_head": "LM head",
    "fc_in": "MLP", "fc_out": "MLP", "ln": "LayerNorm", "norm_f": "LayerNorm", "embed": "embedding",
}


def node_parts(model_file: Path) -> dict[str, str]:
    """Node name -> part of the step, from the weights each node reads (ORT keeps the exporter's names)."""
    import onnx

    proto = onnx.load(str(model_file), load_external_data=False)
    weights = {i.name for i in proto.graph.initializer}
    parts = {}
    for node in proto.graph.node:
        if node.domain == "ai.sessa":
            parts[node.name] = "FeedbackAttention (inlined function)"
            continue
        for name in node.input:
            if name in weights:
                path = name.rsplit(".", 1)[0]
                for key, part in PARTS.items():
                    if path == key or path.endswith("." + key) or path.startswith(key + "."):
                        parts[node.name] = part
                        break
                if node.name in parts:
                    break
    return parts


def _part(node_name: str, op_type: str, parts: dict[str, str]) -> str:
    if node_name in parts:
        return parts[node_name]
    if "feedbackattention" in node_name.lower() or "_inlfunc_" in node_name:
        return "FeedbackAttention (inlined function)"  # nodes ORT inlined from the function body
    if op_type in ("Attention", "MultiHeadAttention", "GroupQueryAttention") or node_name.startswith("CausalAttention/"):
        return "forward Attention"
    if op_type == "RotaryEmbedding":
        return "RoPE"
    return f"other ({op_type})"


def profile(out: Path, runner: OrtRunner, vocab: int, context: int, steps: int, threads: int | None,
            prefill: bool = False, top: int = 12) -> None:
    """Run `steps` decode steps at `context` (or `steps` prefills of `context` tokens) with ORT's profiler
    on, and print the top ops by time and the parts of the step they belong to."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    options.enable_profiling = True
    options.profile_file_prefix = str(Path(tempfile.gettempdir()) / f"sessa_ort_profile_{os.getpid()}")
    runner.session = ort.InferenceSession(str(out / "model.onnx"), options, providers=["CPUExecutionProvider"])
    ids = np.random.default_rng(3).integers(0, vocab, (1, context + steps + 1))
    _, state = runner.step(ids[:, :context], runner.empty_state(1))
    if prefill:
        what = f"{steps} prefills of {context} tokens"
        for _ in range(steps):
            runner.step(ids[:, :context], runner.empty_state(1))
    else:
        what = f"{steps} decode steps at context {context + 1}..{context + steps}"
        _, state = runner.step(ids[:, context:context + 1], state)  # first decode run: allocations, not counted
        for t in range(steps):
            _, state = runner.step(ids[:, context + 1 + t:context + 2 + t], state)
    trace_file = Path(runner.session.end_profiling())
    events = json.loads(trace_file.read_text())
    trace_file.unlink()
    runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"][-steps:]
    windows = [(e["ts"], e["ts"] + e["dur"]) for e in runs]
    run_us = sum(e["dur"] for e in runs)
    parts = node_parts(out / "model.onnx")
    by_op, by_part, counts = defaultdict(float), defaultdict(float), defaultdict(int)
    control_us = 0.0
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        if not any(lo <= e["ts"] <= hi for lo, hi in windows):
            continue
        op_type = e.get("args", {}).get("op_name", "?")
        node = e["name"].removesuffix("_kernel_time")
        if op_type in CONTROL_FLOW:  # its body's nodes have events of their own: count those, not it
            control_us += e["dur"]
            continue
        by_op[op_type] += e["dur"]
        counts[op_type] += 1
        by_part[_part(node, op_type, parts)] += e["dur"]
    kernel_us = sum(by_op.values())
    print(f"\nORT profile, {what}: "
          f"{run_us / steps / 1e3:.2f} ms/run in session.run, {kernel_us / steps / 1e3:.2f} ms/run in kernels "
          f"({kernel_us / max(run_us, 1):.0%}); the rest is ORT overhead between kernels. "
          f"The If / Loop nodes of FeedbackAttention and of the forward attention ({control_us / steps / 1e3:.2f} "
          "ms/run with their bodies) are counted through their bodies' nodes", flush=True)
    rows = [(op, f"{us / steps / 1e3:.3f}", f"{us / kernel_us:.1%}", counts[op] // steps)
            for op, us in sorted(by_op.items(), key=lambda kv: -kv[1])[:top]]
    print_table(("op type", "ms/run", "share of kernel time", "nodes/run"), rows, title="top ops by time")
    rows = [(part, f"{us / steps / 1e3:.3f}", f"{us / kernel_us:.1%}")
            for part, us in sorted(by_part.items(), key=lambda kv: -kv[1])[:top]]
    print_table(("part", "ms/run", "share"), rows, title="by part of the step")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads and ORT intra-op threads (default: all available cores)")
    parser.add_argument("--only", choices=("bundled", "125m"), default=None)
    parser.add_argument("--checkpoint", type=Path, action="append", default=[],
                        help="also benchmark this checkpoint (repeatable)")
    parser.add_argument("--context", type=int, default=DECODE_CONTEXT, help="prefill length and decode context")
    parser.add_argument("--decode-steps", type=int, default=DECODE_STEPS)
    parser.add_argument("--rounds", type=int, default=ROUNDS,
                        help="turns per back end (each one prefill and a block of decode steps); more on a noisy machine")
    parser.add_argument("--settle", type=float, default=SETTLE_S,
                        help="pause (s) before each back end's turn; 0 shows the thread pools' interference")
    parser.add_argument("--profile", action="store_true", help="profile ORT decode steps and print the top ops")
    parser.add_argument("--profile-steps", type=int, default=8, help="decode steps profiled")
    parser.add_argument("--profile-prefill", action="store_true", help="also profile 2 prefills of T tokens")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")

    threads = set_threads(args.threads)
    try:
        load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        load = "unknown"
    import onnxruntime as ort
    print(f"machine: {machine_description()}; onnxruntime {ort.__version__} with {threads} intra-op threads",
          flush=True)
    print(f"load average (1/5/15 min) at start: {load}", flush=True)

    models = benchmark_models(args.only)
    for path in args.checkpoint:
        from sessa_export.checkpoint import load_checkpoint

        models.append((f"{path.name}", load_checkpoint(path).eval()))

    rows, notes = [], []
    with tempfile.TemporaryDirectory(prefix="sessa_bench_") as tmp:
        for name, model in models:
            c = model.config
            if c.max_len is not None and c.max_len < args.context + decode_positions(args.decode_steps, args.rounds):
                print(f"{name}: max_len={c.max_len} is shorter than the benchmark's context: skipped", flush=True)
                continue
            out = Path(tmp) / name.replace(" ", "_")
            start = time.perf_counter()
            export_onnx(trace(model), out)
            size = sum(f.stat().st_size for f in out.iterdir())
            runner = OrtRunner(out, threads=threads)
            err = parity(model, runner)
            print(f"{name}: exported in {time.perf_counter() - start:.1f} s ({size / 2**20:.0f} MiB); "
                  f"prefill logits max |ORT - PyTorch| = {err:.2e}", flush=True)
            vocab = c.vocab_size
            t = time_runners({"pytorch": TorchRunner(model), "ort": runner}, vocab, args.context, args.decode_steps,
                             rounds=args.rounds, settle_s=args.settle)
            torch_prefill, onnx_prefill = (statistics.median(t[n].prefill_s) for n in ("pytorch", "ort"))
            torch_decode, onnx_decode = (statistics.median(t[n].decode_s) for n in ("pytorch", "ort"))
            prefill_x, decode_x = torch_prefill / onnx_prefill, torch_decode / onnx_decode
            rows.append((name, f"{c.n_layers}x{c.d_model} H={c.n_heads}/{c.kv_heads}",
                         f"{t['pytorch'].prefill_tokens_per_s:,.0f}", f"{t['ort'].prefill_tokens_per_s:,.0f}",
                         f"{prefill_x:.2f}x", f"{torch_decode * 1e3:.2f}", f"{onnx_decode * 1e3:.2f}", f"{decode_x:.2f}x"))
            notes.append(f"{name}: decode {decode_x:.2f}x (target {DECODE_TARGET}x: "
                         f"{'met' if decode_x >= DECODE_TARGET else 'NOT met'}), prefill {prefill_x:.2f}x "
                         f"(target {PREFILL_TARGET}x: {'met' if prefill_x >= PREFILL_TARGET else 'NOT met'})")
            print(f"{name}: done", flush=True)
            if args.profile:
                profile(out, runner, vocab, args.context, args.profile_steps, threads)
            if args.profile_prefill:
                profile(out, runner, vocab, args.context, 2, threads, prefill=True)
            del runner
    try:
        load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        load = "unknown"
    print()
    print_table(("model", "shape", f"PyTorch prefill tok/s (T={args.context})", "ORT prefill tok/s",
                 "prefill ORT/PyTorch", f"PyTorch decode ms/token (ctx {args.context})", "ORT decode ms/token",
                 "decode ORT/PyTorch"),
                rows, title="ONNX Runtime vs PyTorch reference (float32, CPU; medians; ratio > 1: ORT faster)")
    for note in notes:
        print(note)
    print(f"load average (1/5/15 min) at end: {load}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
