"""Which states of in-place caches are still valid: the rule both in-place runners enforce.

A step from a state of P positions writes rows P..P+S-1 of its caches and returns a state of P + S
positions over the same buffers. Rows below P are never written, so any earlier state stays
valid and may be stepped again (a benchmark re-running a decode step, a retry). What a step does
invalidate is every state that holds rows at or past its P: stepping from one state twice (two
branches of a sampling tree) overwrites the first branch. `CacheWrites` keeps the start row of
every step run on one set of caches, so such a stale state is refused instead of silently giving
wrong logits; `copy()` a state to continue it two ways.
"""

from __future__ import annotations

import threading

from ..errors import SessaExportError


class CacheWrites:
    """The start rows of the steps run on one set of caches, in order, and a lock for running them."""

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.lock = threading.Lock()  # one step at a time on these caches

    def begin(self, index: int, past: int) -> int:
        """Check that a state created after `index` steps, holding `past` rows, is still valid; record
        the step that now starts at `past`; return the index of the state the step returns."""
        if any(start < past for start in self.starts[index:]):
            raise SessaExportError(f"this state of {past} positions was overwritten by a step from an earlier "
                                   "state on the same caches; copy() a state before continuing it two ways")
        self.starts.append(past)
        return len(self.starts)
