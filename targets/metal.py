"""Metal target (Apple GPUs): what to build for, and the FeedbackAttention schedule.

The schedule rule is the GPU rule of ``sessa_export.targets.cuda`` (a threadgroup per task, a
thread per worker, tiles in threadgroup memory) under Metal's limits: 256 threads per
threadgroup in TVM's default Metal target and 32 KiB of threadgroup memory.
"""

from __future__ import annotations

from tvm import tirx
from tvm.target import Target

from sessa_export.ops.tvm_kernels import FeedbackTiling, feedback_attention_kernels
from sessa_export.targets import METAL_HOSTS, cuda

HOST_TRIPLE = METAL_HOSTS[0]
THREADS = 256
KEY_TILE_BYTES = 8 * 1024  # of 32 KiB threadgroup memory


def target(triple: str = HOST_TRIPLE) -> Target:
    """Metal target with host code for ``triple`` (Apple silicon macOS by default)."""
    return Target({"kind": "metal"}, host={"kind": "llvm", "mtriple": triple})


def feedback_tilings(d_model: int, dtype: str) -> dict[str, FeedbackTiling]:
    """Tile sizes for Metal: the CUDA shapes with Metal's thread and memory limits."""
    return cuda.feedback_tilings(d_model, dtype, threads=THREADS, key_tile_bytes=KEY_TILE_BYTES)


def schedule_feedback_attention(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """Apply the GPU rule with Metal's threadgroup size."""
    return cuda.schedule_feedback_attention(func, threads=THREADS)


def scheduled_feedback_attention(
    d_model: int, dtype: str = "float32", scale: float | None = None, triple: str = HOST_TRIPLE
) -> tuple[Target, dict[str, tirx.PrimFunc]]:
    """The Metal target (host ``triple``) and both kernels, tiled and scheduled for it."""
    kernels = feedback_attention_kernels(d_model, dtype, scale, feedback_tilings(d_model, dtype))
    return target(triple), {name: schedule_feedback_attention(func) for name, func in kernels.items()}
