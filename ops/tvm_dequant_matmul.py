"""TVM kernel for a linear layer with group-quantized weights, dequantized inside the matmul.

For x [B, S, K] (float32) and a weight quantized along its input dim in groups of G inputs::

    y[b, s, n] = Σ_k x[b, s, k] · (float(q[k, n]) · scale[k // G, n])  (+ bias[n])

The weight is stored in panels of P output columns, as the float path stores its weights on
CPU (``targets/cpu.py``): panel p holds columns p·P .. p·P + P - 1 for every input, contiguous,
so a decode step streams each panel once. One float32 scale per group of G inputs per column:

- q8: ``q`` int8 [N / P, K, P], symmetric in [-127, 127];
- q4: two 4-bit values per byte, ``packed`` uint8 [N / P, K / 2, P]: input 2i in the low nibble
  and 2i + 1 in the high nibble of row i, each stored as value + 8 (values in [-8, 7], zero
  point 0; the scale of each group is searched around peak / -8 for the least squared error);
- ``scales`` float32 [N / P, K / G, P].

The PrimFunc has two blocks, three with a bias: ``dequantize`` (the float weight, injective),
the matmul over it (an einsum into [B, S, N / P, P], named like the float path's packed matmul)
and the bias epilogue. The CPU pipeline's `CpuMatmul` rule schedules it like the float32
matmuls (a GEMV for S = 1, tiles for prefill) and inlines ``dequantize`` into the reduction:
the compiled kernel has no float32 weight buffer; each weight is widened and scaled in
registers as it is used. The caller views the result as [B, S, N].
"""

from __future__ import annotations

import numpy as np

from ..quantization import MODES
from .tvm_matmul import PACKED_MATMUL

GROUP_SIZE = MODES["q8"].block_size  # inputs per quantization group (along the input dim), one scale each


