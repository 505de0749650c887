"""OpenCL target (Android and embedded Linux GPUs: Mali, Adreno): an AArch64 ELF library whose
import blob carries the OpenCL C source, which the device's driver compiles when it loads.

The FeedbackAttention rule is targets/gpu.py's under OpenCL's portable limits (TVM's default
OpenCL target: 256 work-items per work-group, 16 KiB of local memory, no warps assumed), so
the same library runs on any OpenCL 1.2 GPU; dlight's GPU rules schedule the rest.
"""

from __future__ import annotations

from pathlib import Path

from tvm.target import Target


from . import AARCH64_LINUX, gpu, packaging

THREADS = 256
KEY_TILE_BYTES = 4 * 1024  # of 16 KiB local memory


def tvm_target(arch: str | None = None, host: str | None = None) -> Target:
    """OpenCL device code with host code for ``host`` (64-bit ARM Linux by default)."""
    return Target({"kind": "opencl"}, host={"kind": "llvm", "mtriple": host or AARCH64_LINUX})


RULES = gpu.GpuRules(tvm_target, THREADS, KEY_TILE_BYTES, matmul=False)
attention_tiling, feedback_tilings, pipeline = RULES.attention_tiling, RULES.feedback_tilings, RULES.pipeline
scheduled_feedback_attention = RULES.scheduled_feedback_attention


def library_name(host: str | None) -> str:
    return "model.so"


def package(executable, path: Path, arch: str | None, host: str | None, workspace: Path) -> None:
    """model.so cross-linked for `host`, with the OpenCL source in its import blob and model.cl beside."""
    (path.parent / "model.cl").write_text(packaging.device_source(executable, "opencl"))
    packaging.export_elf(executable, path, host or AARCH64_LINUX, workspace)
