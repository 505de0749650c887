"""CPU prefill kernel for ``ai.sessa.FeedbackAttention``: ops/tvm_kernels.py's PREFILL, in two phases.

Same math, calling convention and in-place cache contract as ``tvm_kernels.PREFILL`` (its docstring
has both). The probabilities of row t, softmax over j < t of q_b,t . k_b,j / sqrt(D), do not depend
on the state, only the solve ``s_t = f_t + gain_t * sum_j prob[t, j] s_j`` does. So the S new rows
are taken ``group_rows`` at a time, and for each group:

1. the probabilities of its rows, every block of ``rows`` rows a parallel task (no block waits for
   another): for each tile of keys, passes of ``score_rows`` rows x (``score_vectors`` vectors of
   keys) score accumulators, one broadcast query value against a vector of keys at each of the D
   steps (the tile, D x KT, read from the L3 once for all the block's rows), over the keys
   transposed once a call a tile at a time (``key_t`` [tile, D, KT], float32, zero past P + S: a
   tile streams from contiguous memory, and no product ends in a lane sum), stored with the
   row's max; then a second pass over the row turns them into exp(score - max) and their sum;
2. the solve, one parallel task per (batch row, D chunk): each block of rows accumulates
   ``prob @ state`` over the positions before it in passes of ``value_rows`` rows x
   ``value_vectors`` vectors of columns (every state row read once a pass), then solves its own rows in order
   (forward substitution, each row's columns a pass at a time in registers).

The earlier form solved row blocks in order with an online softmax inside the solve, so a batch-1
prefill had parallel work only across D chunks, each recomputing the full-width scores (1.5x the
work for two cores). The S-TIR kernel (one code path for CPUs and GPUs) computed each (row, key)
product as its own chain of D / lanes dependent multiply-adds. Decode (S = 1) stays with the S-TIR
kernel's split-K pass. The probabilities of a group take group_rows x (P + S) float32 of workspace.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from tvm import tirx
from tvm.script import tirx as T

from . import tvm_fastmath as fastmath
from .tvm_kernels import CACHE_DTYPES, DTYPES, PREFILL

_NEG = -3.4028234663852886e38  # float32 lowest: the running max before any key


@dataclass(frozen=True)
class PrefillTiling:
    """Register tile sizes of the CPU prefill; ``targets/cpu.py`` picks them from the SIMD registers."""

    rows: int = 8  # rows a block: each key tile loaded serves them all, a score pass at a time
    vector: int = 8  # SIMD lanes: over keys in the scores, over columns in the update
    score_rows: int = 8  # rows of a score pass (score_rows x score_vectors accumulators)
    score_vectors: int = 2  # vectors of keys a score tile
    value_rows: int = 8  # rows of an update pass (value_rows x value_vectors accumulators)
    value_vectors: int = 2  # vectors of columns an update pass
    d_chunks: int = 1  # slices of D, one solve task each
    group_rows: int = 256  # rows whose probabilities are computed at once (a multiple of rows)

    def check(self, d_model: int) -> None:
        """Raise ValueError for tile sizes the kernel cannot use."""
        if min(self.rows, self.vector, self.score_rows, self.score_vectors, self.value_rows, self.value_vectors,
               self.d_chunks, self.group_rows) < 1:
            raise ValueError(f"tile sizes must be positive: {self}")
        if self.group_rows % self.rows or self.rows % self.score_rows or self.rows % self.value_rows:
            raise ValueError(f"group_rows {self.group_rows} is not a multiple of rows {self.rows}, or rows not of "
                             f"score_rows {self.score_rows} and value_rows {self.value_rows}")
        if d_model % self.d_chunks or (d_model // self.d_chunks) % (self.vector * self.value_vectors):
            raise ValueError(f"{self} does not divide d_model {d_model}")


@functools.lru_cache(maxsize=None)  # PrimFuncs are immutable: parse the TVMScript once a process
def feedback_prefill_kernel(d_model: int, dtype: str = "float32", scale: float | None = None,
                            tiling: PrefillTiling = PrefillTiling(), cache_dtype: str | None = None) -> tirx.PrimFunc:
    """The PrimFunc, named ``tvm_kernels.PREFILL`` (symbolic batch, seq_len and capacity)."""
    cache_dtype = cache_dtype or dtype
    if dtype not in DTYPES or cache_dtype not in CACHE_DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES} and cache_dtype one of {CACHE_DTYPES}, "
                         f"got {dtype!r}, {cache_dtype!r}")
    tiling.check(d_model)
    scale = d_model**-0.5 if scale is None else float(scale)
    D, R, V, NC, G = d_model, tiling.rows, tiling.vector, tiling.d_chunks, tiling.group_rows
    KT = V * tiling.score_vectors  # keys a tile
    RS, SV, RV, VC = tiling.score_rows, tiling.score_vectors, tiling.value_rows, tiling.value_vectors
    NB = G // R  # row blocks a group
    DC = D // NC  # columns a solve task
    PASS = V * VC  # columns an update pass
    f32 = "float32"
    exp = fastmath.exp
    row_sum, row_max = fastmath.row_sum, fastmath.row_max

    def key_tiles(past_len, seq_len):
        """Tiles of KT keys over the positions [0, P + S)."""
        return T.ceildiv(past_len + seq_len, KT)

    @T.prim_func
    def kernel(query_h: T.handle, key_h: T.handle, forward_h: T.handle, gain_h: T.handle,
               key_cache_h: T.handle, state_cache_h: T.handle, past_len: T.int64, state_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        batch = T.int64()
        seq_len = T.int64()
        capacity = T.int64()
        query = T.match_buffer(query_h, (batch, seq_len, D), dtype)
        key = T.match_buffer(key_h, (batch, seq_len, D), dtype)
        forward = T.match_buffer(forward_h, (batch, seq_len, D), dtype)
        gain = T.match_buffer(gain_h, (batch, seq_len, 1), dtype)
        key_cache = T.match_buffer(key_cache_h, (batch, capacity, D), cache_dtype)
        state_cache = T.match_buffer(state_cache_h, (batch, capacity, D), cache_dtype)
        state = T.match_buffer(state_h, (batch, seq_len, D), dtype)
        # 1. append the new keys, then every key transposed, a tile at a time: zeros, then the
        # positions the tile holds (a Select would have loaded outside the cache: TVM simplifies
        # its load under its condition and, vectorised, runs it for every lane)
        for bi in T.parallel(batch * seq_len):
            for d in T.vectorized(D):
                key_cache[bi // seq_len, past_len + bi % seq_len, d] = T.Cast(cache_dtype, key[bi // seq_len, bi % seq_len, d])
        key_t = T.alloc_buffer((batch, key_tiles(past_len, seq_len), D, KT), f32)
        for bt in T.parallel(batch * key_tiles(past_len, seq_len)):
            b, kt = bt // key_tiles(past_len, seq_len), bt % key_tiles(past_len, seq_len)
            for d in range(D):
                for jj in T.vectorized(KT):
                    key_t[b, kt, d, jj] = T.float32(0)
            for jj in range(T.min(KT, past_len + seq_len - kt * KT)):
                for d in range(D):
                    key_t[b, kt, d, jj] = T.Cast(f32, key_cache[b, kt * KT + jj, d])
        prob = T.alloc_buffer((batch, G, key_tiles(past_len, seq_len) * KT), f32)  # exp(score - max) of a group's rows
        total = T.alloc_buffer((batch, G), f32)  # and their sums
        for g in range(T.ceildiv(seq_len, G)):
            # 2. the group's probabilities: one task per (batch row, block), light and heavy
            # blocks paired so that each core gets half the keys
            for task in T.parallel(batch * NB):
                b = task // NB
                k = task % NB
                rb = T.if_then_else(k % 2 == 0, k // 2, NB - 1 - k // 2)
                row0 = g * G + rb * R  # the block's first row
                if row0 < seq_len:
                    base = past_len + row0  # its position
                    last = T.min(row0 + R, seq_len) - 1  # its last row: keys j < past_len + last
                    qr = T.alloc_buffer((R, D), f32)
                    score = T.alloc_buffer((RS, KT), f32)
                    peak = T.alloc_buffer((R,), f32)
                    part = T.alloc_buffer((1, KT), f32)
                    for ri in range(R):
                        if row0 + ri < seq_len:
                            for d in T.vectorized(D):
                                qr[ri, d] = T.Cast(f32, query[b, row0 + ri, d])
                        else:  # a row past the end of the last block: computed on zeros, never used
                            for d in T.vectorized(D):
                                qr[ri, d] = T.float32(0)
                        peak[ri] = T.float32(_NEG)
                    for kt in range(T.ceildiv(past_len + last, KT)):
                        for rg in range(R // RS):
                            if row0 + rg * RS < seq_len:  # (a pass of rows past the last is skipped, here and below)
                                for ri in T.unroll(RS):
                                    for sv in T.unroll(SV):
                                        for lane in T.vectorized(V):
                                            score[ri, sv * V + lane] = T.float32(0)
                                for d in range(D):
                                    for ri in T.unroll(RS):
                                        for sv in T.unroll(SV):
                                            for lane in T.vectorized(V):
                                                score[ri, sv * V + lane] = score[ri, sv * V + lane] + qr[rg * RS + ri, d] * key_t[
                                                    b, kt, d, sv * V + lane]
                                for ri in range(RS):  # keys 0 <= j < t = base + ri
                                    for jj in T.vectorized(KT):
                                        score[ri, jj] = T.Select(kt * KT + jj < base + rg * RS + ri, score[ri, jj] * T.float32(scale),
                                                                 T.float32(_NEG))
                                        prob[b, rb * R + rg * RS + ri, kt * KT + jj] = score[ri, jj]
                                    peak[rg * RS + ri] = T.max(peak[rg * RS + ri], row_max(score, ri, KT))
                    for ri in range(T.min(R, seq_len - row0)):
                        for jj in T.vectorized(KT):
                            part[0, jj] = T.float32(0)
                        for kt in range(T.ceildiv(past_len + last, KT)):
                            for jj in T.vectorized(KT):
                                prob[b, rb * R + ri, kt * KT + jj] = T.Select(
                                    kt * KT + jj < base + ri, exp(prob[b, rb * R + ri, kt * KT + jj] - peak[ri]),
                                    T.float32(0))
                                part[0, jj] = part[0, jj] + prob[b, rb * R + ri, kt * KT + jj]
                        total[b, rb * R + ri] = row_sum(part, 0, KT)
            # 3. the solve: one task per (batch row, D chunk), the group's blocks in order
            for task in T.parallel(batch * NC):
                b = task // NC
                c0 = task % NC * DC  # first column of the task's chunk
                acc = T.alloc_buffer((R, DC), f32)
                row = T.alloc_buffer((PASS,), f32)
                for rb in range(NB):
                    row0 = g * G + rb * R
                    if row0 < seq_len:
                        base = past_len + row0
                        # acc = prob @ state over the positions before the block, RV rows x PASS columns a pass
                        for rg, cp in T.grid(T.ceildiv(T.min(R, seq_len - row0), RV), DC // PASS):
                            for ri in T.unroll(RV):
                                for cv in T.unroll(VC):
                                    for lane in T.vectorized(V):
                                        acc[rg * RV + ri, cp * PASS + cv * V + lane] = T.float32(0)
                            for j in range(base):
                                for ri in T.unroll(RV):
                                    for cv in T.unroll(VC):
                                        for lane in T.vectorized(V):
                                            acc[rg * RV + ri, cp * PASS + cv * V + lane] = acc[
                                                rg * RV + ri, cp * PASS + cv * V + lane] + prob[b, rb * R + rg * RV + ri, j] * T.Cast(
                                                f32, state_cache[b, j, c0 + cp * PASS + cv * V + lane])
                        # forward substitution: row ri adds the block's rows before it, solved just
                        # before it, then is solved and stored
                        for ri in range(R):
                            if row0 + ri < seq_len:
                                for cp in range(DC // PASS):  # PASS columns at a time, in registers (through
                                    # memory, the 96-wide updates of acc took 0.9 of 8.5 ms at D = 768, T = 1024)
                                    for cv in T.unroll(VC):
                                        for lane in T.vectorized(V):
                                            row[cv * V + lane] = acc[ri, cp * PASS + cv * V + lane]
                                    for jj in range(ri):
                                        for cv in T.unroll(VC):
                                            for lane in T.vectorized(V):
                                                row[cv * V + lane] = row[cv * V + lane] + prob[b, rb * R + ri, base + jj] * T.Cast(
                                                    f32, state_cache[b, base + jj, c0 + cp * PASS + cv * V + lane])
                                    for cv in T.unroll(VC):
                                        for lane in T.vectorized(V):
                                            acc[ri, cp * PASS + cv * V + lane] = row[cv * V + lane]
                                for d in T.vectorized(DC):
                                    state[b, row0 + ri, c0 + d] = T.Cast(dtype, T.Cast(f32, forward[b, row0 + ri, c0 + d])
                                                                         + T.Cast(f32, gain[b, row0 + ri, 0]) * T.Select(
                                                                             total[b, rb * R + ri] > T.float32(0),
                                                                             acc[ri, d] / total[b, rb * R + ri], T.float32(0)))
                                for d in T.vectorized(DC):
                                    state_cache[b, base + ri, c0 + d] = T.Cast(cache_dtype, state[b, row0 + ri, c0 + d])

    return kernel.with_attr("global_symbol", PREFILL)
