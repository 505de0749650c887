"""Metal target (Apple GPUs): the TVM target, the GPU rules under Metal's limits, a static archive.

The FeedbackAttention rule is targets/gpu.py's under Metal's limits: 256 threads per
threadgroup in TVM's default Metal target and 32 KiB of threadgroup memory. dlight's Matmul rule
is left out: its simdgroup matmul path crashes in TVM 0.27's tensorize, so Metal matmuls are
scheduled by GEMV / Reduction / Fallback.
"""

from __future__ import annotations

import shutil
import subprocess
import tarfile
from pathlib import Path

from tvm.target import Target

from sessa_export.errors import SessaExportError

from . import METAL_HOSTS, gpu, packaging

HOST_TRIPLE = METAL_HOSTS[0]
THREADS = 256
KEY_TILE_BYTES = 8 * 1024  # of 32 KiB threadgroup memory


def tvm_target(arch: str | None = None, host: str | None = None) -> Target:
    """Metal target with host code for ``host`` (Apple silicon macOS by default)."""
    return Target({"kind": "metal"}, host={"kind": "llvm", "mtriple": host or HOST_TRIPLE})


RULES = gpu.GpuRules(tvm_target, THREADS, KEY_TILE_BYTES, matmul=False)
attention_tiling, feedback_tilings, pipeline = RULES.attention_tiling, RULES.feedback_tilings, RULES.pipeline
scheduled_feedback_attention = RULES.scheduled_feedback_attention


def llvm_ar() -> str | None:
    """An llvm-ar on PATH (it writes Darwin archives), or None."""
    return shutil.which("llvm-ar") or next((shutil.which(f"llvm-ar-{v}") for v in range(22, 13, -1)
                                            if shutil.which(f"llvm-ar-{v}")), None)


def library_name(host: str | None) -> str:
    return "model.a" if llvm_ar() else "model.tar"


def package(executable, path: Path, arch: str | None, host: str | None, workspace: Path) -> None:
    """Mach-O arm64 objects (host code + the import blob with the Metal source) as model.a / model.tar,
    and model.metal beside."""
    from tvm.support import tar as tar_util

    (path.parent / "model.metal").write_text(packaging.device_source(executable, "metal"))
    tar_path = workspace / "model.tar"
    (workspace / "objects").mkdir()
    executable.export_library(str(tar_path), fcompile=tar_util.tar, workspace_dir=str(workspace / "objects"))
    if path.suffix == ".tar":
        shutil.copyfile(tar_path, path)
        return
    members = workspace / "members"
    members.mkdir()
    with tarfile.open(tar_path) as archive:
        names = [m.name for m in archive.getmembers() if m.isfile()]
        archive.extractall(members, filter="data")
    objects = sorted(str(members / name) for name in names)
    result = subprocess.run([llvm_ar(), "rcs", "--format=darwin", str(path), *objects],
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise SessaExportError(f"llvm-ar failed: {result.stderr.strip()}")