def quantize(weight: np.ndarray, mode: str, panel: int, group_size: int = GROUP_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """weight [N, K] (torch layout, out x in) -> (stored q, scales) in panels of `panel` columns, as above."""
    bits = MODES[mode].bits
    weight = np.asarray(weight, dtype=np.float32)
    n, k = weight.shape
    if k % group_size:
        raise ValueError(f"input width {k} is not a multiple of the group size {group_size}")
    if n % panel:
        raise ValueError(f"output width {n} is not a multiple of the panel width {panel}")
    groups = weight.reshape(n, k // group_size, group_size).astype(np.float64)
    if bits == 8:  # symmetric absmax: [-127, 127]
        scale = np.abs(groups).max(axis=-1) / 127
        scale = np.where(scale > 0, scale, 1.0)
        q = np.clip(np.rint(groups / scale[..., None]), -127, 127)
    else:  # all 16 levels [-8, 7], the scale searched per group for the least squared error
        peak = np.take_along_axis(groups, np.abs(groups).argmax(axis=-1)[..., None], axis=-1)[..., 0]
        best_err, scale, q = None, None, None
        for factor in np.linspace(0.75, 1.25, 21):  # factor 1: the signed peak maps to -8 exactly
            trial = peak / -8 * factor
            trial = np.where(trial != 0, trial, 1.0)
            values = np.clip(np.rint(groups / trial[..., None]), -8, 7)
            err = ((values * trial[..., None] - groups) ** 2).sum(axis=-1)
            if best_err is None:
                best_err, scale, q = err, trial, values
            else:
                better = err < best_err
                best_err = np.where(better, err, best_err)
                scale = np.where(better, trial, scale)
                q = np.where(better[..., None], values, q)
        # then the least-squares scale for the chosen values (never worse than the searched one)
        norm = (q * q).sum(axis=-1)
        fitted = np.where(norm > 0, (q * groups).sum(axis=-1) / np.where(norm > 0, norm, 1.0), scale)
        scale = np.where(fitted != 0, fitted, 1.0)
    q = q.astype(np.int32).reshape(n, k).T  # [K, N]
    if bits == 8:
        stored = q.astype(np.int8)
    else:
        biased = (q + 8).astype(np.uint8)  # 1..15
        stored = biased[0::2] | (biased[1::2] << 4)  # [K / 2, N]
    return _to_panels(stored, panel), _to_panels(scale.astype(np.float32).T, panel)


def dequantize(q: np.ndarray, scales: np.ndarray, mode: str, group_size: int = GROUP_SIZE) -> np.ndarray:
    """The float32 weight [N, K] (torch layout) a stored (q, scales) pair stands for."""
    q, scales = _from_panels(q), _from_panels(scales)
    if MODES[mode].bits == 8:
        values = q.astype(np.float32)
    else:
        low, high = (q & 15).astype(np.int32) - 8, (q >> 4).astype(np.int32) - 8
        values = np.empty((q.shape[0] * 2, q.shape[1]), dtype=np.float32)
        values[0::2], values[1::2] = low, high
    return (values * np.repeat(scales, group_size, axis=0)).T.copy()


def _to_panels(rows: np.ndarray, panel: int) -> np.ndarray:
    """[R, N] -> [N / panel, R, panel]: panel p holds columns p·panel .. p·panel + panel - 1."""
    r, n = rows.shape
    return np.ascontiguousarray(rows.reshape(r, n // panel, panel).transpose(1, 0, 2))


def _from_panels(panels: np.ndarray) -> np.ndarray:
    """The inverse of _to_panels: [N / panel, R, panel] -> [R, N]."""
    count, r, panel = panels.shape
    return panels.transpose(1, 0, 2).reshape(r, count * panel)


def dequant_matmul_kernel(in_features: int, out_features: int, mode: str, bias: bool, panel: int,
                          group_size: int = GROUP_SIZE, decode: bool = False):
    """The PrimFunc ``(x [B, S, K], q, scales, [bias [N / P, P]], y [B, S, N / P, P])``; S = 1 when `decode`."""
    from tvm import te, tirx

    bits = MODES[mode].bits
    K, N, G, P = int(in_features), int(out_features), int(group_size), int(panel)
    if K % G or N % P:
        raise ValueError(f"widths {K} x {N} do not fit groups of {G} inputs and panels of {P} columns")
    K64, half, groups, NP, P64 = (tirx.IntImm("int64", v) for v in (K, K // 2, K // G, N // P, P))  # int64 indices
    batch = tirx.Var("batch", "int64")
    seq = tirx.IntImm("int64", 1) if decode else tirx.Var("seq_len", "int64")
    x = te.placeholder((batch, seq, K64), "float32", name="x")
    if bits == 8:
        q = te.placeholder((NP, K64, P64), "int8", name="q")
    else:
        q = te.placeholder((NP, half, P64), "uint8", name="q")
    scales = te.placeholder((NP, groups, P64), "float32", name="scales")
    k = te.reduce_axis((tirx.IntImm("int64", 0), K64), name="k")

    def weight(p, kk, j):
        if bits == 8:
            value = q[p, kk, j].astype("float32")
        else:
            byte = q[p, kk // 2, j].astype("int32")
            value = (((byte >> ((kk % 2) * 4).astype("int32")) & 15) - 8).astype("float32")
        return value * scales[p, kk // G, j]

    # A block of its own (named "dequantize*": CpuMatmul inlines it into the matmul once the rows
    # are padded), so that the matmul block stays an einsum for the schedule primitives.
    w = te.compute((NP, K64, P64), weight, name="dequantize")
    y = te.compute((batch, seq, NP, P64), lambda b, s, p, j: te.sum(x[b, s, k] * w[p, k, j], axis=k),
                   name=PACKED_MATMUL)
    args = [x, q, scales]
    if bias:
        b_ = te.placeholder((NP, P64), "float32", name="bias")
        y = te.compute((batch, seq, NP, P64), lambda b, s, p, j: y[b, s, p, j] + b_[p, j], name="bias_add")
        args.append(b_)
    return te.create_prim_func([*args, y])


__all__ = ["GROUP_SIZE", "quantize", "dequantize", "dequant_matmul_kernel"]
