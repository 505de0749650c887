"""The in-place capacity rule's cost: one export's decode at a context, its caches sized by two block sizes.

ONNX Runtime's CPU attention reads the whole capacity of an in-place cache, so the rows past the
context a capacity rule leaves cost a decode step time. For each in-place export given (for example
the `inplace-*` folders of `benchmarks/inplace_state.py --workdir DIR`), this prefills --context
random tokens into caches grown by whole blocks of each --blocks size (state.CAPACITY_BLOCK is the
one `OrtRunner` uses), takes the growth step, then times single-token decode steps from that state
in turns (the same position every step, so both read the same rows).

Run: python benchmarks/capacity_block.py DIR [DIR ...] [--context 1024] [--blocks 64,256] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_description, print_table  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("exports", nargs="+", type=Path, help="in-place ONNX exports (export --state inplace)")
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--blocks", default="64,256", help="capacity block sizes to compare")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8, help="decode steps per turn; 6 turns")
    args = parser.parse_args(argv)

    from sessa_export import state
    from sessa_export.runtime import OrtRunner, vocab_size

    print(machine_description(), flush=True)
    blocks = [int(b) for b in args.blocks.split(",")]
    rows = []
    for path in args.exports:
        runner = OrtRunner(path, threads=args.threads)
        ids = np.random.default_rng(0).integers(0, vocab_size(runner), (1, args.context + 1))
        states = {}
        for block in blocks:  # capacity_for reads the block at each call
            state.CAPACITY_BLOCK = block
            _, prefilled = runner.step(ids[:, :args.context], runner.empty_state(1))
            _, states[block] = runner.step(ids[:, args.context:], prefilled)  # the growth past the context
        times = {block: [] for block in blocks}
        for _ in range(6):
            for block in blocks:
                for _ in range(args.steps):
                    start = time.perf_counter()
                    runner.step(ids[:, -1:], states[block])
                    times[block].append(time.perf_counter() - start)
        base = statistics.median(times[blocks[0]])
        for block in blocks:
            ms = statistics.median(times[block])
            rows.append((path.name, block, states[block].capacity, f"{1e3 * ms:.2f}", f"{ms / base:.3f}"))
    print_table(("export", "block", "capacity", "decode ms (median)", f"vs block {blocks[0]}"), rows,
                title=f"decode at context {args.context + 1}, ONNX Runtime CPU, {args.threads} threads")
    return 0


if __name__ == "__main__":
    sys.exit(main())
