"""Compile targets: one entry each in `TARGETS`, one file each beside this one.

The table is plain data, importable without TVM. Each target's file (`module`) holds what is
specific to it, behind the same names:

- `tvm_target(arch, host)`: the TVM target (device and host code; a target that takes --cpu,
  `cpus`, also takes `cpu` and has `cpu_choices(host)` and `cpu_features(cpu, host)`);
- `attention_tiling(head_dim, tvm_target)`: how ops/tvm_attention.py's kernel spreads its work there;
- `scheduled_feedback_attention(d_model, dtype, scale, **options)`: the FeedbackAttention decode and
  prefill kernels, ops/tvm_kernels.py's tiled and scheduled by the target's rule (CPUs take the
  prefill from ops/tvm_feedback_prefill.py);
- `pipeline(tvm_target)`: the Relax pipeline that schedules the position-wise functions;
- `library_name(host)` and `package(executable, path, arch, host, workspace)`: what the
  artifact holds (shared library, static archive, device code beside it).

A target is added by writing its file and one `Target` row here; the compiler, the CLI's
choices and `open_runner` find it through the table.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType

AARCH64_LINUX = "aarch64-linux-gnu"  # the cross-compilation host triple of 64-bit ARM Linux
ARCHS = ("sm_80", "sm_90")  # the CUDA archs the FeedbackAttention kernels are tiled for
METAL_HOSTS = ("arm64-apple-darwin", "arm64-apple-ios")
CROSS_COMPILERS = {AARCH64_LINUX: f"{AARCH64_LINUX}-g++"}  # host triple -> the C++ compiler that links for it


@dataclass(frozen=True)
class Target:
    """One compile target: its choices of --arch and --host, and where its code is."""

    name: str
    module: str  # the file under targets/ that implements it
    summary: str
    archs: tuple[str, ...] = ()  # --arch choices, the first the default (empty: no --arch)
    hosts: tuple[str, ...] = ()  # --host choices
    default_host: str | None = None  # None: this machine
    gpu: bool = False
    runs_here: bool = False  # the Python TVM runner runs its artifacts on this machine (host builds only)
    cpus: bool = False  # takes --cpu: its file has cpu_choices(host), cpu_features(cpu, host), tvm_target(.., cpu)

    def implementation(self) -> ModuleType:
        """The target's file (imports TVM)."""
        return importlib.import_module(f"sessa_export.targets.{self.module}")


TARGETS: dict[str, Target] = {t.name: t for t in (
    Target("cpu", "cpu", "model.so for this CPU, or an AArch64 ELF .so with --host aarch64-linux-gnu",
           hosts=(AARCH64_LINUX,), runs_here=True, cpus=True),
    Target("cuda", "cuda", "model.so with the kernels compiled by nvcc for --arch inside, and model.cu",
           archs=ARCHS, gpu=True),
    Target("metal", "metal", "model.a, Mach-O arm64 objects for an iOS or macOS app, and model.metal",
           hosts=METAL_HOSTS, default_host=METAL_HOSTS[0], gpu=True),
    Target("opencl", "opencl", "an AArch64 ELF model.so (Android / Linux boards: Mali, Adreno) and model.cl",
           hosts=(AARCH64_LINUX,), default_host=AARCH64_LINUX, gpu=True),
)}


def scheduled_kernels(target_name: str, d_model: int, dtype: str = "float32", scale: float | None = None,
                      **options: object):
    """The TVM target and both FeedbackAttention kernels, tiled and scheduled by that target's rule."""
    return TARGETS[target_name].implementation().scheduled_feedback_attention(d_model, dtype, scale, **options)


def build_feedback_attention(target_name: str, d_model: int, dtype: str = "float32", scale: float | None = None,
                             **options: object):
    """Compile both FeedbackAttention kernels as `scheduled_kernels` schedules them."""
    import tvm

    from sessa_export.ops.tvm_kernels import feedback_attention_module

    tgt, kernels = scheduled_kernels(target_name, d_model, dtype, scale, **options)
    return tvm.compile(feedback_attention_module(kernels), target=tgt)


__all__ = ["TARGETS", "Target", "AARCH64_LINUX", "ARCHS", "METAL_HOSTS", "CROSS_COMPILERS", "scheduled_kernels",
           "build_feedback_attention"]
