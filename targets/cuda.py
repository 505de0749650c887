"""CUDA target: the TVM target, the GPU rules under CUDA's limits, and a library with a fatbin.

The FeedbackAttention rule is targets/gpu.py's; dlight's Matmul rule schedules the matmuls.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from tvm.target import Target

from sessa_export.errors import SessaExportError

from . import ARCHS, gpu, packaging
from .cpu import host_triple

THREADS = 256
SHARED_MEMORY_BYTES = 48 * 1024  # per block without opt-in, on every arch in ARCHS
KEY_TILE_BYTES = 16 * 1024  # shared memory for the key tile


def tvm_target(arch: str | None = None, host: str | None = None) -> Target:
    """CUDA target for compute capability ``arch`` ("sm_80", "sm_90").

    It states the per-block limits (threads, shared memory, warp size) that dlight's GPU rules
    size the position-wise kernels by. Host code targets a generic CPU of this machine's triple
    (no -mcpu), so the library runs on any host of that architecture, not only on this CPU model.
    """
    limits = {"max_threads_per_block": 1024, "max_shared_memory_per_block": SHARED_MEMORY_BYTES,
              "thread_warp_size": 32}
    return Target({"kind": "cuda", "arch": arch or ARCHS[0], **limits}, host={"kind": "llvm", "mtriple": host_triple()})


RULES = gpu.GpuRules(tvm_target, THREADS, KEY_TILE_BYTES, matmul=True)
attention_tiling, feedback_tilings, pipeline = RULES.attention_tiling, RULES.feedback_tilings, RULES.pipeline
scheduled_feedback_attention = RULES.scheduled_feedback_attention


def library_name(host: str | None) -> str:
    return "model.so"


def package(executable, path: Path, arch: str | None, host: str | None, workspace: Path) -> None:
    """model.so with the kernels compiled by nvcc into a fatbin for `arch` (SASS + PTX), and model.cu.

    TVM 0.27 keeps CUDA *source* in the library and compiles it when the library is loaded,
    through a Python callback; a C++ deployment has no Python, so the source is compiled here
    and the library's import blob is rewritten to carry the fatbin (format "fatbin").
    """
    if shutil.which("nvcc") is None:
        raise SessaExportError("--target cuda needs nvcc (the CUDA toolkit) on PATH")
    source = packaging.device_source(executable, "cuda")
    fatbin = _nvcc_fatbin(source, arch or ARCHS[0], workspace)
    packaging.export_elf(executable, path, None, workspace,
                         lambda blob: packaging.replace_cuda_code(blob, source.encode(), fatbin))
    (path.parent / "model.cu").write_text(source)


def _nvcc_fatbin(source: str, arch: str, workspace: Path) -> bytes:
    number = arch.removeprefix("sm_")
    src, out = workspace / "kernels.cu", workspace / "kernels.fatbin"
    src.write_text(source)
    cmd = ["nvcc", "--fatbin", "-O3", "-gencode", f"arch=compute_{number},code=sm_{number}",
           "-gencode", f"arch=compute_{number},code=compute_{number}", "--expt-relaxed-constexpr",
           "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__", "-o", str(out), str(src)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise SessaExportError(f"nvcc failed for {arch}:\n{result.stderr.strip()[-2000:]}")
    return out.read_bytes()
