"""Arithmetic for the TVM kernels that keeps their loops short and SIMD: exp, and balanced sums and maxima.

LLVM turns ``T.exp`` on a vector into one ``expf`` call per lane on CPUs without a vector math
library; the online softmaxes of the attention kernels take one exp per (row, key), which made
them exp-bound. ``exp(x)`` here is Cephes' expf: x = n·ln 2 + r with |r| <= ln 2 / 2, a
degree-6 polynomial in r (relative error about 2e-7, a float32 ulp or two), times 2^n built in
the exponent bits. Arguments below -87 give exactly 0 (the true value is under 1.7e-38).
"""

from __future__ import annotations

from collections.abc import Sequence

from tvm import tirx

_LOG2E = 1.44269504088896341
_LN2_HI, _LN2_LO = 0.693359375, -2.12194440e-4  # ln 2 = _LN2_HI + _LN2_LO, _LN2_HI exact in 9 bits
_POLY = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1)
_LOWEST_ARG = -87.0  # 2^-126 (the smallest normal float32) is about exp(-87.3)
_HIGHEST_ARG = 88.0


def tree_sum(terms: Sequence[tirx.PrimExpr]) -> tirx.PrimExpr:
    """The sum of `terms` as a balanced tree: a dependency chain of log2(n) adds, not n - 1."""
    return _tree(terms, lambda a, b: a + b)


def tree_max(terms: Sequence[tirx.PrimExpr]) -> tirx.PrimExpr:
    """The largest of `terms`, as a balanced tree like tree_sum."""
    return _tree(terms, tirx.max)


def row_sum(buffer, row, n: int) -> tirx.PrimExpr:
    """buffer[row, 0] + ... + buffer[row, n - 1] as tree_sum adds them (the kernels' lane and tile
    sums; TVMScript takes no generator expressions)."""
    return tree_sum(buffer[row, i] for i in range(n))


def row_max(buffer, row, n: int) -> tirx.PrimExpr:
    """The largest of buffer[row, 0 .. n - 1], as tree_max takes it."""
    return tree_max(buffer[row, i] for i in range(n))


def _tree(terms: Sequence[tirx.PrimExpr], combine) -> tirx.PrimExpr:
    terms = list(terms)
    while len(terms) > 1:
        terms = [combine(a, b) for a, b in zip(terms[::2], terms[1::2])] + terms[len(terms) & ~1:]
    return terms[0]


def exp(x: tirx.PrimExpr) -> tirx.PrimExpr:
    """exp(x) of a float32 expression, 0 for x < -87, x clamped to 88 above."""
    f32 = "float32"

    def c(value: float) -> tirx.PrimExpr:
        return tirx.const(value, f32)

    clamped = tirx.min(tirx.max(x, c(_LOWEST_ARG)), c(_HIGHEST_ARG))
    n = tirx.floor(clamped * c(_LOG2E) + c(0.5))
    r = clamped - n * c(_LN2_HI) - n * c(_LN2_LO)
    poly = c(_POLY[0])
    for coefficient in _POLY[1:]:
        poly = poly * r + c(coefficient)
    mantissa = poly * r * r + r + c(1.0)
    two_n = tirx.reinterpret(f32, tirx.shift_left(tirx.Cast("int32", n) + 127, tirx.const(23, "int32")))
    return tirx.Select(x < c(_LOWEST_ARG), c(0.0), mantissa * two_n)
