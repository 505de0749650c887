"""Run the CPU attention kernels with every tensor between PROT_NONE guard pages (a child process).

A kernel that reads or writes one element outside a buffer dies here of SIGSEGV on every run,
where in the model it reads a neighbour's bytes and, for large caches (mmap'ed, nothing mapped
before them), crashes now and then. Each tensor ends where a guard page begins (less than 64
bytes before it when its size is not a multiple of 64: the kernels assume 64-byte aligned data);
one whose size is a whole number of pages also starts where one ends. Run by tests/test_kernel_bounds.py:

    python tests/guarded_kernels.py [feedback] [forward]   (both by default: one process pays the imports once)
"""

from __future__ import annotations

import ctypes
import mmap
import sys

import numpy as np

PAGE = mmap.PAGESIZE
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_PROT_NONE, _PROT_RW, _PRIVATE_ANONYMOUS = 0, 3, 0x22
_held: list = []  # the mappings outlive the arrays that view them


def guarded(array: np.ndarray):
    """A TVM tensor holding a copy of `array` in pages of its own, guard pages on either side."""
    import tvm

    nbytes, aligned = array.nbytes, -(-array.nbytes // 64) * 64
    span = -(-aligned // PAGE) * PAGE
    base = _libc.mmap(None, span + 2 * PAGE, _PROT_RW, _PRIVATE_ANONYMOUS, -1, 0)
    assert base not in (None, ctypes.c_void_p(-1).value), ctypes.get_errno()
    assert _libc.mprotect(base, PAGE, _PROT_NONE) == 0 and _libc.mprotect(base + PAGE + span, PAGE, _PROT_NONE) == 0
    buffer = (ctypes.c_char * nbytes).from_address(base + PAGE + span - aligned)
    _held.append(buffer)
    view = np.frombuffer(buffer, dtype=array.dtype).reshape(array.shape)
    view[...] = array
    return tvm.runtime.from_dlpack(view)


def feedback(rng: np.random.Generator) -> None:
    """FeedbackAttention decode and prefill as the CPU build schedules them: P = 0 (a read before
    the caches' first row) and P + S = capacity (a read past their last)."""
    from sessa_export.ops import tvm_kernels
    from sessa_export.targets import build_feedback_attention

    D, capacity = 64, 64
    kernels = build_feedback_attention("cpu", D, "float32")
    for name, new, past in ((tvm_kernels.DECODE, 1, 0), (tvm_kernels.DECODE, 1, capacity - 1),
                            (tvm_kernels.PREFILL, 16, 0), (tvm_kernels.PREFILL, 16, capacity - 16),
                            (tvm_kernels.PREFILL, capacity, 0)):
        rows = [rng.standard_normal((1, new, D)).astype(np.float32) for _ in range(4)]
        gain = guarded(np.full((1, new, 1), 0.5, np.float32))
        caches = [rng.standard_normal((1, capacity, D)).astype(np.float32) for _ in range(2)]
        args = (*[guarded(r) for r in rows[:3]], gain, *[guarded(c) for c in caches], past, guarded(rows[3]))
        kernels[name](*args)
        print(f"feedback: {name} S={new} P={past}: ok", flush=True)


def forward(rng: np.random.Generator) -> None:
    """The forward attention (GQA, RoPE) with the CPU rule's tiling for this machine: decode and
    prefill at P = 0 and at P + S = capacity, a capacity no key tile divides."""
    import tvm

    from sessa_export.ops import tvm_attention
    from sessa_export.targets import cpu

    H, Hkv, d, capacity = 4, 2, 64, 40
    tgt = cpu.tvm_target(cpu=cpu.NATIVE)
    func = tvm_attention.forward_attention_kernel(H, Hkv, d, True, "float32", cpu.attention_tiling(d, tgt))
    kernel = tvm.compile(tvm.IRModule({"attn": func.with_attr("global_symbol", "attn")}), target=tgt)["attn"]
    inv_freq = guarded((10000.0 ** (-np.arange(0, d, 2) / d)).astype(np.float32))
    for new, past in ((1, 0), (1, capacity - 1), (16, 0), (16, capacity - 16), (capacity, 0)):
        q, k, v, out = (rng.standard_normal((1, new, width)).astype(np.float32) for width in (H * d, Hkv * d, Hkv * d, H * d))
        caches = [rng.standard_normal((1, Hkv, capacity, d)).astype(np.float32) for _ in range(2)]
        kernel(guarded(q), guarded(k), guarded(v), inv_freq, *[guarded(c) for c in caches], past, guarded(out))
        print(f"forward: attention S={new} P={past}: ok", flush=True)


if __name__ == "__main__":
    for kernels in sys.argv[1:] or ["feedback", "forward"]:
        {"feedback": feedback, "forward": forward}[kernels](np.random.default_rng(0))
