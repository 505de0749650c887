"""Token generation over any step runner: prefill, then decode with the state; greedy or sampled."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

import numpy as np

from .errors import SessaExportError


class StepRunner(Protocol):
    """A back end that runs the step graph: logits of S new tokens and the state of P + S positions."""

    name: str

    def empty_state(self, batch: int) -> Any: ...

    def step(self, input_ids: np.ndarray, state: Any) -> tuple[np.ndarray, Any]: ...


@dataclass(frozen=True)
class Sampling:
    """temperature 0 is greedy; top_k 0 and top_p 1 disable those filters."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise SessaExportError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise SessaExportError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise SessaExportError(f"top_p must lie in (0, 1], got {self.top_p}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise SessaExportError(f"seed must be an integer >= 0, got {self.seed}")


def next_tokens(logits: np.ndarray, sampling: Sampling, rng: np.random.Generator) -> np.ndarray:
    """Pick one token per row of logits [B, V]."""
    if sampling.temperature == 0.0:
        return logits.argmax(axis=-1)
    scaled = logits.astype(np.float64) / sampling.temperature
    if sampling.top_k:
        kth = np.sort(scaled, axis=-1)[:, -min(sampling.top_k, scaled.shape[-1])][:, None]
        scaled = np.where(scaled < kth, -np.inf, scaled)
    probs = np.exp(scaled - scaled.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    if sampling.top_p < 1.0:
        order = np.argsort(-probs, axis=-1)
        sorted_probs = np.take_along_axis(probs, order, axis=-1)
        keep_sorted = np.cumsum(sorted_probs, axis=-1) - sorted_probs < sampling.top_p
        keep = np.zeros_like(keep_sorted)
        np.put_along_axis(keep, order, keep_sorted, axis=-1)
        probs = np.where(keep, probs, 0.0)
        probs /= probs.sum(axis=-1, keepdims=True)
    return np.array([rng.choice(probs.shape[-1], p=row) for row in probs])


@dataclass
class Generation:
    """Generated tokens [B, N] and the time spent in prefill and decode."""

    tokens: np.ndarray
    prompt_tokens: int
    prefill_s: float
    decode_s: float
    extra: dict = field(default_factory=dict)

    @property
    def decode_tokens_per_s(self) -> float:
        steps = max(self.tokens.shape[1] - 1, 0)
        return steps / self.decode_s if self.decode_s > 0 else float("nan")


def generate(
    runner: StepRunner,
    prompt_ids: np.ndarray,
    max_new_tokens: int,
    sampling: Sampling = Sampling(),
    on_tokens: Callable[[np.ndarray], None] | None = None,
) -> Generation:
    """Prefill the prompt [B, T], then decode max_new_tokens one at a time, streaming through on_tokens."""
    rng = np.random.default_rng(sampling.seed)
    prompt_ids = np.asarray(prompt_ids, dtype=np.int64)
    out = np.zeros((prompt_ids.shape[0], max_new_tokens), dtype=np.int64)
    start = time.perf_counter()
    logits, state = runner.step(prompt_ids, runner.empty_state(prompt_ids.shape[0]))
    prefill_s = time.perf_counter() - start
    start = time.perf_counter()
    for i in range(max_new_tokens):
        token = next_tokens(logits[:, -1, :], sampling, rng)
        out[:, i] = token
        if on_tokens is not None:
            on_tokens(token)
        if i + 1 < max_new_tokens:
            logits, state = runner.step(token[:, None], state)
    return Generation(out, prompt_ids.shape[1], prefill_s, time.perf_counter() - start)


MAX_NEW_TOKENS = 1 << 20  # one generation's tokens: their ids alone are kept in memory


def check_new_tokens(max_new_tokens: int) -> None:
    """Refuse more than MAX_NEW_TOKENS new tokens, before anything loads."""
    if max_new_tokens > MAX_NEW_TOKENS:
        raise SessaExportError(f"--max-new-tokens {max_new_tokens} is more than one generation takes "
                               f"({MAX_NEW_TOKENS}); generate in several runs")


def prompt_ids(ids: Sequence[int], max_new_tokens: int, max_len: int | None, limit: str,
               option: str = "--prompt") -> np.ndarray:
    """A prompt's token ids as [1, T]; refuses an empty prompt (`option` names where it came from), more than
    MAX_NEW_TOKENS new tokens, or a prompt that leaves no room for them (`limit` says where the limit comes from)."""
    check_new_tokens(max_new_tokens)
    if not len(ids):
        raise SessaExportError(f"{option} is empty (no tokens)")
    if max_len is not None and len(ids) + max_new_tokens - 1 > max_len:
        raise SessaExportError(f"the prompt ({len(ids)} tokens) and --max-new-tokens {max_new_tokens} need "
                               f"{len(ids) + max_new_tokens - 1} positions; {limit}")
    return np.array([list(ids)], dtype=np.int64)
