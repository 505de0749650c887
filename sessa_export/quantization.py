"""Quantization modes: one small object each, shared by the back ends where the idea is the same.

A mode says which back end applies it (`sessa-export quantize` for ONNX exports, `compile
--quantization` for TVM), the bits per stored weight, the block (group) of inputs that shares a
scale, and which quality bar `validate` holds it to (quality.THRESHOLDS). Its kernels live with
its back end: to_onnx/quantize.py (ONNX Runtime's MatMulNBits, the fp16 conversion) and
ops/tvm_dequant_matmul.py (TVM). Adding a mode is one row here plus its kernels.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import SessaExportError

MIN_BLOCK, MAX_BLOCK = 16, 256


@dataclass(frozen=True)
class QuantMode:
    """How weights are stored: `bits` per value, one scale per `block_size` inputs (None: no blocks)."""

    name: str
    backend: str  # "onnx" or "tvm": the artifact format it applies to
    bits: int
    block_size: int | None  # the default block; the ONNX block modes take --block-size
    quality: str  # the key of quality.THRESHOLDS this mode is held to
    symmetric: bool
    summary: str

    @property
    def blocks(self) -> bool:
        return self.block_size is not None

    def resolve_block_size(self, block_size: int | None) -> int | None:
        """The block size to use: the default, or a checked --block-size for a block mode."""
        if block_size is None:
            return self.block_size
        if not self.blocks or self.backend != "onnx":
            raise SessaExportError(f"--block-size applies to int4 and int8 only, not to {self.name}")
        if type(block_size) is not int or not MIN_BLOCK <= block_size <= MAX_BLOCK or block_size & (block_size - 1):
            raise SessaExportError(f"--block-size must be a power of 2 from {MIN_BLOCK} to {MAX_BLOCK}, "
                                   f"got {block_size}")
        return block_size


MODES: dict[str, QuantMode] = {m.name: m for m in (
    QuantMode("int8", "onnx", 8, 32, "int8", False, "MatMulNBits / GatherBlockQuantized, 8-bit blocks"),
    QuantMode("int4", "onnx", 4, 32, "int4", False, "MatMulNBits / GatherBlockQuantized, 4-bit blocks"),
    QuantMode("fp16", "onnx", 16, None, "fp16", True, "float16 weights, activations and state"),
    QuantMode("q8", "tvm", 8, 32, "int8", True, "int8 weights, integer dot products over int8 activations in decode"),
    QuantMode("q4", "tvm", 4, 32, "int4", True, "packed int4 weights, integer dot products over int8 activations in decode"),
)}


def modes_for(backend: str) -> tuple[str, ...]:
    """The mode names a back end applies."""
    return tuple(name for name, mode in MODES.items() if mode.backend == backend)


def mode(name: str | None, backend: str, option: str) -> QuantMode | None:
    """The mode called `name` for `backend` (None or "none": float weights); `option` names the flag."""
    if name in (None, "none") and backend == "tvm":
        return None
    name = str(name).lower()
    if name not in modes_for(backend):
        choices = (("none",) if backend == "tvm" else ()) + modes_for(backend)
        raise SessaExportError(f"unknown {option} {name!r}; choose one of {', '.join(choices)}")
    return MODES[name]


def keep_matches(name: str, keep: str) -> bool:
    """`keep` names a weight or a module path prefix: `lm_head`, `embed`, `layers.0`, `layers.0.W_in.weight`."""
    keep = keep.strip().rstrip(".")
    module = name.removesuffix(".weight")
    return name == keep or module == keep or module.startswith(keep + ".")


__all__ = ["QuantMode", "MODES", "modes_for", "mode", "keep_matches"]
