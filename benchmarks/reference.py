"""Speed of the PyTorch reference path (`SessaLM.step`) on CPU: the baseline other targets beat.

Prints, for the bundled model and for a 125M-class model with random weights, as timed by
`sessa_export.bench.time_runners` (the CLI's `bench`):
- prefill tokens/s: one `step` over T = 1024 tokens from an empty state (median of 4);
- decode ms/token at a context of 1024: prefill 1024 tokens, then `step` one token at a time
  (median over 32 steps in 4 blocks, the context growing from 1024 to 1060).

Run: python benchmarks/reference.py [--threads N] [--only bundled|125m]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (DECODE_CONTEXT, DECODE_STEPS, config_125m,  # noqa: E402
                    machine_description, print_table, set_threads)

from sessa_export.bench import decode_positions, time_runners  # noqa: E402
from sessa_export.model import SessaLM, init_weights  # noqa: E402
from sessa_export.runtime import TorchRunner  # noqa: E402


def load_bundled() -> tuple[SessaLM | None, str]:
    try:
        from sessa_export.data import BUNDLED_MODEL
        from sessa_export.checkpoint import load_checkpoint
    except ImportError as exc:
        return None, f"bundled model unavailable ({exc})"
    if not Path(BUNDLED_MODEL).exists():
        return None, f"bundled model not found at {BUNDLED_MODEL} (not trained yet?): skipped"
    return load_checkpoint(BUNDLED_MODEL), str(BUNDLED_MODEL)


def benchmark_models(only: str | None) -> list[tuple[str, SessaLM]]:
    """The bundled model (when present) and the 125M-class random model, as `--only` selects."""
    models: list[tuple[str, SessaLM]] = []
    if only in (None, "bundled"):
        model, where = load_bundled()
        print(f"bundled: {where}" if model is not None else where, flush=True)
        if model is not None:
            models.append(("bundled", model.eval()))
    if only in (None, "125m"):
        torch.manual_seed(0)
        models.append(("125M random", init_weights(SessaLM(config_125m()), seed=0, std=0.02).eval()))
    return models


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all available cores)")
    parser.add_argument("--only", choices=("bundled", "125m"), default=None)
    parser.add_argument("--context", type=int, default=DECODE_CONTEXT, help="prefill length and decode context")
    parser.add_argument("--decode-steps", type=int, default=DECODE_STEPS)
    args = parser.parse_args(argv)

    set_threads(args.threads)
    print(f"machine: {machine_description()}", flush=True)

    models = benchmark_models(args.only)

    rows = []
    for name, model in models:
        c = model.config
        if c.max_len is not None and c.max_len < args.context + decode_positions(args.decode_steps):
            print(f"{name}: max_len={c.max_len} is shorter than the benchmark's context: skipped", flush=True)
            continue
        t = time_runners({name: TorchRunner(model)}, c.vocab_size, args.context, args.decode_steps)[name]
        rows.append((
            name, f"{model.num_parameters() / 1e6:.2f}M",
            f"{c.n_layers}x{c.d_model} H={c.n_heads}/{c.kv_heads}",
            f"{t.prefill_tokens_per_s:,.0f}", f"{statistics.median(t.prefill_s) * 1e3:,.0f}",
            f"{t.decode_ms_per_token:.2f}", f"{t.best_decode_ms:.2f}",
        ))
        print(f"{name}: done", flush=True)
    print()
    print_table(
        ("model", "params", "shape", f"prefill tok/s (T={args.context})", "prefill ms",
         f"decode ms/token (ctx {args.context}, median)", "decode min ms"),
        rows, title="PyTorch reference (SessaLM.step, float32, torch.inference_mode)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
