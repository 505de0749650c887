"""How long `compile` takes, its kernels built on one core against all the cores this process may use.

`sessa_export.to_tvm.lower` builds a CPU library's kernels as one LLVM module each, on as many threads
as cores, and the packager writes their objects in parallel; both are kept for the process
(targets/kernel_cache.py). This script compiles each model in turns with this process pinned to one
core and unpinned, the kept kernels forgotten before each (a first compile of its kernels), and then
unpinned with them kept (a library whose kernels this process built before), after one warm-up compile
that pays the first kernel constructions, and prints the seconds of each compile (the median of
--turns) and the ratios. The models: the bundled one (capacity 128) and the 125M-class config (random
weights, capacity 2048), float32 and --quantization q4.

Run: python benchmarks/compile_time.py [--turns 3] [--only bundled|125m]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import config_125m, machine_description, print_table  # noqa: E402


def models(only: str | None):
    """(name, step graph, capacity) of each model to compile."""
    from sessa_export.checkpoint import load_checkpoint
    from sessa_export.data import BUNDLED_MODEL
    from sessa_export.model import SessaLM
    from sessa_export.tracer import trace

    if only in (None, "bundled"):
        yield "bundled", trace(load_checkpoint(BUNDLED_MODEL)), 128
    if only in (None, "125m"):
        yield "125M", trace(SessaLM(config_125m()).eval()), 2048


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--only", choices=("bundled", "125m"), default=None)
    args = parser.parse_args()
    from sessa_export.targets import kernel_cache
    from sessa_export.to_tvm import CompileTarget, compile_graph

    cores = os.sched_getaffinity(0)
    print(machine_description())
    rows, work = [], Path(tempfile.mkdtemp(prefix="sessa-compile-time-"))
    try:
        for name, graph, capacity in models(args.only):
            for quantization in (None, "q4"):
                def compile_once(pinned: bool, kept: bool = False) -> float:
                    os.sched_setaffinity(0, {min(cores)} if pinned else cores)
                    if not kept:
                        kernel_cache.clear()
                    out = work / "out"
                    shutil.rmtree(out, ignore_errors=True)
                    started = time.perf_counter()
                    compile_graph(graph, out, CompileTarget("cpu"), max_len=capacity, quantization=quantization)
                    return time.perf_counter() - started

                compile_once(False)  # the first compile of a shape builds its TVMScript kernels
                seconds = {"one": [], "every": [], "kept": []}
                for _ in range(args.turns):
                    seconds["one"].append(compile_once(True))
                    seconds["every"].append(compile_once(False))
                    seconds["kept"].append(compile_once(False, kept=True))
                one, every, kept = (statistics.median(seconds[k]) for k in ("one", "every", "kept"))
                rows.append([f"{name} {quantization or 'fp32'}", f"{one:.2f}", f"{every:.2f}", f"{one / every:.2f}",
                             f"{kept:.2f}", f"{every / kept:.2f}"])
                print(f"{rows[-1][0]}: " + ", ".join(f"{k} {[f'{s:.2f}' for s in v]}" for k, v in seconds.items()),
                      flush=True)
    finally:
        os.sched_setaffinity(0, cores)
        shutil.rmtree(work, ignore_errors=True)
    print_table(["model", "s, one core", f"s, {len(cores)} cores", "ratio", "s, kernels kept", "ratio"], rows,
                title=f"compile --target cpu, median of {args.turns} turns")


if __name__ == "__main__":
    main()
