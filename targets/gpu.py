"""What the GPU targets (CUDA, Metal, OpenCL) share: the FeedbackAttention rule, the forward
attention's tiling, and the Relax pipeline with dlight's default GPU schedules.

FeedbackAttention rule: a thread block per (batch row, D chunk) task and a thread per worker of
the kernel's SPMD stages; the task's tiles (key tile, score and probability tiles, softmax
statistics) go to shared memory, where TVM inserts the barriers between stages. Each thread's
accumulator and dot-product partial sums stay in its registers / local memory. Feedback states
are read straight from ``state_cache`` by the thread that owns their column; that thread also
wrote them when their row was solved, so staging them through shared memory would add a
barrier and no reuse. Each target passes its own limits (threads per block, tile memory).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from tvm import s_tir, tirx

from sessa_export.ops.tvm_attention import AttentionTiling
from sessa_export.ops.tvm_kernels import DECODE, PREFILL, TASK_TILES, FeedbackTiling, feedback_attention_kernels

from .cpu import has_block

ATTENTION = AttentionTiling(lanes=1, key_tile=4, threads=64)  # one thread per (batch, row, head) task


def feedback_tilings(d_model: int, dtype: str, threads: int, key_tile_bytes: int) -> dict[str, FeedbackTiling]:
    """Tile sizes for ``threads`` threads per block and a key tile of ``key_tile_bytes``.

    Decode scores one key per thread; prefill one (row, key) pair per thread, 16 rows a block.
    The key tile is staged ``key_cols`` columns at a time to fit its shared-memory budget.
    """
    rows = 16
    shapes = {DECODE: (1, threads), PREFILL: (rows, max(rows, threads // rows))}
    itemsize = 2 if dtype in ("float16", "bfloat16") else 4
    tilings = {}
    for name, (block_rows, key_tile) in shapes.items():
        cols = _largest_divisor(d_model, key_tile_bytes // (key_tile * itemsize))
        tilings[name] = FeedbackTiling(
            block_rows, key_tile, key_cols=cols, dot_lanes=math.gcd(4, cols), workers=threads
        )
    return tilings


def schedule_feedback_attention(func: tirx.PrimFunc, threads: int) -> tirx.PrimFunc:
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


def pipeline(tvm_target, matmul: bool = True):
    """Relax's generic GPU pipeline with dlight's default schedules for the position-wise PrimFuncs
    (Matmul when `matmul`, GEMV, Reduction, GeneralReduction, Fallback); the attention kernels
    are marked scheduled and left alone."""
    import tvm
    from tvm import relax
    from tvm.relax.backend.gpu_generic import pipeline as backend
    from tvm.s_tir import dlight as dl

    rules = [dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(), dl.gpu.Fallback()]
    if matmul:
        rules.insert(0, dl.gpu.Matmul())
    legalize = [relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(),
                relax.transform.FoldConstant(), relax.transform.FuseOps(), relax.transform.FuseTIR(),
                dl.ApplyDefaultSchedule(*rules)]

    @tvm.transform.module_pass(opt_level=0, name="SessaGpuPipeline")
    def _pipeline(mod, _ctx):
        with tvm_target:
            seq = tvm.transform.Sequential(
                backend.library_dispatch_passes(tvm_target) + legalize
                + backend.dataflow_lower_passes(tvm_target) + backend.finalize_passes(tvm_target))
            return seq(mod)

    return _pipeline


@dataclass(frozen=True)
class GpuRules:
    """A GPU target's part of the target interface (targets/__init__.py), from its limits."""

    tvm_target: Callable  # (arch, host) -> tvm.target.Target
    threads: int  # threads per block (work-items per work-group)
    key_tile_bytes: int  # shared (local, threadgroup) memory for the FeedbackAttention key tile
    matmul: bool  # dlight's Matmul rule for the matmuls

    def attention_tiling(self, head_dim: int, tvm_target=None) -> AttentionTiling:
        return ATTENTION

    def feedback_tilings(self, d_model: int, dtype: str) -> dict[str, FeedbackTiling]:
        return feedback_tilings(d_model, dtype, self.threads, self.key_tile_bytes)

    def scheduled_feedback_attention(self, d_model: int, dtype: str = "float32", scale: float | None = None,
                                     arch: str | None = None, host: str | None = None,
                                     cache_dtype: str | None = None):
        """The target and both FeedbackAttention kernels, tiled and scheduled under these limits."""
        kernels = feedback_attention_kernels(d_model, dtype, scale, self.feedback_tilings(d_model, cache_dtype or dtype),
                                             cache_dtype)
        return self.tvm_target(arch, host), {name: schedule_feedback_attention(func, self.threads)
                                             for name, func in kernels.items()}

    def pipeline(self, tvm_target):
        return pipeline(tvm_target, self.matmul)


def _largest_divisor(n: int, limit: int) -> int:
    """Largest divisor of ``n`` that is <= ``limit`` (at least 1)."""
    return max(k for k in range(1, max(1, min(n, limit)) + 1) if n % k == 0)
