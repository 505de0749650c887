"""State buffers a runner hands out again once no state uses them: the in-place runners' allocator.

A new sequence's caches are hundreds of megabytes (151 MB for the 125M-class model at 1024
positions). Freshly allocated, every 4 KiB page of them faults on its first write, inside the
prefill that fills them: on the 2-core KVM guest of BENCHMARKS.md about 40,000 faults and
0.1 s of a 0.85 s float32 prefill. A runner's pool keeps the buffers of states nobody holds any
more and gives them to the next `empty_state()` (or capacity growth) of the same shapes, so a
process serving one prompt after another maps its state memory once, as ONNX Runtime's arena
does for its own tensors.

Buffers go back when the last state over them is gone: the states of one set of caches share
one `CacheWrites`, and the pool watches that object. The pool holds one free set, the last given
back (a runner keeps at most one state's worth of memory beyond the states in use; a decode that
grows its ONNX caches block by block leaves only the last block's). Sequential use needs no more:
the state being replaced is still held while its successor is made, and given back after, for the
one after that. Reused memory holds the rows of an earlier sequence; whoever takes it says whether
it must be cleared.

New buffers come from `state_buffers`: one anonymous mapping, zero-filled, aligned to 2 MiB and
marked for transparent huge pages where Linux offers them (THP "madvise", the common default). A
decode streams every cache once a step: over 2 MiB pages instead of 4 KiB ones, with fewer TLB
misses, a TVM q4 decode at context 1024 ran 7-12% faster here (BENCHMARKS.md, 2026-12-03 07:28), and
a first touch faults once a huge page, not 512 times.
"""

from __future__ import annotations

import mmap
import threading
import weakref
from typing import Callable, Hashable, Sequence

import numpy as np

HUGE_PAGE = 2 << 20  # x86-64's and AArch64's (4 KiB granule) transparent huge page
ALIGN = 4096  # every buffer starts on a page: TVM needs 64 bytes, DLPack consumers at least 16


def state_buffers(shapes: Sequence[Sequence[int]], storage: type) -> list[np.ndarray]:
    """Zeroed C-contiguous arrays of `shapes` and numpy dtype `storage`, side by side in one mapping in
    huge pages where the OS gives them (it stays mapped while any of the arrays is alive)."""
    sizes = [int(np.prod(shape, dtype=np.int64)) * np.dtype(storage).itemsize for shape in shapes]
    offsets = np.concatenate([[0], np.cumsum([-(-n // ALIGN) * ALIGN for n in sizes])]).astype(int)
    total = max(int(offsets[-1]), ALIGN)
    private = {"flags": mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS} if hasattr(mmap, "MAP_PRIVATE") else {}
    mapping = mmap.mmap(-1, total + HUGE_PAGE, **private)  # page-aligned; shared anonymous memory gets no THP
    raw = np.frombuffer(mapping, np.uint8)
    start = -raw.ctypes.data % HUGE_PAGE
    if hasattr(mapping, "madvise") and hasattr(mmap, "MADV_HUGEPAGE"):
        mapping.madvise(mmap.MADV_HUGEPAGE, start, total)
    return [raw[start + o:start + o + n].view(storage).reshape(shape) for o, n, shape in zip(offsets, sizes, shapes)]


class BufferPool:
    """One free set of buffers and its shape key, handed to the next request for that key; thread-safe."""

    def __init__(self) -> None:
        self._free: tuple[Hashable, object] | None = None
        self._lock = threading.Lock()

    def take(self, key: Hashable, make: Callable[[], object]) -> tuple[object, bool]:
        """The free set if it is of `key`, else `make()`'s new one; and whether it was reused."""
        with self._lock:
            if self._free is not None and self._free[0] == key:
                buffers, self._free = self._free[1], None
                return buffers, True
        return make(), False

    def lend(self, owner: object, key: Hashable, buffers: object) -> None:
        """Take `buffers` back under `key` when `owner` (the states' shared CacheWrites) is collected."""
        weakref.finalize(owner, self._give_back, key, buffers)

    def _give_back(self, key: Hashable, buffers: object) -> None:
        with self._lock:
            self._free = (key, buffers)  # the set held before goes back to the allocator


__all__ = ["BufferPool", "state_buffers"]
