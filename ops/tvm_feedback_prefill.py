"""CPU prefill kernel for ``ai.sessa.FeedbackAttention``: ops/tvm_kernels.py's PREFILL, register-tiled.

Same math, calling convention and in-place cache contract as ``tvm_kernels.PREFILL`` (its docstring
has both); same algorithm: the S new rows are solved in blocks of ``rows``, each block runs an
online softmax over every earlier position a tile of keys at a time, accumulates ``prob @ state``
over the positions already solved, then solves its own rows in order (forward substitution) with
the probabilities of its diagonal tile. What differs is the loop nest, written for a CPU's SIMD
registers as ops/tvm_attention.py's CPU prefill is (and, like it, "scheduled" as written):

- scores are a rows x (``score_vectors`` vectors of keys) tile of accumulators, one broadcast query
  value against a vector of keys at each of the D steps, over the keys transposed once a call
  (``key_t``, float32, zero outside [0, P + S)): no product ends in a lane sum. ``key_t`` holds
  the columns in overlapping blocks of two tiles, [block, D, 2 KT], so that a tile, which starts
  at any column, lies in one block and streams from contiguous memory (rows of all columns put
  the D steps pages apart, past the reach of Intel's stride prefetcher: 1.3x slower there);
- the update ``acc += prob @ state`` runs in passes of rows x ``value_vectors`` vectors of columns,
  every state row read once a pass for all the rows of the block.

The S-TIR kernel (one code path for CPUs and GPUs, SPMD workers) computed each (row, key) product
as its own chain of D / lanes dependent multiply-adds and updated an accumulator in memory with every
multiply-add. A task is one (batch row, D chunk) pair: each chunk owns its columns of the state and
recomputes the full-width scores (``d_chunks`` buys tasks for small batches, as in the S-TIR kernel).
Decode (S = 1) stays with the S-TIR kernel's split-K pass.
"""

from __future__ import annotations

from dataclasses import dataclass

from tvm import tirx
from tvm.script import tirx as T

from . import tvm_fastmath as fastmath
from .tvm_kernels import CACHE_DTYPES, DTYPES, PREFILL

_NEG = -3.4028234663852886e38  # float32 lowest: the running max before any key


