"""CPU (LLVM) target: what to build for, and how the FeedbackAttention kernels are scheduled.

Schedule rule: one parallel task per (batch row, D chunk); SIMD over D in the key-tile copy,
the accumulator update and the solve, and over the interleaved partial sums of the q.k
products (``FeedbackTiling.dot_lanes`` is set to the SIMD width, which makes that loop the
vector loop). The recurrence itself (row blocks, key tiles, rows inside a block) stays serial.
"""

from __future__ import annotations

import math

from tvm import s_tir, tirx
from tvm.target import Target
from tvm.target.codegen import llvm_get_system_cpu, llvm_get_system_triple, llvm_get_vector_width

from sessa_export.ops.tvm_kernels import DECODE, PREFILL, FeedbackTiling, feedback_attention_kernels



def host_triple() -> str:
    """This machine's LLVM triple (a conda-built LLVM names its vendor "conda": use "pc")."""
    return str(llvm_get_system_triple()).replace("-conda-", "-pc-")


def host_cpu() -> str:
    """LLVM's name for this machine's CPU (what `-mcpu=native` would pick)."""
    try:
        return str(llvm_get_system_cpu()) or "generic"
    except Exception:  # builds without the query: a safe baseline
        return "generic"


def target(triple: str | None = None) -> Target:
    """LLVM target for this host (its triple and CPU), or a generic CPU of ``triple``.

    ``target("aarch64-linux-gnu")`` cross-compiles for 64-bit ARM Linux (NEON baseline);
    ``target("arm64-apple-darwin")`` is the host side of a Metal build.
    """
    if triple is None:
        return Target({"kind": "llvm", "mtriple": host_triple(), "mcpu": host_cpu()})
    return Target({"kind": "llvm", "mtriple": triple})


def vector_lanes(tgt: Target) -> int:
    """float32 lanes of one SIMD register of ``tgt`` (at least 4)."""
    return max(4, llvm_get_vector_width(tgt) // 32)


def feedback_tilings(d_model: int, tgt: Target, d_chunks: int = 1) -> dict[str, FeedbackTiling]:
    """Tile sizes for ``tgt``; ``d_chunks`` > 1 adds parallel tasks for small batches.

    Each chunk recomputes the full q.k products, so more chunks only pay off when cores
    would otherwise sit idle (batch smaller than the core count).
    """
    lanes = math.gcd(vector_lanes(tgt), d_model)
    return {
        DECODE: FeedbackTiling(block_rows=1, key_tile=32, dot_lanes=lanes, d_chunks=d_chunks),
        PREFILL: FeedbackTiling(block_rows=16, key_tile=32, dot_lanes=lanes, d_chunks=d_chunks),
    }


def schedule_feedback_attention(func: tirx.PrimFunc, tgt: Target) -> tirx.PrimFunc:
    """Apply the CPU rule to an unscheduled FeedbackAttention kernel (decode or prefill).

    The schedule is built with ``enable_check=False``: S-TIR cannot prove the serial recurrence
    safe, so the rule only parallelises the independent tasks and vectorises loops whose
    iterations are independent columns or lanes.
    """
    lanes = vector_lanes(tgt)
    sch = s_tir.Schedule(func, enable_check=False)
    if has_block(sch, "append_key"):
        b, i, d = sch.get_loops("append_key")
        sch.parallel(sch.fuse(b, i))
        _vectorize(sch, d, lanes)
    sch.parallel(sch.fuse(*sch.get_loops("task")))
    # the key tile copy runs over key_tile x key_cols elements: split it back into rows, columns
    (key_tile,) = (buf for buf in sch.get(sch.get_sblock("task")).alloc_buffers if buf.name == "key_tile")
    _vectorize(sch, sch.split(sch.get_loops("key_tile")[-1], [None, key_tile.shape[1]])[1], lanes)
    for block in ("init_acc", "accumulate", "solve"):
        _vectorize(sch, sch.get_loops(block)[-1], lanes)
    sch.vectorize(sch.get_loops("dot")[-1])
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


def scheduled_feedback_attention(
    d_model: int,
    dtype: str = "float32",
    scale: float | None = None,
    triple: str | None = None,
    d_chunks: int = 1,
) -> tuple[Target, dict[str, tirx.PrimFunc]]:
    """The CPU target and both kernels, tiled and scheduled for it (keyed by global symbol)."""
    tgt = target(triple)
    kernels = feedback_attention_kernels(d_model, dtype, scale, feedback_tilings(d_model, tgt, d_chunks))
    return tgt, {name: schedule_feedback_attention(func, tgt) for name, func in kernels.items()}


def has_block(sch: s_tir.Schedule, name: str) -> bool:
    """Whether the function being scheduled has a top-level block called ``name``."""
    return any(sch.get(block).name_hint == name for block in sch.get_child_blocks(sch.get_sblock("root")))


def _vectorize(sch: s_tir.Schedule, loop: s_tir.LoopRV, lanes: int) -> None:
    """Split ``loop`` (constant extent) into SIMD-wide pieces and vectorise the inner one."""
    width = math.gcd(int(sch.get(loop).extent), lanes)
    if width > 1:
        sch.vectorize(sch.split(loop, [None, width])[1])
