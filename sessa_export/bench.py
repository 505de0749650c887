"""Timing of step runners (runtime.py's interface): prefill tokens/s and decode ms/token at a context.

Several runners are timed in turns: `rounds` rounds, each one prefill and one block of decode
steps per runner, so that load from elsewhere on a shared machine hits them all alike and the
ratios between them stay fair. Each turn starts after a pause of SETTLE_S: ONNX Runtime's and
torch's thread pools spin for a while after they run: without it (`benchmarks/onnx_runtime.py
--settle 0`) PyTorch measured up to 2.8x slower right after an ORT turn. A block's first RAMP_STEPS
decode steps are not timed either: after the pause (and the prefill) the machine takes a few steps to
come back up to speed, which a generation loop, stepping back to back, does not see: a q4 TVM decode
of 2.0 ms a step at context 64 took 4.3, 4.0, 3.8, 3.3, 3.0, 2.8, 2.3, 2.3 ms for the first eight
steps after the pause and a prefill (2026-12-02, Intel Xeon; on the AMD EPYC before, four steps
were enough).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from .errors import SessaExportError

ROUNDS = 4  # turns each runner takes: one prefill and one block of decode steps per turn
SETTLE_S = 0.5  # pause before each turn: the previous runner's spinning thread pool goes idle
RAMP_STEPS = 8  # untimed decode steps at the start of each block


@dataclass
class Timing:
    """Seconds per prefill of `context` tokens and per decode step at `context` and a little beyond."""

    context: int
    batch: int
    prefill_s: list[float] = field(default_factory=list)
    decode_s: list[float] = field(default_factory=list)

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.batch * self.context / statistics.median(self.prefill_s)

    @property
    def decode_ms_per_token(self) -> float:
        return 1e3 * statistics.median(self.decode_s)

    @property
    def best_decode_ms(self) -> float:
        return 1e3 * min(self.decode_s)


def decode_positions(decode_steps: int, rounds: int = ROUNDS) -> int:
    """Positions the decode blocks add after the prefill (timed steps plus RAMP_STEPS untimed per block)."""
    return rounds * (-(-decode_steps // rounds) + RAMP_STEPS)


def time_runners(runners: Mapping[str, object], vocab_size: int, context: int = 1024, decode_steps: int = 32,
                 batch: int = 1, rounds: int = ROUNDS, warmup: int = 3, seed: int = 0,
                 settle_s: float = SETTLE_S, tokens: Sequence[int] | None = None) -> dict[str, Timing]:
    """Prefill of `context` tokens and `decode_steps` decode steps after it, for every runner in turns.

    Each runner first prefills twice untimed (first-run allocations: the decode's state, and one
    that its pool then hands to every timed prefill, as it would to a server's next prompt) and
    takes `warmup` untimed decode steps from the first prefill; its timed decode then continues
    from that prefill, so every runner decodes the same tokens at the same positions. `decode_steps` is rounded up to
    a multiple of `rounds` (one block of steps per round). A runner whose `max_len` is shorter
    than the positions this needs is refused before anything runs. The ids fed are `tokens` (repeated
    to the positions needed, every row alike), or random ones.
    """
    per_block = -(-decode_steps // rounds)
    positions = context + decode_positions(decode_steps, rounds)
    for name, runner in runners.items():
        limit = getattr(runner, "max_len", None)
        if limit is not None and positions > limit:
            raise SessaExportError(f"{name} runs at most {limit} positions; the benchmark needs {positions} (a context "
                                   f"of {context}, then {positions - context} for decode): lower --context or "
                                   "--decode-steps")
    if tokens is not None and len(tokens):
        ids = np.tile(np.resize(np.asarray(tokens, dtype=np.int64), positions), (batch, 1))
    else:
        ids = np.random.default_rng(seed).integers(0, vocab_size, (batch, positions))
    timings = {name: Timing(context, batch) for name in runners}
    states, position = {}, dict.fromkeys(runners, context)
    for name, runner in runners.items():
        _, prefilled = runner.step(ids[:, :context], runner.empty_state(batch))
        for _ in range(warmup):  # the same step from the prefilled state: it stays the one decode starts from
            runner.step(ids[:, context:context + 1], prefilled)
        states[name] = prefilled
        runner.step(ids[:, :context], runner.empty_state(batch))  # its caches go back to the runner's pool
    for _ in range(rounds):
        for name, runner in runners.items():
            time.sleep(settle_s)
            empty = runner.empty_state(batch)
            start = time.perf_counter()
            runner.step(ids[:, :context], empty)
            timings[name].prefill_s.append(time.perf_counter() - start)
            del empty  # a new sequence's state, dropped as a server drops a finished one
            for t in range(RAMP_STEPS + per_block):
                token = ids[:, position[name]:position[name] + 1]
                start = time.perf_counter()
                logits, states[name] = runner.step(token, states[name])
                np.argmax(logits[:, -1], axis=-1)  # what a decoder does next; keeps the output live
                if t >= RAMP_STEPS:
                    timings[name].decode_s.append(time.perf_counter() - start)
                position[name] += 1
    return timings
