"""OpenCL target (Android and embedded Linux GPUs: Mali, Adreno): an AArch64 ELF library whose
import blob carries the OpenCL C source, which the device's driver compiles when it loads.

The FeedbackAttention rule is targets/gpu.py's under OpenCL's portable limits (TVM's default
OpenCL target: 256 work-items per work-group, 16 KiB of local memory, no warps assumed), so
the same library runs on any OpenCL 1.2 GPU; dlight's GPU rules schedule the rest.
"""

from __future__ import annotations

from pathlib import Path

from tvm import tirx
from tvm.target import Target

from sessa_export.ops.tvm_kernels import FeedbackTiling, feedback_attention_kernels

from . import AARCH64_LINUX, gpu, packaging

THREADS = 256
KEY_TILE_BYTES = 4 * 1024  # of 16 KiB local memory


def tvm_target(arch: str | None = None, host: str | None = None) -> Target:
    """OpenCL device code with host code for ``host`` (64-bit ARM Linux by default)."""
    return Target({"kind": "opencl"}, host={"kind": "llvm", "mtriple": host or AARCH64_LINUX})


def attention_tiling(head_dim: int):
    return gpu.ATTENTION


def feedback_tilings(d_model: int, dtype: str) -> dict[str, FeedbackTiling]:
    """Tile sizes under OpenCL's portable limits."""
    return gpu.feedback_tilings(d_model, dtype, THREADS, KEY_TILE_BYTES)


def scheduled_feedback_attention(d_model: int, dtype: str = "float32", scale: float | None = None,
                                 arch: str | None = None, host: str | None = None) -> tuple[Target, dict[str, tirx.PrimFunc]]:
    """The OpenCL target and both kernels, tiled and scheduled for it."""
    kernels = feedback_attention_kernels(d_model, dtype, scale, feedback_tilings(d_model, dtype))
    return tvm_target(host=host), {name: gpu.schedule_feedback_attention(func, THREADS)
                                   for name, func in kernels.items()}


def pipeline(target: Target):
    return gpu.pipeline(target, matmul=False)


def library_name(host: str | None) -> str:
    return "model.so"


def package(executable, path: Path, arch: str | None, host: str | None, workspace: Path) -> None:
    """model.so cross-linked for `host`, with the OpenCL source in its import blob and model.cl beside."""
    (path.parent / "model.cl").write_text(packaging.device_source(executable, "opencl"))
    packaging.export_elf(executable, path, host or AARCH64_LINUX, workspace)
