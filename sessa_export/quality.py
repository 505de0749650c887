"""Quality of a quantized export against the float32 reference on held-out text.

Both models read the same tokens: by default 16384 bytes of the bundled held-out text, as 64
windows of 256 bytes spread evenly over the whole text (a batch of 64 sequences), each prefilled
in chunks of 128 tokens with the state carried from chunk to chunk, as a long prompt is served.
The window is the bundled model's training context: past it the float32 model itself degrades
(on the same 16384 bytes: 2.10 bits per byte in 256-byte windows, 2.88 in 512, 3.88 in 1024,
4.85 in 4096), and comparing two models that are both wrong says little; `--window` sets it for
other models. A model that is not byte-level reads token ids instead (`--text-ids`, or the text
through its tokenizer: sessa_export/tokenizer.py), and the figures are then per token.
Spreading the windows makes the sample cover every file of the text rather than the first one
(a table of Tk constants, much harder to predict than the rest).
At every position we compare the next-token distributions:

- top-1 agreement: how often the two argmaxes agree;
- KL(reference ‖ quantized) of the softmaxes, in nats: mean and max over positions;
- bits per byte (mean −log2 p(next byte)) of each model and their difference (per token for token ids);
- logits error: max |quantized − reference| over all positions and the vocabulary, relative to
  the logits' scale max |reference|;
- size on disk of the float32 export and of the quantized one.

Thresholds per mode (`THRESHOLDS`; `validate` exits 1 when one fails):
- int8: top-1 agreement >= 99% and mean KL <= 0.01;
- int4: top-1 agreement >= 95% and bits per byte at most 3% above float32 (set for block 32;
  larger blocks are held to the same bar);
- fp16: max |logits error| <= 1e-2 of the logits' scale;
- state: the same, for float32 weights with a float16 or bfloat16 state (--state-dtype).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .errors import SessaExportError
from .tokenizer import BYTE_VOCAB, check_ids

DEFAULT_BYTES = 16384
DEFAULT_WINDOW = 256
DEFAULT_CHUNK = 128
LN2 = math.log(2.0)

# (metric, comparison, limit) per mode
THRESHOLDS: dict[str, list[tuple[str, str, float]]] = {
    "int8": [("top1_agreement", ">=", 0.99), ("kl_mean", "<=", 0.01)],
    "int4": [("top1_agreement", ">=", 0.95), ("bpb_increase", "<=", 0.03)],
    "fp16": [("logits_error", "<=", 1e-2)],
    "state": [("logits_error", "<=", 1e-2)],
}

LABELS = {
    "top1_agreement": "top-1 agreement",
    "kl_mean": "mean KL (nats)",
    "bpb_increase": "bits/{unit} increase (relative)",
    "logits_error": "max |logits error| / max |ref logits|",
}


def format_bytes(n: float | None) -> str:
    """A byte count for people: 512 B, 5.67 MiB; '?' when unknown."""
    if not n:
        return "?" if n is None else "0 B"
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


@dataclass
class Check:
    metric: str
    op: str
    limit: float
    value: float

    @property
    def ok(self) -> bool:
        if not math.isfinite(self.value):
            return False
        return self.value >= self.limit if self.op == ">=" else self.value <= self.limit


@dataclass
class QualityReport:
    mode: str
    positions: int
    windows: int
    window: int
    chunk: int
    top1_agreement: float
    kl_mean: float
    kl_max: float
    bpb_reference: float
    bpb_quantized: float
    logits_max_abs: float
    logits_scale: float
    size_reference: int | None = None
    size_quantized: int | None = None
    checks: list[Check] = field(default_factory=list)
    unit: str = "byte"  # what a position is: "byte" (byte-level text) or "token" (token ids)

    @property
    def bpb_diff(self) -> float:
        return self.bpb_quantized - self.bpb_reference

    @property
    def bpb_increase(self) -> float:
        return self.bpb_diff / self.bpb_reference if self.bpb_reference > 0 else float("inf")

    @property
    def logits_error(self) -> float:
        return self.logits_max_abs / self.logits_scale if self.logits_scale > 0 else float("inf")

    @property
    def size_ratio(self) -> float | None:
        if self.size_reference and self.size_quantized:
            return self.size_quantized / self.size_reference
        return None

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["checks"] = [{**asdict(c), "ok": c.ok} for c in self.checks]
        data.update(bpb_diff=self.bpb_diff, bpb_increase=self.bpb_increase, logits_error=self.logits_error,
                    size_ratio=self.size_ratio, ok=self.ok)
        return data


def text_ids(text: bytes | np.ndarray, length: int = DEFAULT_BYTES, vocab_size: int = BYTE_VOCAB,
             window: int = DEFAULT_WINDOW, max_len: int | None = None) -> np.ndarray:
    """`length` positions of `text` as token ids [windows, window]: bytes are byte-level ids (a 256-token
    vocabulary), an integer array [N] is token ids already (checked against `vocab_size`).

    length // window windows spread evenly from the start to the end of the text, so that a sample
    covers the whole text rather than its first file; a window as long as the text gives one
    sequence. `length` below one window is refused rather than silently raised to it.
    """
    if isinstance(text, (bytes, bytearray)):
        if vocab_size != BYTE_VOCAB:
            raise SessaExportError(f"the quality check reads this text as bytes, but the model's vocabulary has "
                                   f"{vocab_size} tokens: pass --tokenizer tokenizer.json (the text is tokenized) "
                                   "or --text-ids FILE (token ids, one per line or a .npy)")
        data, unit, option = np.frombuffer(bytes(text), dtype=np.uint8).astype(np.int64), "bytes", "--bytes"
        source = "pass a longer --text"
    else:
        data = check_ids(np.asarray(text), vocab_size, "the evaluation token ids", "the model")
        unit, option, source = "tokens", "--tokens", "pass more ids (--text-ids) or a longer --text"
    if window < 2:
        raise SessaExportError(f"--window must be >= 2, got {window}")
    if len(data) < min(length, DEFAULT_BYTES):
        raise SessaExportError(f"the evaluation text has {len(data)} {unit}, fewer than the "
                               f"{min(length, DEFAULT_BYTES)} the quality check reads: {source} "
                               f"(or {option} as many as it has)")
    window = min(window, max_len or window, len(data))
    if length < window:
        raise SessaExportError(f"{option} {length} is less than one window of {window} {unit}: "
                               f"pass {option} >= {window} or a smaller --window")
    count = max(1, min(length, len(data)) // window)
    span = len(data) - window
    starts = [round(i * span / (count - 1)) for i in range(count)] if count > 1 else [0]
    return np.stack([data[s:s + window] for s in starts])


def run_logits(runner, ids: np.ndarray, chunk: int = DEFAULT_CHUNK) -> np.ndarray:
    """Logits [B, T, V] (float32) of a runner over ids [B, T] in a chunked prefill with the state carried."""
    if chunk < 1:
        raise SessaExportError(f"--chunk must be >= 1, got {chunk}")
    state = runner.empty_state(ids.shape[0])
    pieces = []
    for start in range(0, ids.shape[1], chunk):
        logits, state = runner.step(ids[:, start:start + chunk], state)
        pieces.append(np.asarray(logits, dtype=np.float32))
    return np.concatenate(pieces, axis=1)


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def compare(mode: str, reference: np.ndarray, quantized: np.ndarray, ids: np.ndarray, chunk: int = DEFAULT_CHUNK,
            size_reference: int | None = None, size_quantized: int | None = None, unit: str = "byte") -> QualityReport:
    """Metrics of quantized vs reference logits [B, T, V] for the token ids [B, T] they were computed on
    (`unit`: what a position is, "byte" or "token")."""
    if mode not in THRESHOLDS:
        raise SessaExportError(f"unknown quantization mode {mode!r} in the manifest")
    if reference.shape != quantized.shape:
        raise SessaExportError(f"logits shapes differ: reference {reference.shape}, quantized {quantized.shape}")
    windows, window, vocab = reference.shape
    kl, agree, nll_ref, nll_q, max_abs, scale = [], 0, 0.0, 0.0, 0.0, 0.0
    for b in range(windows):  # one window at a time: bounded memory for large vocabularies
        diff = np.abs(quantized[b].astype(np.float64) - reference[b].astype(np.float64))
        max_abs = max(max_abs, float(diff.max()) if np.all(np.isfinite(diff)) else float("inf"))
        scale = float(np.maximum(scale, np.abs(reference[b]).max()))  # NaN propagates: the check fails
        ref_lp, q_lp = _log_softmax(reference[b]), _log_softmax(quantized[b])
        kl.append((np.exp(ref_lp) * (ref_lp - q_lp)).sum(axis=-1))
        agree += int((ref_lp.argmax(-1) == q_lp.argmax(-1)).sum())
        rows, targets = np.arange(window - 1), ids[b, 1:]  # the last position has no next byte
        nll_ref -= float(ref_lp[rows, targets].sum())
        nll_q -= float(q_lp[rows, targets].sum())
    kl = np.concatenate(kl)
    predicted = max(windows * (window - 1), 1)
    report = QualityReport(
        mode=mode, positions=windows * window, windows=windows, window=window, chunk=chunk,
        top1_agreement=agree / (windows * window),
        kl_mean=float(np.mean(np.maximum(kl, 0.0))), kl_max=float(np.max(kl)),
        bpb_reference=nll_ref / predicted / LN2, bpb_quantized=nll_q / predicted / LN2,
        logits_max_abs=max_abs, logits_scale=scale,
        size_reference=size_reference, size_quantized=size_quantized, unit=unit)
    report.checks = [Check(metric, op, limit, float(getattr(report, metric))) for metric, op, limit in THRESHOLDS[mode]]
    return report


def evaluate(reference, candidate, mode: str, text: bytes | np.ndarray, length: int = DEFAULT_BYTES,
             window: int = DEFAULT_WINDOW, chunk: int = DEFAULT_CHUNK, size_reference: int | None = None,
             size_quantized: int | None = None) -> QualityReport:
    """Run both runners over `length` positions of `text` (bytes, or token ids [N]; windows of `window`,
    chunks of `chunk`) and compare."""
    if reference.vocab_size is None:
        raise SessaExportError("the model takes embeddings, not token ids: the quality check reads token ids")
    ids = text_ids(text, length, reference.vocab_size, window, reference.max_len)
    unit = "byte" if isinstance(text, (bytes, bytearray)) else "token"
    return compare(mode, run_logits(reference, ids, chunk), run_logits(candidate, ids, chunk), ids, chunk,
                   size_reference, size_quantized, unit)


def evaluate_artifact(artifact: Path, manifest: dict, reference, candidate, text: bytes | np.ndarray,
                      length: int = DEFAULT_BYTES, window: int = DEFAULT_WINDOW,
                      chunk: int = DEFAULT_CHUNK) -> tuple[QualityReport, str]:
    """The quality report of a quantized artifact (its mode's bar, quantization.MODES), or of one whose state
    is stored narrower than float32 (the "state" bar), and a title."""
    from .artifact import MANIFEST_NAME, state_layout
    from .quantization import MODES

    state = state_layout(manifest).dtype
    quant = manifest.get("quantization")
    if not quant:
        report = evaluate(reference, candidate, "state", text, length, window, chunk)
        return report, f"{artifact}: {state} state vs float32 reference"
    mode = MODES.get(quant.get("mode")) if isinstance(quant.get("mode"), str) else None
    if mode is None or mode.backend != manifest["format"]:
        names = [name for name, m in MODES.items() if m.backend == manifest["format"]]
        raise SessaExportError(f"{artifact / MANIFEST_NAME}: unknown \"quantization\".\"mode\" {quant.get('mode')!r}; "
                               f"expected one of {', '.join(names)}")
    report = evaluate(reference, candidate, mode.quality, text, length, window, chunk,
                      size_reference=quant.get("source_size_bytes"), size_quantized=quant.get("size_bytes"))
    block = f", block {quant['block_size']}" if quant.get("block_size") else ""
    kept = f", kept in full precision: {', '.join(quant['keep'])}" if quant.get("keep") else ""
    narrow = f", {state} state" if state != "float32" and mode.name != "fp16" else ""
    return report, f"{artifact}: {mode.name}{block}{kept}{narrow} vs float32 reference"


def describe(report: QualityReport) -> str:
    return (f"{report.positions} {report.unit}s as {report.windows} window{'s' if report.windows > 1 else ''} of "
            f"{report.window}, prefilled in chunks of {report.chunk}")


def render(report: QualityReport, console, title: str = "") -> None:
    """Print the report as a rich table, with each threshold and PASS/FAIL."""
    from rich.table import Table

    table = Table(title=title or f"{report.mode} vs float32: {describe(report)}",
                  title_justify="left")
    for col in ("metric", "value", "threshold"):
        table.add_column(col)
    limits = {c.metric: c for c in report.checks}

    def row(metric: str, label: str, value: str) -> None:
        check = limits.get(metric)
        if check is None:
            table.add_row(label, value, "")
        else:
            mark = "[green]ok[/green]" if check.ok else "[red]FAIL[/red]"
            shown = f"{check.limit:.0%}" if metric == "top1_agreement" else f"{check.limit:g}"
            table.add_row(label, value, f"{check.op} {shown} {mark}")

    row("top1_agreement", "top-1 agreement", f"{report.top1_agreement:.2%}")
    row("kl_mean", "KL mean (nats)", f"{report.kl_mean:.2e}")
    row("kl_max", "KL max (nats)", f"{report.kl_max:.2e}")
    row("bpb_reference", f"bits/{report.unit} float32", f"{report.bpb_reference:.4f}")
    row("bpb_quantized", f"bits/{report.unit} {report.mode}", f"{report.bpb_quantized:.4f}")
    row("bpb_increase", f"bits/{report.unit} difference", f"{report.bpb_diff:+.4f} ({report.bpb_increase:+.2%})")
    row("logits_error", "max |logits error| / max |ref|",
        f"{report.logits_max_abs:.3e} / {report.logits_scale:.3g} = {report.logits_error:.2e}")
    ratio = f" ({report.size_ratio:.2f}x)" if report.size_ratio else ""
    if report.size_reference or report.size_quantized:  # unknown for a float32-weights artifact with a narrow state
        row("size", "size on disk float32 -> quantized",
            f"{format_bytes(report.size_reference)} -> {format_bytes(report.size_quantized)}{ratio}")
    console.print(table)
    console.print("[green]PASS[/green]" if report.ok else
                  "[red]FAIL[/red]: " + "; ".join(f"{LABELS[c.metric].format(unit=report.unit)} {c.value:.4g} "
                                                 f"not {c.op} {c.limit:g}" for c in report.checks if not c.ok))


__all__ = ["THRESHOLDS", "QualityReport", "Check", "compare", "evaluate", "run_logits",
           "text_ids", "render", "describe"]
