"""TVM kernels for linear layers and embeddings with group-quantized weights (q8, q4).

A weight W [N, K] (torch layout) is quantized along its input dim in groups of G inputs, each
group of each output column with its own scale: W[n, k] ≈ q[n, k] · scale[n, k // G], symmetric,
q8 in [-127, 127], q4 in [-8, 7] (the q4 scale searched per group for the least squared error).

Linear layers store q in panels of P output columns, as the float path stores its weights on CPU
(``targets/cpu.py``), and inside a panel in runs of 4 consecutive inputs per column, the layout
integer dot-product instructions read (x86 ``vpdpbusd``, AArch64 ``sdot``/``usdot``: 4 bytes of
one column times 4 bytes of the activation into one int32 lane). Values are stored unsigned,
with zero point Z (q8: q + 128, Z = 128; q4: q + 8, Z = 8):

- q8: ``q`` uint8 [N / P, K / 4, P · 4]: q[p, kb, 4·j + c] is input 4·kb + c of column p·P + j;
- q4: ``q`` uint8 [N / P, K / 8, P · 4]: the low nibble of q[p, kb, 4·j + c] is input 8·kb + c, the
  high nibble input 8·kb + 4 + c;
- ``scales`` float16 [N / P, K / G, P].

Two kernels read this layout; the caller views their result [B, S, N / P, P] as [B, S, N]:

- ``int_matmul_kernel`` (decode, S = 1, the bandwidth-bound GEMV; and prefill, any S, in tiles of
  rows): the activations are quantized once per call per row and group of G inputs to int8 (scale
  max|x| / 127, as ONNX Runtime's MatMulNBits accuracy level 4 does), then ``int_dot`` sums
  int32(xq) · int32(stored) over each group, and ``int_scale`` applies the scales once per group
  after the integer sum: ``y = Σ_g float(dot_g − Z · Σ_{k∈g} xq_k) · scale_w[g] · scale_x[g]``.
  A prompt's row then gets the numbers a decode step gives it.
- ``dequant_matmul_kernel`` (prefill where the CPU has no dot-product instruction, any S): float32
  matmul, each weight decoded inside the matmul (block ``dequantize``, which CpuMatmul inlines
  into the reduction).

The kernels name their blocks and carry no schedule: ``targets/cpu.py``'s rules schedule them
(CpuIntMatmul tensorizes ``int_dot`` with the build's dot-product instruction).

Embedding tables are stored by rows: ``rows`` uint8 [V, D] (q8) or [V, D / 2] (q4, input 2i in
the low nibble), ``scales`` float16 [V, D / G]; ``embedding`` dequantizes one row per token.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ..config import available_cores
from ..quantization import MODES
from .tvm_matmul import PACKED_MATMUL

GROUP_SIZE = MODES["q8"].block_size  # inputs per quantization group (along the input dim), one scale each
ZERO_POINT = {8: 128, 4: 8}  # stored value = q + ZERO_POINT[bits]
RUN = 4  # consecutive inputs of one column stored together (one int32 lane of a dot-product instruction)
INT_DOT, INT_SCALE, INT_ROWS = "int_dot", "int_scale", "int_rows"  # the block names CpuIntMatmul looks for


QUANTIZE_CHUNK = 1 << 17  # weights quantized at a time (its float64 temporaries stay in the cache)


def quantize_groups(weight: np.ndarray, bits: int, group_size: int = GROUP_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """weight [N, K] -> (q int32 [N, K] in the mode's range, scale float32 [N, K / G]), as above; in
    chunks of rows on every core (numpy releases the GIL in its loops): a 125M model's q4 search took
    35 s in one pass over the whole weights."""
    weight = np.asarray(weight, dtype=np.float32)
    n, k = weight.shape
    if k % group_size:
        raise ValueError(f"input width {k} is not a multiple of the group size {group_size}")
    groups = weight.reshape(n, k // group_size, group_size)
    q, scale = np.empty(groups.shape, np.int32), np.empty(groups.shape[:2], np.float32)
    rows = max(1, QUANTIZE_CHUNK // k)

    def chunk(start: int) -> None:
        q[start:start + rows], scale[start:start + rows] = _quantize_chunk(groups[start:start + rows], bits)

    with ThreadPoolExecutor(available_cores()) as pool:
        list(pool.map(chunk, range(0, n, rows)))
    return q.reshape(n, k), scale


def _quantize_chunk(groups: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Groups [rows, K / G, G] -> (q int32, scale float32 [rows, K / G]), computed in float64."""
    groups = groups.astype(np.float64)
    if bits == 8:  # symmetric absmax: [-127, 127]
        scale = np.abs(groups).max(axis=-1) / 127
        scale = np.where(scale > 0, scale, 1.0)
    else:  # all 16 levels [-8, 7], the scale searched per group for the least squared error
        peak = np.take_along_axis(groups, np.abs(groups).argmax(axis=-1)[..., None], axis=-1)[..., 0]
        best_err, scale = None, None
        for factor in np.linspace(0.75, 1.25, 21):  # factor 1: the signed peak maps to -8 exactly
            trial = peak / -8 * factor
            trial = np.where(trial != 0, trial, 1.0)
            values = np.clip(np.rint(groups / trial[..., None]), -8, 7)
            err = ((values * trial[..., None] - groups) ** 2).sum(axis=-1)
            if best_err is None:
                best_err, scale = err, trial
            else:
                better = err < best_err
                best_err = np.where(better, err, best_err)
                scale = np.where(better, trial, scale)
        # then the least-squares scale for the chosen values (never worse than the searched one)
        q = np.clip(np.rint(groups / scale[..., None]), -8, 7)
        norm = (q * q).sum(axis=-1)
        fitted = np.where(norm > 0, (q * groups).sum(axis=-1) / np.where(norm > 0, norm, 1.0), scale)
        scale = np.where(fitted != 0, fitted, 1.0)
    # the scales are stored in float16: quantize against the stored scale (q4 keeps its chosen values)
    scale = scale.astype(np.float16).astype(np.float64)
    scale = np.where(scale != 0, scale, 1.0)
    if bits == 8:
        q = np.clip(np.rint(groups / scale[..., None]), -127, 127)
    return q.astype(np.int32), scale.astype(np.float32)


def quantize(weight: np.ndarray, mode: str, panel: int, group_size: int = GROUP_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """weight [N, K] (torch layout, out x in) -> (stored q, scales) of a linear layer, in the layout above."""
    bits = MODES[mode].bits
    n, k = np.shape(weight)
    if n % panel:
        raise ValueError(f"output width {n} is not a multiple of the panel width {panel}")
    if k % (2 * RUN) or group_size % (2 * RUN):
        raise ValueError(f"input width {k} and group size {group_size} must be multiples of {2 * RUN}")
    q, scale = quantize_groups(weight, bits, group_size)
    stored = (q + ZERO_POINT[bits]).astype(np.uint8)  # [N, K]
    runs = stored.reshape(n // panel, panel, k // RUN, RUN).transpose(0, 2, 1, 3)  # [N / P, K / 4, P, 4]
    if bits == 4:
        runs = runs[:, 0::2] | (runs[:, 1::2] << 4)  # [N / P, K / 8, P, 4]
    runs = runs.reshape(*runs.shape[:2], panel * RUN)
    scales = scale.reshape(n // panel, panel, k // group_size).transpose(0, 2, 1)  # [N / P, K / G, P]
    return np.ascontiguousarray(runs), np.ascontiguousarray(scales.astype(np.float16))


def dequantize(q: np.ndarray, scales: np.ndarray, mode: str, group_size: int = GROUP_SIZE) -> np.ndarray:
    """The float32 weight [N, K] (torch layout) a stored (q, scales) pair of a linear layer stands for."""
    bits = MODES[mode].bits
    q = q.reshape(*q.shape[:2], -1, RUN)
    if bits == 4:
        q = np.stack([q & 15, q >> 4], axis=2).reshape(q.shape[0], -1, *q.shape[2:])  # [N / P, K / 4, P, 4]
    count, runs, panel, _ = q.shape
    values = q.transpose(0, 2, 1, 3).reshape(count * panel, runs * RUN).astype(np.float32) - ZERO_POINT[bits]
    scale = scales.astype(np.float32).transpose(0, 2, 1).reshape(count * panel, -1)
    return values * np.repeat(scale, group_size, axis=1)


def quantize_rows(table: np.ndarray, mode: str, group_size: int = GROUP_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """An embedding table [V, D] -> (rows uint8 [V, D] or [V, D / 2], scales float16 [V, D / G])."""
    bits = MODES[mode].bits
    q, scale = quantize_groups(table, bits, group_size)
    stored = (q + ZERO_POINT[bits]).astype(np.uint8)
    if bits == 4:
        stored = stored[:, 0::2] | (stored[:, 1::2] << 4)
    return np.ascontiguousarray(stored), np.ascontiguousarray(scale.astype(np.float16))


def dequantize_rows(rows: np.ndarray, scales: np.ndarray, mode: str, group_size: int = GROUP_SIZE) -> np.ndarray:
    """The float32 table [V, D] stored rows stand for."""
    bits = MODES[mode].bits
    if bits == 4:
        rows = np.stack([rows & 15, rows >> 4], axis=-1).reshape(rows.shape[0], -1)
    values = rows.astype(np.float32) - ZERO_POINT[bits]
    return values * np.repeat(scales.astype(np.float32), group_size, axis=1)


def _placeholders(K: int, N: int, bits: int, G: int, P: int):
    from tvm import te, tirx

    if K % (2 * RUN) or G % (2 * RUN) or K % G or N % P:
        raise ValueError(f"widths {K} x {N} do not fit groups of {G} inputs and panels of {P} columns")
    NP, P64 = tirx.IntImm("int64", N // P), tirx.IntImm("int64", P)
    runs = tirx.IntImm("int64", K // RUN if bits == 8 else K // (2 * RUN))
    q = te.placeholder((NP, runs, tirx.IntImm("int64", P * RUN)), "uint8", name="q")
    scales = te.placeholder((NP, tirx.IntImm("int64", K // G), P64), "float16", name="scales")
    return q, scales


def _stored(q, bits: int, p, kb, j, c):
    """The stored (unsigned) value of input 4·kb + c of column j of panel p."""
    if bits == 8:
        return q[p, kb, j * RUN + c]
    return (q[p, kb // 2, j * RUN + c] >> ((kb % 2) * 4).astype("uint8")) & 15


def _bias(y, args: list, NP: int, P: int):
    from tvm import te, tirx

    b_ = te.placeholder((tirx.IntImm("int64", NP), tirx.IntImm("int64", P)), "float32", name="bias")
    args.append(b_)
    return te.compute(y.shape, lambda b, s, p, j: y[b, s, p, j] + b_[p, j], name="bias_add")


def int_matmul_kernel(in_features: int, out_features: int, mode: str, bias: bool, panel: int,
                      group_size: int = GROUP_SIZE, row_tile: int | None = None):
    """The PrimFunc ``(x [B, S, K], q, scales, [bias [N / P, P]], y [B, S, N / P, P])`` with activations
    quantized to int8 per group and integer dot products (module docstring). ``row_tile`` None: decode,
    S = 1. Else prefill, any S: the rows are computed in whole tiles of ``row_tile`` (the schedule's
    register tile), the rows past S repeating row S - 1, so that no row predicate reaches the products."""
    from tvm import te, tirx

    bits = MODES[mode].bits
    K, N, G, P = int(in_features), int(out_features), int(group_size), int(panel)
    q, scales = _placeholders(K, N, bits, G, P)
    i64 = lambda v: tirx.IntImm("int64", v)  # noqa: E731 - int64 indices throughout
    batch = tirx.Var("batch", "int64")
    seq = i64(1) if row_tile is None else tirx.Var("seq_len", "int64")
    rows = seq if row_tile is None else (seq + (row_tile - 1)) // row_tile * row_tile
    x = te.placeholder((batch, seq, i64(K)), "float32", name="x")
    row = (lambda s: s) if row_tile is None else (lambda s: tirx.min(s, seq - 1))
    r = te.reduce_axis((i64(0), i64(G)), name="r")
    amax = te.compute((batch, rows, i64(K // G)), lambda b, s, g: te.max(te.abs(x[b, row(s), g * G + r]), axis=r),
                      name="act_absmax")

    def quantized(b, s, kb, c):
        peak = amax[b, s, kb * RUN // G]
        scaled = x[b, row(s), kb * RUN + c] * (127.0 / te.max(peak, 1e-30))
        return te.round(scaled).astype("int8")

    xq = te.compute((batch, rows, i64(K // RUN), i64(RUN)), quantized, name="act_quantize")
    r4, c = te.reduce_axis((i64(0), i64(G // RUN)), name="r4"), te.reduce_axis((i64(0), i64(RUN)), name="c")
    xsum = te.compute((batch, rows, i64(K // G)), lambda b, s, g: te.sum(
        xq[b, s, g * (G // RUN) + r4, c].astype("int32"), axis=[r4, c]), name="act_sum")
    NP = q.shape[0]
    if bits == 8:
        w = q
    else:  # the nibbles as a tensor of their own, so the dot-product block reads whole runs of bytes
        w = te.compute((NP, i64(K // RUN), i64(P * RUN)),
                       lambda p, kb, jc: _stored(q, bits, p, kb, jc // RUN, jc % RUN), name="unpack")
    r4, c = te.reduce_axis((i64(0), i64(G // RUN)), name="r4"), te.reduce_axis((i64(0), i64(RUN)), name="c")
    dot = te.compute((batch, rows, NP, i64(K // G), i64(P)), lambda b, s, p, g, j: te.sum(
        xq[b, s, g * (G // RUN) + r4, c].astype("int32") * w[p, g * (G // RUN) + r4, j * RUN + c].astype("int32"),
        axis=[r4, c]), name=INT_DOT)
    g = te.reduce_axis((i64(0), i64(K // G)), name="g")
    zero = ZERO_POINT[bits]
    y = te.compute((batch, rows, NP, i64(P)), lambda b, s, p, j: te.sum(
        (dot[b, s, p, g, j] - zero * xsum[b, s, g]).astype("float32") * scales[p, g, j].astype("float32")
        * (amax[b, s, g] * (1.0 / 127.0)), axis=g), name=INT_SCALE)
    args = [x, q, scales]
    if bias:
        y = _bias(y, args, N // P, P)
    if row_tile is not None:  # the S rows of the tiles
        tiles = y
        y = te.compute((batch, seq, NP, i64(P)), lambda b, s, p, j: tiles[b, s, p, j], name=INT_ROWS)
    return te.create_prim_func([*args, y])


def dequant_matmul_kernel(in_features: int, out_features: int, mode: str, bias: bool, panel: int,
                          group_size: int = GROUP_SIZE):
    """Prefill: the PrimFunc ``(x [B, S, K], q, scales, [bias [N / P, P]], y [B, S, N / P, P])``, float32,
    each weight decoded in the reduction (block ``dequantize``, inlined by CpuMatmul)."""
    from tvm import te, tirx

    bits = MODES[mode].bits
    K, N, G, P = int(in_features), int(out_features), int(group_size), int(panel)
    q, scales = _placeholders(K, N, bits, G, P)
    batch, seq = tirx.Var("batch", "int64"), tirx.Var("seq_len", "int64")
    x = te.placeholder((batch, seq, tirx.IntImm("int64", K)), "float32", name="x")
    k = te.reduce_axis((tirx.IntImm("int64", 0), tirx.IntImm("int64", K)), name="k")

    def weight(p, kk, j):
        value = _stored(q, bits, p, kk // RUN, j, kk % RUN).astype("float32") - float(ZERO_POINT[bits])
        return value * scales[p, kk // G, j].astype("float32")

    # A block of its own (named "dequantize*": CpuMatmul inlines it into the matmul once the rows
    # are padded), so that the matmul block stays an einsum for the schedule primitives.
    NP, P64 = q.shape[0], tirx.IntImm("int64", P)
    w = te.compute((NP, tirx.IntImm("int64", K), P64), weight, name="dequantize")
    y = te.compute((batch, seq, NP, P64),
                   lambda b, s, p, j: te.sum(x[b, s, k] * w[p, k, j], axis=k), name=PACKED_MATMUL)
    args = [x, q, scales]
    if bias:
        y = _bias(y, args, N // P, P)
    return te.create_prim_func([*args, y])


def embedding(ids, rows, scales, mode: str, group_size: int = GROUP_SIZE):
    """te: the dequantized rows of `ids` [B, S] (int64): [B, S, D] float32 (ids clipped into the table,
    as the float path's take does)."""
    from tvm import te, tirx

    bits = MODES[mode].bits
    vocab = rows.shape[0]
    width = rows.shape[1] * (2 if bits == 4 else 1)

    def row(b, s, d):
        t = tirx.max(tirx.min(ids[b, s], vocab - 1), 0)
        byte = rows[t, d] if bits == 8 else (rows[t, d // 2] >> ((d % 2) * 4).astype("uint8")) & 15
        return (byte.astype("float32") - float(ZERO_POINT[bits])) * scales[t, d // group_size].astype("float32")

    return te.compute((*ids.shape, width), row, name="embedding_dequantize")


__all__ = ["GROUP_SIZE", "ZERO_POINT", "RUN", "INT_DOT", "INT_SCALE", "INT_ROWS", "quantize_groups", "quantize", "dequantize",
           "quantize_rows", "dequantize_rows", "int_matmul_kernel", "dequant_matmul_kernel", "embedding"]
