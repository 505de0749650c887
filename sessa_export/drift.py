"""Drift: what a narrower state (export/compile --state-dtype) costs over a long greedy decode.

The float32 reference decodes greedily from a prompt; the artifact is fed the same tokens (so the
two stay on one sequence) and its logits are compared at every step. A rounded state feeds every
later step, so its error can grow with the context: the report gives the error relative to the
step's max |reference logits|, over the whole decode and over its first and last windows, and how
often both models pick the same next token.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np

from .errors import SessaExportError

DEFAULT_STEPS = 4096
WINDOW = 256  # steps averaged at the start and the end of the decode


@dataclass
class DriftReport:
    """Per-step relative logits errors of a greedy decode, summarised."""

    state_dtype: str
    prompt_tokens: int
    steps: int
    max_error: float  # max over steps of max|candidate − reference| / max|reference|
    first_window_error: float  # mean of the per-step errors over the first WINDOW steps
    last_window_error: float  # ... and over the last WINDOW steps
    argmax_agreement: float
    bar: float | None  # None: reported, not a bar (a quantized artifact's error is mostly its weights')

    @property
    def ok(self) -> bool:
        return self.bar is None or self.max_error <= self.bar

    def to_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok}


def greedy_drift(reference, candidate, prompt: np.ndarray, steps: int, state_dtype: str, bar: float | None,
                 progress: Callable[[int], None] = lambda _: None) -> DriftReport:
    """Decode `steps` tokens greedily with `reference` after `prompt` [1, T], feed the same tokens to
    `candidate`, and compare the logits at every step."""
    if steps < 1 or prompt.ndim != 2 or prompt.shape[0] != 1 or prompt.shape[1] < 1:
        raise SessaExportError(f"drift needs a prompt [1, T >= 1] and steps >= 1, got {list(prompt.shape)}, {steps}")
    ref_logits, ref_state = reference.step(prompt, reference.empty_state(1))
    cand_logits, cand_state = candidate.step(prompt, candidate.empty_state(1))
    errors, agree = [], 0
    for step in range(steps):
        ref_last, cand_last = ref_logits[0, -1].astype(np.float64), cand_logits[0, -1].astype(np.float64)
        errors.append(float(np.abs(cand_last - ref_last).max() / max(np.abs(ref_last).max(), 1e-30)))
        token = int(ref_last.argmax())
        agree += token == int(cand_last.argmax())
        if step + 1 < steps:
            ids = np.array([[token]], dtype=np.int64)
            ref_logits, ref_state = reference.step(ids, ref_state)
            cand_logits, cand_state = candidate.step(ids, cand_state)
        progress(step + 1)
    window = min(WINDOW, steps)
    return DriftReport(state_dtype, int(prompt.shape[1]), steps, max(errors), float(np.mean(errors[:window])),
                       float(np.mean(errors[-window:])), agree / steps, bar)


def render(report: DriftReport, console) -> None:
    """One table of the drift report."""
    from rich.table import Table

    table = Table(title=f"drift: {report.state_dtype} state, greedy decode of {report.steps} steps after a "
                        f"{report.prompt_tokens}-token prompt, vs the float32 reference", show_header=False)
    table.add_row("max |logits error| / max |ref logits|", f"{report.max_error:.3e}"
                  + ("" if report.bar is None else f" (bar {report.bar:g}: {'PASS' if report.ok else 'FAIL'})"))
    table.add_row(f"mean over the first {min(WINDOW, report.steps)} steps", f"{report.first_window_error:.3e}")
    table.add_row(f"mean over the last {min(WINDOW, report.steps)} steps", f"{report.last_window_error:.3e}")
    table.add_row("argmax agreement", f"{report.argmax_agreement:.2%}")
    console.print(table)


__all__ = ["DEFAULT_STEPS", "DriftReport", "greedy_drift", "render"]
