"""Numerical parity of an exported model against the PyTorch reference, step by step.

Both runners get the same tokens (random, and the bundled held-out text) in the same steps:
a prefill followed by single-token decode steps, and a prefill in uneven chunks. After every step
the logits and the state rows written in that step are compared; at the end the whole state is.
A tensor passes when max|got − ref| ≤ atol + rtol · max|ref| (errors relative to the tensor's scale).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np


@dataclass(frozen=True)
class Tolerance:
    atol: float
    rtol: float

    def allows(self, max_abs: float, scale: float) -> bool:
        return max_abs <= self.atol + self.rtol * scale


FP32 = Tolerance(atol=1e-4, rtol=1e-4)


@dataclass
class TensorError:
    """Worst error seen for one tensor kind over a case."""

    max_abs: float = 0.0
    max_rel: float = 0.0
    first_bad_step: int | None = None
    worst: str = ""  # the tensor (layer) where max_abs was seen

    def update(self, name: str, ref: np.ndarray, got: np.ndarray, step: int, tol: Tolerance) -> None:
        if ref.size == 0:
            return
        diff = float(np.max(np.abs(got.astype(np.float64) - ref.astype(np.float64))))
        scale = float(np.max(np.abs(ref)))
        if not np.isfinite(diff):
            diff = float("inf")
        if diff >= self.max_abs:
            self.max_abs, self.worst = diff, name
        self.max_rel = max(self.max_rel, diff / scale if scale > 0 else diff)
        if self.first_bad_step is None and not tol.allows(diff, scale):
            self.first_bad_step = step


@dataclass
class CaseReport:
    name: str
    steps: list[int]
    tensors: dict[str, TensorError] = field(default_factory=dict)
    argmax_agreement: float = 0.0

    @property
    def ok(self) -> bool:
        return all(t.first_bad_step is None for t in self.tensors.values())


def run_case(name: str, reference, candidate, ids: np.ndarray, steps: list[int], tol: Tolerance) -> CaseReport:
    """Feed `ids` [B, T] to both runners in chunks of `steps` sizes and record the errors."""
    report = CaseReport(name, steps)
    errors = report.tensors
    errors["logits"] = TensorError()
    ref_state, got_state = reference.empty_state(ids.shape[0]), candidate.empty_state(ids.shape[0])
    layout = candidate.layout
    agree, total, pos = 0, 0, 0
    for index, size in enumerate(steps):
        chunk = ids[:, pos:pos + size]
        ref_logits, ref_state = reference.step(chunk, ref_state)
        got_logits, got_state = candidate.step(chunk, got_state)
        errors["logits"].update("logits", ref_logits, got_logits, index, tol)
        agree += int((ref_logits.argmax(-1) == got_logits.argmax(-1)).sum())
        total += ref_logits.shape[0] * ref_logits.shape[1]
        ref_arrays, got_arrays = reference.state_arrays(ref_state), candidate.state_arrays(got_state)
        last = index == len(steps) - 1
        for key, ref in ref_arrays.items():  # a reference without step state (ForwardRunner) has none
            got, field = got_arrays[key], layout.field_of(key)
            if not last:  # the rows this step wrote; the last step compares the whole state
                axis = layout.position_axis(field)
                ref, got = np.take(ref, range(pos, pos + size), axis), np.take(got, range(pos, pos + size), axis)
            errors.setdefault(field, TensorError()).update(key, ref, got, index, tol)  # one entry per field
        pos += size
    report.argmax_agreement = agree / max(total, 1)
    return report


def cases(vocab_size: int, prefill: int, decode: int, text: bytes | None, seed: int,
          max_len: int | None) -> list[tuple[str, np.ndarray, list[int]]]:
    """The default cases: random tokens (batch 2) and text, prefill + decode; random uneven chunks."""
    rng = np.random.default_rng(seed)
    length = prefill + decode
    if max_len is not None and length > max_len:
        prefill = max(1, max_len * prefill // length)
        decode, length = max_len - prefill, max_len
    decode_steps = [prefill] + [1] * decode
    out = [("random, prefill + decode (batch 2)", rng.integers(0, vocab_size, (2, length)), decode_steps)]
    if text is not None and vocab_size >= 256 and len(text) >= length:
        start = int(rng.integers(0, len(text) - length + 1))
        ids = np.frombuffer(text[start:start + length], dtype=np.uint8).astype(np.int64)[None, :]
        out.append(("held-out text, prefill + decode", ids, decode_steps))
    chunks, left = [], length
    while left:
        size = int(min(left, rng.integers(1, max(2, length // 3))))
        chunks.append(size)
        left -= size
    out.append(("random, chunked prefill", rng.integers(0, vocab_size, (1, length)), chunks))
    return out


def report_dict(reports: list[CaseReport], tol: Tolerance) -> dict:
    return {"ok": all(r.ok for r in reports), "tolerance": asdict(tol),
            "cases": [{"name": r.name, "ok": r.ok, "steps": len(r.steps), "argmax_agreement": r.argmax_agreement,
                       "tensors": {k: asdict(v) for k, v in r.tensors.items()}} for r in reports]}


def render(reports: list[CaseReport], tol: Tolerance, console) -> None:
    """The parity tables and the verdict on a rich console."""
    from rich.table import Table

    console.print(f"parity: a tensor passes when max abs <= {tol.atol:g} + {tol.rtol:g} * max|reference|")
    for r in reports:
        table = Table(title=f"{r.name}: {len(r.steps)} steps, argmax agreement {r.argmax_agreement:.2%}",
                      title_justify="left")
        for col in ("tensor", "max abs", "max rel", "first bad step", "worst at"):
            table.add_column(col)
        for name, e in r.tensors.items():
            bad = "-" if e.first_bad_step is None else f"[red]{e.first_bad_step}[/red]"
            table.add_row(name, f"{e.max_abs:.2e}", f"{e.max_rel:.2e}", bad, e.worst.removeprefix("past_key_values."))
        console.print(table)
    failed = [r.name for r in reports if not r.ok]
    console.print("[green]PASS[/green]" if not failed else f"[red]FAIL[/red]: {'; '.join(failed)}")