@dataclass(frozen=True)
class PrefillTiling:
    """Register tile sizes of the CPU prefill; ``targets/cpu.py`` picks them from the SIMD registers."""

    rows: int = 8  # rows solved together; at most the keys of a tile (the diagonal tile holds them)
    vector: int = 8  # SIMD lanes: over keys in the scores, over columns in the update
    score_vectors: int = 2  # vectors of keys a score tile (rows x score_vectors accumulators)
    value_vectors: int = 2  # vectors of columns an update pass (rows x value_vectors accumulators)
    d_chunks: int = 1  # independent slices of D, one task each; each recomputes the scores

    def check(self, d_model: int) -> None:
        """Raise ValueError for tile sizes the kernel cannot use."""
        if min(self.rows, self.vector, self.score_vectors, self.value_vectors, self.d_chunks) < 1:
            raise ValueError(f"tile sizes must be positive: {self}")
        if self.rows > self.vector * self.score_vectors:
            raise ValueError(f"{self.rows} rows do not fit a tile of {self.vector * self.score_vectors} keys")
        if d_model % self.d_chunks or (d_model // self.d_chunks) % (self.vector * self.value_vectors):
            raise ValueError(f"{self} does not divide d_model {d_model}")


def feedback_prefill_kernel(d_model: int, dtype: str = "float32", scale: float | None = None,
                            tiling: PrefillTiling = PrefillTiling(), cache_dtype: str | None = None) -> tirx.PrimFunc:
    """The PrimFunc, named ``tvm_kernels.PREFILL`` (symbolic batch, seq_len and capacity)."""
    cache_dtype = cache_dtype or dtype
    if dtype not in DTYPES or cache_dtype not in CACHE_DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES} and cache_dtype one of {CACHE_DTYPES}, "
                         f"got {dtype!r}, {cache_dtype!r}")
    tiling.check(d_model)
    scale = d_model**-0.5 if scale is None else float(scale)
    D, R, V, NC = d_model, tiling.rows, tiling.vector, tiling.d_chunks
    KT = V * tiling.score_vectors  # keys a tile
    SV, VC = tiling.score_vectors, tiling.value_vectors
    DC = D // NC  # columns a task
    PASS = V * VC  # columns an update pass
    f32 = "float32"
    exp = fastmath.exp

    def blocks(past_len, seq_len):
        """Blocks of key_t: block q holds columns [q KT, q KT + 2 KT); column KT + j is position j,
        and the columns cover [0, P + S) rounded up to a tile, with a tile each side."""
        return T.ceildiv(past_len + seq_len, KT) + 1

    row_sum, row_max = fastmath.row_sum, fastmath.row_max

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
        # 1. append the new keys, then every key transposed: position j in column KT + j, so that a
        # block's first tile, which may start below 0, and its diagonal tile read zeros outside
        # (zeros, then the positions a block holds: a Select would have loaded outside the cache,
        # TVM simplifies its load under its condition and, vectorised, runs it for every lane)
        for bi in T.parallel(batch * seq_len):
            for d in T.vectorized(D):
                key_cache[bi // seq_len, past_len + bi % seq_len, d] = T.Cast(cache_dtype, key[bi // seq_len, bi % seq_len, d])
        key_t = T.alloc_buffer((batch, blocks(past_len, seq_len), D, 2 * KT), f32)
        for bq in T.parallel(batch * blocks(past_len, seq_len)):
            b, q = bq // blocks(past_len, seq_len), bq % blocks(past_len, seq_len)
            first = T.max(0, KT - q * KT)  # the block's first column holding a position
            for d in range(D):
                for col in T.vectorized(2 * KT):
                    key_t[b, q, d, col] = T.float32(0)
            for col in range(first, T.min(2 * KT, past_len + seq_len + KT - q * KT)):
                for d in range(D):
                    key_t[b, q, d, col] = T.Cast(f32, key_cache[b, q * KT + col - KT, d])
        # 2. one task per (batch row, D chunk), its row blocks in order
        for task in T.parallel(batch * NC):
            b = task // NC
            c0 = task % NC * DC  # first column of the task's chunk
            qr = T.alloc_buffer((R, D), f32)
            acc = T.alloc_buffer((R, DC), f32)
            score = T.alloc_buffer((R, KT), f32)
            stat = T.alloc_buffer((R, 3), f32)  # running max, running sum, this tile's rescale
            for r in range(T.ceildiv(seq_len, R)):
                base = past_len + r * R  # position of the block's first row
                tiles = T.ceildiv(base, KT)  # past tiles, aligned to end at base
                for ri in range(R):
                    if r * R + ri < seq_len:
                        for d in T.vectorized(D):
                            qr[ri, d] = T.Cast(f32, query[b, r * R + ri, d])
                    else:  # a row past the end of the last block: computed on zeros, never written
                        for d in T.vectorized(D):
                            qr[ri, d] = T.float32(0)
                    for d in T.vectorized(DC):
                        acc[ri, d] = T.float32(0)
                    stat[ri, 0] = T.float32(_NEG)
                    stat[ri, 1] = T.float32(0)
                for kt in range(tiles + 1):  # the last is the diagonal tile, keys [base, base + KT)
                    j0 = base - (tiles - kt) * KT
                    for ri in T.unroll(R):
                        for sv in T.unroll(SV):
                            for lane in T.vectorized(V):
                                score[ri, sv * V + lane] = T.float32(0)
                    for d in range(D):
                        for ri in T.unroll(R):
                            for sv in T.unroll(SV):
                                for lane in T.vectorized(V):
                                    score[ri, sv * V + lane] = score[ri, sv * V + lane] + qr[ri, d] * key_t[
                                        b, (KT + j0) // KT, d, (KT + j0) % KT + sv * V + lane]
                    for ri in range(R):  # online softmax over keys 0 <= j < t = base + ri
                        for jj in T.vectorized(KT):
                            score[ri, jj] = T.Select(T.And(0 <= j0 + jj, j0 + jj < base + ri),
                                                     score[ri, jj] * T.float32(scale), T.float32(_NEG))
                        new_max: T.float32 = T.max(stat[ri, 0], row_max(score, ri, KT))
                        stat[ri, 2] = exp(stat[ri, 0] - new_max)
                        for jj in T.vectorized(KT):
                            score[ri, jj] = T.Select(T.And(0 <= j0 + jj, j0 + jj < base + ri),
                                                     exp(score[ri, jj] - new_max), T.float32(0))
                        stat[ri, 1] = stat[ri, 1] * stat[ri, 2] + row_sum(score, ri, KT)
                        stat[ri, 0] = new_max
                    # acc = acc * rescale + prob @ state over the solved keys (past tiles only), a
                    # pass of PASS columns at a time
                    for cp in range(DC // PASS):
                        for ri in T.unroll(R):
                            for cv in T.unroll(VC):
                                for lane in T.vectorized(V):
                                    acc[ri, cp * PASS + cv * V + lane] = acc[ri, cp * PASS + cv * V + lane] * stat[ri, 2]
                        if kt < tiles:
                            for jn in range(KT - T.max(0, -j0)):  # keys from max(0, j0) to the tile's end
                                for ri in T.unroll(R):
                                    for cv in T.unroll(VC):
                                        for lane in T.vectorized(V):
                                            acc[ri, cp * PASS + cv * V + lane] = acc[ri, cp * PASS + cv * V + lane] + score[
                                                ri, jn + T.max(0, -j0)] * T.Cast(f32, state_cache[
                                                    b, j0 + jn + T.max(0, -j0), c0 + cp * PASS + cv * V + lane])
                # forward substitution: row ri adds its diagonal-tile keys base .. base + ri - 1,
                # solved just before it, then is solved and stored
                for ri in range(R):
                    if r * R + ri < seq_len:
                        for jj in range(ri):
                            for d in T.vectorized(DC):
                                acc[ri, d] = acc[ri, d] + score[ri, jj] * T.Cast(f32, state_cache[b, base + jj, c0 + d])
                        for d in T.vectorized(DC):
                            state[b, r * R + ri, c0 + d] = T.Cast(dtype, T.Cast(f32, forward[b, r * R + ri, c0 + d])
                                                                  + T.Cast(f32, gain[b, r * R + ri, 0]) * T.Select(
                                                                      stat[ri, 1] > T.float32(0), acc[ri, d] / stat[ri, 1], T.float32(0)))
                        for d in T.vectorized(DC):
                            state_cache[b, base + ri, c0 + d] = T.Cast(cache_dtype, state[b, r * R + ri, c0 + d])

    return kernel.with_attr("global_symbol", PREFILL)
