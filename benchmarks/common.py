"""Shared helpers for the benchmarks: model configs, the machine, and a plain-text table.

Timing itself is `sessa_export.bench.time_runners`, shared with the CLI's `bench`."""

from __future__ import annotations

import os
import platform
from typing import Sequence

import torch

from sessa_export.config import SessaConfig

DECODE_CONTEXT = 1024  # prefill length, and the context decode is timed at
DECODE_STEPS = 32


def config_125m(vocab_size: int = 32000, max_len: int | None = None) -> SessaConfig:
    """A 125M-class Sessa LM: 12 layers of width 768, 12 heads, no MLP, untied head.

    Parameters: 12 x 9·768² (W_in 2, q/k/v 3, out_proj 1, proj_fb 2, W_out 1) + embedding
    and head 2 x 32000·768, about 113M.
    """
    return SessaConfig(vocab_size=vocab_size, d_model=768, n_layers=12, n_heads=12, n_kv_heads=None,
                       max_len=max_len, mlp_ratio=0.0, tie_embeddings=False).validate()


def set_threads(threads: int | None) -> int:
    """torch intra-op threads: all available cores by default. Returns the number set."""
    from sessa_export.runtime import available_cores

    threads = threads or available_cores()
    torch.set_num_threads(threads)
    return threads


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_description() -> str:
    from sessa_export.runtime import available_cores

    return (f"{cpu_model()}, {available_cores()} cores available ({os.cpu_count()} on the machine), "
            f"torch {torch.__version__} with {torch.get_num_threads()} threads, Python {platform.python_version()}")


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]], title: str | None = None) -> str:
    """A monospaced table; numbers right-aligned, text left-aligned."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    numeric = [all(_is_number(row[i]) for row in rows) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if num else c.ljust(w) for c, w, num in zip(row, widths, numeric)).rstrip()

    out = [title] if title else []
    out += [line(cells[0]), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in cells[1:]]
    return "\n".join(out)


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]], title: str | None = None) -> None:
    print(format_table(headers, rows, title), flush=True)


def _is_number(value: object) -> bool:
    if isinstance(value, (int, float)):
        return True
    try:
        float(str(value).replace(",", ""))
        return True
    except ValueError:
        return False
