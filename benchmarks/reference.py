"""Speed of the PyTorch reference path (`SessaLM.step`) on CPU: the baseline other targets beat.

Prints, for the bundled model and for a 125M-class model with random weights:
- prefill tokens/s: one `step` over T = 1024 tokens from an empty state;
- decode ms/token at a context of 1024: prefill 1024 tokens, then `step` one token at a time
  (median over 32 steps, the context growing from 1024 to 1055).

Run: python benchmarks/reference.py [--threads N] [--only bundled|125m]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (DECODE_CONTEXT, DECODE_STEPS, PREFILL_TOKENS, config_125m,  # noqa: E402
                    machine_description, print_table, set_threads, time_callable)

from sessa_export.model import SessaLM, init_weights  # noqa: E402


def bench_prefill(model: SessaLM, tokens: int, repeat: int) -> float:
    """Seconds for one step over `tokens` tokens from an empty state (median)."""
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        return time_callable(lambda: model.step(ids, model.empty_state(1)), repeat=repeat, warmup=1).median


def bench_decode(model: SessaLM, context: int, steps: int, warmup: int = 3) -> list[float]:
    """Seconds per decode step, `steps` consecutive steps after a prefill of `context` tokens."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (1, context + steps), generator=gen)
    samples = []
    with torch.inference_mode():
        _, prefilled = model.step(ids[:, :context], model.empty_state(1))
        states = prefilled
        for t in range(warmup):  # step is pure: warm up from the prefilled state, then discard
            _, states = model.step(ids[:, context + t:context + t + 1], states)
        states = prefilled
        for t in range(steps):
            token = ids[:, context + t:context + t + 1]
            start = time.perf_counter()
            logits, states = model.step(token, states)
            logits.argmax(-1)  # what a decoder does next; keeps the step's output live
            samples.append(time.perf_counter() - start)
    return samples


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
    parser.add_argument("--prefill-tokens", type=int, default=PREFILL_TOKENS)
    parser.add_argument("--context", type=int, default=DECODE_CONTEXT)
    parser.add_argument("--decode-steps", type=int, default=DECODE_STEPS)
    parser.add_argument("--repeat", type=int, default=3, help="timed prefill runs (median reported)")
    args = parser.parse_args(argv)

    set_threads(args.threads)
    print(f"machine: {machine_description()}", flush=True)

    models = benchmark_models(args.only)

    rows = []
    for name, model in models:
        c = model.config
        if c.max_len is not None and c.max_len < max(args.prefill_tokens, args.context + args.decode_steps):
            print(f"{name}: max_len={c.max_len} is shorter than the benchmark's context: skipped", flush=True)
            continue
        prefill_s = bench_prefill(model, args.prefill_tokens, args.repeat)
        decode = bench_decode(model, args.context, args.decode_steps)
        rows.append((
            name, f"{model.num_parameters() / 1e6:.2f}M",
            f"{c.n_layers}x{c.d_model} H={c.n_heads}/{c.kv_heads}",
            f"{args.prefill_tokens / prefill_s:,.0f}", f"{prefill_s * 1e3:,.0f}",
            f"{statistics.median(decode) * 1e3:.2f}", f"{min(decode) * 1e3:.2f}",
        ))
        print(f"{name}: done", flush=True)
    print()
    print_table(
        ("model", "params", "shape", f"prefill tok/s (T={args.prefill_tokens})", "prefill ms",
         f"decode ms/token (ctx {args.context}, median)", "decode min ms"),
        rows, title="PyTorch reference (SessaLM.step, float32, torch.inference_mode)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
