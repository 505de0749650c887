"""Timing of any step runner: prefill tokens/s and decode ms/token at a given context."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Timing:
    prefill_tokens_per_s: float
    decode_ms_per_token: float
    context: int
    batch: int


def bench_runner(runner, vocab_size: int, context: int = 1024, decode_steps: int = 32, batch: int = 1,
                 repeats: int = 3, seed: int = 0) -> Timing:
    """Median of `repeats` prefills of `context` tokens, then the median decode step after that context."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab_size, (batch, context))
    runner.step(ids[:, :8], runner.empty_state(batch))  # warm-up: first-run allocations and compilation
    prefill_s = []
    for _ in range(repeats):
        start = time.perf_counter()
        _, state = runner.step(ids, runner.empty_state(batch))
        prefill_s.append(time.perf_counter() - start)
    token = rng.integers(0, vocab_size, (batch, 1))
    step_s = []
    for _ in range(decode_steps):
        start = time.perf_counter()
        _, state = runner.step(token, state)
        step_s.append(time.perf_counter() - start)
    return Timing(batch * context / statistics.median(prefill_s), 1e3 * statistics.median(step_s), context, batch)
