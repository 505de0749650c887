"""A software prefetch for TIR kernels: a hint, never a load, so an address past a buffer's end is safe.

`prefetch(address)` is LLVM's `llvm.prefetch` (read, keep in every cache level, data cache): x86-64
`prefetcht0`, AArch64 `prfm pldl1keep`. Decode kernels stream caches and weights once a step; where the
hardware prefetcher stops at each 4 KB page or runs too short ahead, a prefetch a tile or a few KB
ahead keeps the loads in flight while the core computes (targets/cpu.py measures each use).
"""

from __future__ import annotations

from tvm import tirx

LINE_BYTES = 64  # one cache line: a prefetch fetches the line holding its address


def prefetch(address: tirx.PrimExpr) -> tirx.PrimExpr:
    """The prefetch of the cache line at `address` (a `T.address_of(buffer[...])` handle)."""
    return tirx.call_llvm_intrin("void", "llvm.prefetch.p0", address, tirx.const(0, "int32"),
                                 tirx.const(3, "int32"), tirx.const(1, "int32"))
