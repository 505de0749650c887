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
"""

from __future__ import annotations

import threading
import weakref
from typing import Callable, Hashable


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


__all__ = ["BufferPool"]
