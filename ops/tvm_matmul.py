"""The packed-panel matmul that the CPU's linear layers run on (its block is what CpuMatmul schedules).

A weight W [out, in] is stored as panels [out / panel, in, panel], each panel one contiguous run
over the inputs: panels[p, k, j] = W[p·panel + j, k]. The target picks the panel width
(`targets/cpu.weight_panel`); the quantized kernels of ops/tvm_dequant_matmul.py use the same
layout and block name.
"""

from __future__ import annotations

import numpy as np

PACKED_MATMUL = "packed_matmul"  # the block name of every panel matmul


def pack_weight(weight: np.ndarray, panel: int) -> np.ndarray:
    """W [out, in] (torch's layout) as panels [out / panel, in, panel]."""
    out, inputs = weight.shape
    return np.ascontiguousarray(weight.reshape(out // panel, panel, inputs).transpose(0, 2, 1))


def packed_matmul(x, panels):
    """x [B, S, in] @ W^T with W packed by ``pack_weight``: y [B, S, out / panel, panel] (a te.Tensor)."""
    from tvm import te

    k = te.reduce_axis((0, x.shape[-1]), "k")
    return te.compute((*x.shape[:-1], *panels.shape[::2]),
                      lambda b, s, p, j: te.sum(x[b, s, k] * panels[p, k, j], axis=k), name=PACKED_MATMUL)


__all__ = ["PACKED_MATMUL", "pack_weight", "packed_matmul"]
