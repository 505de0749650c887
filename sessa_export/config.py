"""SessaLM configuration: the keys of `config.json`, checked for consistency."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import SessaExportError


def memory_bytes() -> int:
    """This machine's physical memory (where it cannot be read: 1 TiB)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return 1 << 40


def available_cores() -> int:
    """CPU cores this process may run on (the affinity mask, not the machine's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class SessaConfig:
    """Shape of a SessaLM: embedding -> n_layers x (SessaLayer [+ MLP]) -> LayerNorm -> LM head."""

    vocab_size: int = 256
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int | tuple[int, ...] | None = None  # one for all layers, or one per layer
    max_len: int | None = None
    ln_eps: float = 1e-5
    gamma_max: float = 0.999
    use_forward_rope: bool = True
    mlp_ratio: float = 0.0
    tie_embeddings: bool = False
    lm_head_bias: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.n_kv_heads, list):  # JSON gives lists; the frozen config holds a tuple
            object.__setattr__(self, "n_kv_heads", tuple(self.n_kv_heads))

    @property
    def kv_heads(self) -> int | tuple[int, ...]:
        """n_kv_heads with null resolved to n_heads: one number, or one per layer."""
        return self.n_kv_heads if self.n_kv_heads is not None else self.n_heads

    @property
    def layer_kv_heads(self) -> tuple[int, ...]:
        """The kv head count of each layer."""
        kv = self.kv_heads
        return tuple(kv) if isinstance(kv, tuple) else (kv,) * self.n_layers

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def mlp_hidden(self) -> int:
        return int(round(self.mlp_ratio * self.d_model))

    def state_values_per_token(self) -> int:
        """Values of decode state per token of context, all layers (spec §2)."""
        return sum(2 * kv * self.head_dim + 2 * self.d_model for kv in self.layer_kv_heads)

    def validate(self) -> "SessaConfig":
        """Raise SessaExportError naming the first inconsistent field."""
        problems = []
        for name in ("vocab_size", "d_model", "n_layers", "n_heads"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                problems.append(f"{name} must be a positive integer, got {value!r}")
        if problems:
            raise SessaExportError("invalid config: " + "; ".join(problems))
        kv = self.n_kv_heads
        if isinstance(kv, tuple):
            if len(kv) != self.n_layers or not all(_is_int(k) and k >= 1 for k in kv):
                problems.append(f"n_kv_heads as a list must hold n_layers ({self.n_layers}) positive integers, "
                                f"one per layer, got {list(kv)!r}")
            elif any(self.n_heads % k for k in kv):
                problems.append(f"n_heads ({self.n_heads}) must be a multiple of every layer's n_kv_heads "
                                f"({list(kv)})")
        elif kv is not None and (not _is_int(kv) or kv < 1):
            problems.append(f"n_kv_heads must be a positive integer, a list of one per layer, or null, got {kv!r}")
        elif self.n_heads % self.kv_heads:
            problems.append(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.kv_heads})")
        if self.d_model % self.n_heads:
            problems.append(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        elif self.use_forward_rope and self.head_dim % 2:
            problems.append(f"head width d_model/n_heads = {self.head_dim} must be even when use_forward_rope is true")
        if not (_is_number(self.gamma_max) and 0.0 < self.gamma_max < 1.0):
            problems.append(f"gamma_max must lie in (0, 1), got {self.gamma_max!r}")
        if not (_is_number(self.ln_eps) and self.ln_eps > 0):
            problems.append(f"ln_eps must be a positive number, got {self.ln_eps!r}")
        if self.max_len is not None and (not _is_int(self.max_len) or self.max_len < 1):
            problems.append(f"max_len must be a positive integer or null, got {self.max_len!r}")
        if not _is_number(self.mlp_ratio) or self.mlp_ratio < 0:
            problems.append(f"mlp_ratio must be a finite number >= 0, got {self.mlp_ratio!r}")
        for name in ("use_forward_rope", "tie_embeddings", "lm_head_bias"):
            if not isinstance(getattr(self, name), bool):
                problems.append(f"{name} must be true or false, got {getattr(self, name)!r}")
        if problems:
            raise SessaExportError("invalid config: " + "; ".join(problems))
        weights, memory = self.num_parameters() * 4, memory_bytes()
        if weights > memory:  # refused before anything is allocated
            raise SessaExportError(f"invalid config: {self.num_parameters():,} parameters need "
                                   f"{weights / 2**30:,.1f} GiB as float32, more than this machine's "
                                   f"{memory / 2**30:,.1f} GiB of memory (check n_layers, d_model, vocab_size)")
        return self

    def num_parameters(self) -> int:
        """Parameters of a SessaLM of this shape (tied tables counted once), from the shapes alone."""
        D, h = self.d_model, self.mlp_hidden
        layers = sum(2 * D + (2 * D * D + 2 * D) + (D * D + D) + 2 * (kv * self.head_dim * (D + 1))
                     + (D * D if self.n_heads > 1 else 0) + (2 * D * D + 2 * D) + (D + 1) + (D * D + D)
                     for kv in self.layer_kv_heads)
        mlp = (2 * D + D * h + h + h * D + D) if self.mlp_ratio > 0 else 0
        tables = self.vocab_size * D * (1 if self.tie_embeddings else 2)
        head_bias = self.vocab_size if self.lm_head_bias else 0
        return layers + self.n_layers * mlp + tables + head_bias + 2 * D

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        if isinstance(self.n_kv_heads, tuple):
            data["n_kv_heads"] = list(self.n_kv_heads)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> "SessaConfig":
        """Build from a dict, refusing unknown or missing required keys."""
        if not isinstance(data, dict):
            raise SessaExportError(f"{source}: expected a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SessaExportError(f"{source}: unknown config keys {unknown}; known keys are {sorted(known)}")
        required = ("vocab_size", "d_model", "n_layers", "n_heads")
        missing = [k for k in required if k not in data]
        if missing:
            raise SessaExportError(f"{source}: missing config keys {missing}")
        try:
            return cls(**data).validate()
        except SessaExportError as exc:
            raise SessaExportError(f"{source}: {exc}") from None

    @classmethod
    def load(cls, path: str | Path) -> "SessaConfig":
        path = Path(path)
        if not path.is_file():
            raise SessaExportError(f"config file not found: {path}")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise SessaExportError(f"{path}: not valid JSON ({exc})") from None
        return cls.from_dict(data, source=str(path))
