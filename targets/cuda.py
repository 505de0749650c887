"""CUDA target: what to build for, and how the FeedbackAttention kernels are scheduled on GPUs.

Schedule rule (shared with Metal, which only changes the limits): a thread block per
(batch row, D chunk) task and a thread per worker of the kernel's SPMD stages; the task's
tiles (key tile, score and probability tiles, softmax statistics) go to shared memory, where
TVM inserts the barriers between stages. Each thread's accumulator and dot-product partial
sums stay in its registers / local memory. Feedback states are read straight from
``state_cache`` by the thread that owns their column; that thread also wrote them when their
row was solved, so staging them through shared memory would add a barrier and no reuse.
"""

from __future__ import annotations

import math

from tvm import s_tir, tirx
from tvm.target import Target

from sessa_export.ops.tvm_kernels import (
    DECODE,
    PREFILL,
    TASK_TILES,
    FeedbackTiling,
    feedback_attention_kernels,
)
from sessa_export.targets.cpu import has_block, host_triple
from sessa_export.targets.cpu import target as host_target

THREADS = 256
SHARED_MEMORY_BYTES = 48 * 1024  # per block without opt-in, on every arch in ARCHS
KEY_TILE_BYTES = 16 * 1024  # shared memory for the key tile


def target(arch: str = "sm_80") -> Target:
    """CUDA target for compute capability ``arch`` ("sm_80", "sm_90").

    It states the per-block limits (threads, shared memory, warp size) that dlight's GPU rules
    size the position-wise kernels by. Host code targets a generic CPU of this machine's triple
    (no -mcpu), so the library runs on any host of that architecture, not only on this CPU model.
    """
    limits = {"max_threads_per_block": 1024, "max_shared_memory_per_block": SHARED_MEMORY_BYTES,
              "thread_warp_size": 32}
    return Target({"kind": "cuda", "arch": arch, **limits}, host=host_target(host_triple()))


def feedback_tilings(
    d_model: int, dtype: str, threads: int = THREADS, key_tile_bytes: int = KEY_TILE_BYTES
) -> dict[str, FeedbackTiling]:
    """Tile sizes for ``threads`` threads per block and a key tile of ``key_tile_bytes``.

    Decode scores one key per thread; prefill one (row, key) pair per thread, 16 rows a block.
    The key tile is staged ``key_cols`` columns at a time to fit its shared-memory budget.
    """
    rows = 16
    shapes = {DECODE: (1, threads), PREFILL: (rows, max(rows, threads // rows))}
    itemsize = 2 if dtype == "float16" else 4
    tilings = {}
    for name, (block_rows, key_tile) in shapes.items():
        cols = _largest_divisor(d_model, key_tile_bytes // (key_tile * itemsize))
        tilings[name] = FeedbackTiling(
            block_rows, key_tile, key_cols=cols, dot_lanes=math.gcd(4, cols), workers=threads
        )
    return tilings


def schedule_feedback_attention(func: tirx.PrimFunc, threads: int = THREADS) -> tirx.PrimFunc:
    """Apply the GPU rule (thread binding, shared-memory tiles) to an unscheduled kernel.

    Built with ``enable_check=False``: S-TIR cannot prove the serial recurrence safe; the rule
    binds only the task loop (independent) and the worker loop (SPMD by construction).
    """
    sch = s_tir.Schedule(func, enable_check=False)
    if has_block(sch, "append_key"):
        loop = sch.fuse(*sch.get_loops("append_key"))
        outer, inner = sch.split(loop, [None, threads])
        sch.bind(outer, "blockIdx.x")
        sch.bind(inner, "threadIdx.x")
    sch.bind(sch.fuse(*sch.get_loops("task")), "blockIdx.x")
    sch.bind(sch.get_loops("worker")[-1], "threadIdx.x")
    for buffer, writer in TASK_TILES.items():
        sch.set_scope(writer, buffer, "shared")
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


def scheduled_feedback_attention(
    d_model: int, dtype: str = "float32", scale: float | None = None, arch: str = "sm_80"
) -> tuple[Target, dict[str, tirx.PrimFunc]]:
    """The CUDA target for ``arch`` and both kernels, tiled and scheduled for it."""
    kernels = feedback_attention_kernels(d_model, dtype, scale, feedback_tilings(d_model, dtype))
    return target(arch), {name: schedule_feedback_attention(func) for name, func in kernels.items()}


def _largest_divisor(n: int, limit: int) -> int:
    """Largest divisor of ``n`` that is <= ``limit`` (at least 1)."""
    return max(k for k in range(1, max(1, min(n, limit)) + 1) if n % k == 0)
