"""Decode with the growing and the in-place state contract, fp32 / int8 / int4 weights, float32 /
float16 / bfloat16 state (`--state-dtype`), each against its bound.

The 125M-class config of benchmarks/common.py (vocab 32000, width 768, 12 layers, 12 heads, no
MLP, untied head; random weights) is exported with `--state grow` and `--state inplace`, each
quantized to int8 and int4, and every export is run by OrtRunner (ONNX Runtime, CPU) in turns
(`sessa_export.bench.time_runners`): a prefill of the context, then single-token decode steps. The
in-place exports are also made with each narrower state dtype of --state-dtypes (the growing ones
keep a float32 state: the baseline).

Each decode figure is also given as a fraction of its own bandwidth bound: the bytes a step
must read (every initializer of the model file but the embedding table, at its stored
precision, plus one read of the state of the context at its dtype) over the measured read bandwidth
(numpy sums over 1 GiB, all threads). An in-place step reads its whole capacity (whole blocks of
state.CAPACITY_BLOCK = 64 positions: 1088 at a context of 1024), which the bound does not count.
Growing an in-place cache (once per block, one copy of the valid rows) happens in the untimed first
step of each block; at context C it reads and writes about 2C / 64 positions' worth of state per
token, amortised (3% of a step's state traffic), which the figures leave out.

Targets (issue 11): every in-place export at >= 85% of its bound at context 1024, and in-place int4
with a float16 state >= 2.5x faster than grow fp32 there.

Run: python benchmarks/inplace_state.py [--threads N] [--contexts 64,1024,4096] [--steps 16]
                                        [--rounds 2] [--state-dtypes float16,bfloat16] [--no-arena]
                                        [--profile CONTEXT [--profile-nodes]] [--workdir DIR [--reuse]]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import config_125m, machine_description, op_times, print_table, read_bandwidth  # noqa: E402

from sessa_export.artifact import member, read_manifest  # noqa: E402
from sessa_export.bench import time_runners  # noqa: E402
from sessa_export.model import SessaLM, init_weights  # noqa: E402
from sessa_export.runtime import OrtRunner, available_cores  # noqa: E402
from sessa_export.state import GROW, INPLACE, STATE_DTYPES  # noqa: E402
from sessa_export.to_onnx import export_onnx  # noqa: E402
from sessa_export.to_onnx.quantize import quantize_export  # noqa: E402
from sessa_export.tracer import trace  # noqa: E402

MODES = ("fp32", "int8", "int4")


def weight_bytes(path: Path) -> int:
    """Bytes of the model file's initializers, the embedding table's aside (a step reads one row of it)."""
    model = onnx.load(str(member(path, read_manifest(path), "model_file", "model.onnx")))
    return sum(len(i.raw_data) or onnx.numpy_helper.to_array(i).nbytes
               for i in model.graph.initializer if not i.name.startswith("embed."))


def session_options(no_arena: bool):
    """ONNX Runtime session options: the defaults, or without the CPU memory arena."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.enable_cpu_mem_arena = not no_arena
    return options


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=None, help="ORT intra-op threads (default: available cores)")
    p.add_argument("--contexts", type=lambda v: [int(x) for x in v.split(",")], default=[64, 1024, 4096])
    p.add_argument("--steps", type=int, default=16, help="timed decode steps per context")
    p.add_argument("--rounds", type=int, default=2, help="turns each export takes per context")
    p.add_argument("--state-dtypes", type=lambda v: [x for x in v.split(",") if x], default=["float16"],
                   help="narrower state dtypes for the in-place exports (float16, bfloat16; empty: none)")
    p.add_argument("--no-arena", action="store_true",
                   help="turn ONNX Runtime's CPU memory arena off: each session keeps its largest prefill's memory "
                        "otherwise (at context 4096 the nine sessions outgrow 24 GiB)")
    p.add_argument("--profile", type=int, default=None, metavar="CONTEXT",
                   help="also break decode down by op type at CONTEXT (ORT profiler)")
    p.add_argument("--profile-nodes", action="store_true",
                   help="with --profile: by op type and node (each layer's instances of a node summed), not op type alone")
    p.add_argument("--workdir", type=Path, default=None, help="keep the exports here (default: a temp dir)")
    p.add_argument("--reuse", action="store_true", help="with --workdir: reuse the exports already there")
    args = p.parse_args(argv)
    if args.profile_nodes and args.profile is None:
        p.error("--profile-nodes breaks down the --profile CONTEXT run: give --profile CONTEXT too")
    threads = args.threads or available_cores()
    config = config_125m()
    _, bandwidth = read_bandwidth(threads)
    print(f"machine: {machine_description()}; ONNX Runtime threads {threads}; read bandwidth "
          f"{bandwidth / 1e9:.1f} GB/s", flush=True)
    state_values = config.state_values_per_token()  # one position's state, in values
    with tempfile.TemporaryDirectory(prefix="sessa-bench-state-") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        model = None
        variants = {}
        states = {}  # variant -> its state dtype
        for contract, state_dtype in [(GROW, "float32"), (INPLACE, "float32")] + [(INPLACE, d) for d in args.state_dtypes]:
            suffix = "" if state_dtype == "float32" else f" {state_dtype} state"
            for mode in MODES:
                name = f"{contract} {mode}{suffix}"
                path = variants[name] = work / name.replace(" ", "-")
                states[name] = state_dtype
                if args.reuse and (path / "sessa_config.json").is_file():
                    continue
                start = time.perf_counter()
                if mode == "fp32":
                    model = model or init_weights(SessaLM(config), seed=0, std=0.02).eval()
                    export_onnx(trace(model), path, state=contract, state_dtype=state_dtype)
                else:
                    quantize_export(variants[f"{contract} fp32{suffix}"], path, mode)
                print(f"wrote {path.name} in {time.perf_counter() - start:.1f} s", flush=True)
        del model
        weights = {name: weight_bytes(path) for name, path in variants.items()}
        rows = []
        for context in args.contexts:
            runners = {name: OrtRunner(path, threads, session_options(args.no_arena)) for name, path in variants.items()}
            timings = time_runners(runners, config.vocab_size, context, args.steps, rounds=args.rounds)
            del runners
            base = timings["grow fp32"].decode_ms_per_token
            for name, t in timings.items():
                ms = t.decode_ms_per_token
                state_bytes = state_values * STATE_DTYPES[states[name]].itemsize * context
                bound_ms = (weights[name] + state_bytes) / bandwidth * 1e3
                rows.append([context, name, f"{ms:.2f}", f"{t.best_decode_ms:.2f}", f"{bound_ms:.2f}",
                             f"{bound_ms / ms:.0%}", f"{base / ms:.2f}"])
            print(f"  context {context}: " + ", ".join(f"{n} {t.decode_ms_per_token:.1f} ms"
                                                      for n, t in timings.items()), flush=True)
        breakdown = ({name: op_times(path, args.profile, threads, config.vocab_size, by_node=args.profile_nodes)
                      for name, path in variants.items()}
                     if args.profile else None)
    print()
    print_table(["context", "export", "decode ms/token", "best ms", "bound ms", "of bound", "vs grow fp32"], rows,
                title=f"decode at batch 1 (median of {args.steps} steps in {args.rounds} rounds), ONNX Runtime CPU, "
                      f"{threads} threads; bound = (weights but the embedding + state at its dtype) / "
                      f"{bandwidth / 1e9:.1f} GB/s")
    if breakdown:
        ops = sorted({op for b in breakdown.values() for op in b},
                     key=lambda op: -max(b.get(op, 0) for b in breakdown.values()))
        print()
        print_table(["op"] + list(breakdown), [[op] + [f"{breakdown[n].get(op, 0):.2f}" for n in breakdown]
                                               for op in ops[:24 if args.profile_nodes else 16]],
                    title=f"where decode time goes at context {args.profile}: ms/token by op type"
                          f"{' and node' if args.profile_nodes else ''} (ORT profiler)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
