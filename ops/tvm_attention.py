"""TVM kernel for the forward attention of a Sessa mixer (spec §1 step 2), with its KV-cache append.

For S new positions t = P + i, given q [B, S, H·d], k and v [B, S, Hkv·d] (before RoPE) and
caches that already hold the P earlier positions::

    key_cache[:, hk, P + i]   = rope(k[:, i, hk], t)          (interleaved pairs, θ = t·inv_freq)
    value_cache[:, hk, P + i] = v[:, i, hk]
    out[:, i, h]              = Σ_{j ≤ t} softmax_j(rope(q_h, t) · key_cache[:, h // G, j] / √d) · value_cache[:, h // G, j]

with G = H / Hkv (grouped-query attention). θ is computed in float32 and cast to the activation
dtype before cos/sin, as the reference does; scores, the softmax and the weighted sum are float32.
The caches are written in place: from Relax the kernel is called with ``R.call_tir_inplace``::

    key_cache, value_cache, out = R.call_tir_inplace(
        gv, (q, k, v, inv_freq, key_cache, value_cache, R.prim_value(P)),
        inplace_indices=[4, 5, -1], out_ty=[kc_type, vc_type, out_type])

Two loop nests: the append (one pass over the new rows; on CPU it also tabulates the cos and sin
of each new position's angles, which every head's rotation then reads), then one task per (batch, row, head)
that runs an online softmax (running max / running sum) over its j ≤ t keys, a tile of keys
at a time: the tile's scores first (independent dot products), then one rescale of the
accumulator per tile and one exp per key. On CPU a decode step (S = 1) takes one row per (batch,
head), its d-wide dot products and updates written with explicit vector lanes so LLVM emits SIMD
without fast-math; a prefill task takes ``rows`` rows of one head and a plain (not online)
softmax: all its scores first, a ``score_rows`` x keys register tile at a time vectorised over the keys
(read from the keys transposed once a call, so that no product ends in a lane sum), then one max,
one exp per key and one sum per row, then probs @ values in passes of ``value_rows`` rows x
``value_vectors`` vectors of columns. The tasks
are spread over threads (``T.parallel``); on GPU targets each task is a thread. The kernel is
"scheduled" as written: it carries ``tirx.is_scheduled`` so dlight leaves it.

The kernel checks ``P + S <= capacity`` before writing anything and fails with a message that
says so (host-side assert, also on GPU targets): a context past the compiled capacity never
writes out of bounds.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import tvm
from tvm import tirx
from tvm.script import tirx as T

from . import tvm_fastmath as fastmath
from .tvm_prefetch import LINE_BYTES, prefetch

NAME = "forward_attention"
DTYPES = ("float32", "float16")
CACHE_DTYPES = ("float32", "float16", "bfloat16")
CAPACITY_MESSAGE = "sessa: context exceeds the compiled capacity (past + new > capacity)"
_NEG = -3.4028234663852886e38  # float32 lowest: the running max before any key


def inplace_indices() -> list[int]:
    """Outputs of the kernel's call: key_cache (arg 4), value_cache (arg 5), a new `out`."""
    return [4, 5, -1]


@dataclass(frozen=True)
class AttentionTiling:
    """How the kernel spreads its work; each target picks its own (``targets.*.attention_tiling``).

    ``threads`` None: tasks are parallel CPU loops, vectorised ``lanes`` wide, the scratch in
    memory and the exp of ops/tvm_fastmath.py; else every task is one GPU thread, ``threads`` to
    a block, the scratch in registers, the device's exp.
    """

    lanes: int = 1  # vector lanes of the d-wide products and updates (decode and GPU); divides head_dim
    key_tile: int = 16  # keys per online-softmax step (decode and GPU)
    decode_keys: int = 16  # CPU decode: keys whose dot products run interleaved (its gcd with key_tile)
    prefetch_tiles: int = 0  # CPU decode: how many tiles ahead the keys and values are prefetched (0: none)
    rows: int = 4  # CPU prefill: query rows of one head per task, sharing each key tile and value row
    vector: int = 8  # CPU prefill: SIMD lanes, over keys in the scores and over columns in the update
    score_rows: int = 4  # CPU prefill: rows of a score pass (score_rows x score_vectors accumulators)
    score_vectors: int = 2  # CPU prefill: vectors of keys in a score tile
    value_rows: int = 4  # CPU prefill: rows of a value-update pass (value_rows x value_vectors accumulators)
    value_vectors: int = 4  # CPU prefill: vectors of columns a value-update pass
    threads: int | None = None  # GPU threads per block


@functools.lru_cache(maxsize=None)  # PrimFuncs are immutable: parse the TVMScript once a process
def forward_attention_kernel(n_heads: int, n_kv_heads: int, head_dim: int, rope: bool,
                             dtype: str = "float32", tiling: AttentionTiling = AttentionTiling(),
                             cache_dtype: str | None = None) -> tirx.PrimFunc:
    """The append + attention PrimFunc for one head layout (symbolic batch, seq_len, capacity).

    Signature: ``(q, k, v, inv_freq, key_cache, value_cache, past_len: int64, out)`` with
    ``inv_freq [max(1, d/2)]`` float32 (ignored when ``rope`` is false). The caches are stored in
    ``cache_dtype`` (default ``dtype``; compile --state-dtype): rows are rounded to it when written
    and read back as float32.
    """
    cache_dtype = cache_dtype or dtype
    if dtype not in DTYPES or cache_dtype not in CACHE_DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES} and cache_dtype one of {CACHE_DTYPES}, "
                         f"got {dtype!r}, {cache_dtype!r}")
    if n_heads % n_kv_heads:
        raise ValueError(f"n_heads {n_heads} is not a multiple of n_kv_heads {n_kv_heads}")
    if rope and head_dim % 2:
        raise ValueError(f"RoPE needs an even head width, got {head_dim}")
    H, Hkv, d = n_heads, n_kv_heads, head_dim
    G = H // Hkv
    half = max(1, d // 2)
    scale = float(d) ** -0.5
    gpu = tiling.threads is not None
    lanes, tile = tiling.lanes, tiling.key_tile
    if d % lanes:
        raise ValueError(f"{lanes} lanes do not divide the head width {d}")
    R, V = tiling.rows, tiling.vector  # CPU prefill: a task's rows, SIMD lanes
    RS, RV, VC = tiling.score_rows, tiling.value_rows, tiling.value_vectors  # and its register tiles
    KT = V * tiling.score_vectors  # CPU prefill: keys per score tile
    if not gpu and (d % (V * VC) or R % RS or R % RV):
        raise ValueError(f"{VC} vectors of {V} lanes do not divide the head width {d}, or {RS} score rows or {RV} "
                         f"value rows not the {R} of a block")
    KG = math.gcd(tiling.decode_keys, tile)  # CPU decode: keys a group, a divisor of the tile
    ahead = tiling.prefetch_tiles
    line = LINE_BYTES * 8 // tvm.DataType(cache_dtype).bits  # cache elements a prefetched line
    chunks = d // lanes
    exp = T.exp if gpu else fastmath.exp  # CPU: an exp that vectorises (ops/tvm_fastmath.py)
    f32 = "float32"
    scope = "local" if gpu else "global"
    threads = tiling.threads

    def angle(position, inv):
        """θ = position · inv_freq[p], rounded to the activation dtype as the reference does."""
        return T.Cast(dtype, T.Cast(f32, position) * inv)

    def rotate(x_even, x_odd, c, s):
        """(x'[2i], x'[2i+1]) of a pair turned by the angle whose cosine and sine are c, s."""
        return x_even * c - x_odd * s, x_even * s + x_odd * c

    row_sum, row_max = fastmath.row_sum, fastmath.row_max

    @T.macro
    def row_task(task, q, inv_freq, key_cache, value_cache, past_len, out, batch, seq_len):
        """Online softmax over keys j <= t for query row (b, i, h) = task, `tile` keys at a time."""
        b = task // (seq_len * H)
        k = task % (seq_len * H) // H
        # rows alternate from both ends (0, S-1, 1, S-2, ...): row t has t + 1 keys, so every
        # contiguous chunk of tasks (what a CPU thread gets) has about the same work
        i = T.if_then_else(k % 2 == 0, k // 2, seq_len - 1 - k // 2)
        h = task % H
        qr = T.alloc_buffer((d,), f32, scope=scope)
        acc = T.alloc_buffer((d,), f32, scope=scope)
        part = T.alloc_buffer((tile, lanes), f32, scope=scope)
        score = T.alloc_buffer((tile,), f32, scope=scope)
        stat = T.alloc_buffer((2,), f32, scope=scope)  # running max, running sum
        if rope:
            for p in range(d // 2):
                theta = angle(past_len + i, inv_freq[p])
                even, odd = rotate(q[b, i, h * d + 2 * p], q[b, i, h * d + 2 * p + 1], T.cos(theta), T.sin(theta))
                qr[2 * p] = T.Cast(f32, even)
                qr[2 * p + 1] = T.Cast(f32, odd)
        else:
            for dd in range(d):
                qr[dd] = T.Cast(f32, q[b, i, h * d + dd])
        for dd in range(d):
            acc[dd] = T.float32(0)
        stat[0] = T.float32(_NEG)
        stat[1] = T.float32(0)
        for jt in range(T.ceildiv(past_len + i + 1, tile)):
            # scores of the tile (independent keys: their dot products overlap)
            for jj in range(tile):
                if jt * tile + jj <= past_len + i:
                    for lane in T.vectorized(lanes):
                        part[jj, lane] = T.float32(0)
                    for c in range(chunks):
                        for lane in T.vectorized(lanes):
                            part[jj, lane] = part[jj, lane] + qr[c * lanes + lane] * T.Cast(
                                f32, key_cache[b, h // G, jt * tile + jj, c * lanes + lane])
                    score[jj] = row_sum(part, jj, lanes) * T.float32(scale)
                else:
                    score[jj] = T.float32(_NEG)
            # one rescale per tile, one exp per key
            new_max: T.float32 = stat[0]
            for jj in range(tile):
                new_max = T.max(new_max, score[jj])
            rescale: T.float32 = exp(stat[0] - new_max)
            stat[1] = stat[1] * rescale
            for c in range(chunks):
                for lane in T.vectorized(lanes):
                    acc[c * lanes + lane] = acc[c * lanes + lane] * rescale
            for jj in range(tile):
                if jt * tile + jj <= past_len + i:
                    weight: T.float32 = exp(score[jj] - new_max)
                    stat[1] = stat[1] + weight
                    for c in range(chunks):
                        for lane in T.vectorized(lanes):
                            acc[c * lanes + lane] = acc[c * lanes + lane] + weight * T.Cast(
                                f32, value_cache[b, h // G, jt * tile + jj, c * lanes + lane])
            stat[0] = new_max
        for dd in range(d):
            out[b, i, h * d + dd] = T.Cast(dtype, acc[dd] / stat[1])

    @T.macro
    def decode_task(task, q, turn, key_cache, value_cache, past_len, out):
        """CPU decode: row_task's online softmax for the one new row of (b, h) = task, with the
        dot products of KG keys interleaved (a step of the d loop feeds KG independent
        accumulators, not one key's chain of d / lanes dependent multiply-adds), the tile's exps as
        one vector, and the value update's chains over the columns."""
        b = task // H
        h = task % H
        qr = T.alloc_buffer((d,), f32)
        acc = T.alloc_buffer((d,), f32)
        part = T.alloc_buffer((KG, lanes), f32)
        score = T.alloc_buffer((1, tile), f32)
        stat = T.alloc_buffer((2,), f32)  # running max, running sum
        if rope:
            for p in range(d // 2):
                even, odd = rotate(q[b, 0, h * d + 2 * p], q[b, 0, h * d + 2 * p + 1], turn[0, p, 0], turn[0, p, 1])
                qr[2 * p] = T.Cast(f32, even)
                qr[2 * p + 1] = T.Cast(f32, odd)
        else:
            for dd in range(d):
                qr[dd] = T.Cast(f32, q[b, 0, h * d + dd])
        for dd in T.vectorized(d):
            acc[dd] = T.float32(0)
        stat[0] = T.float32(_NEG)
        stat[1] = T.float32(0)
        for jt in range(T.ceildiv(past_len + 1, tile)):
            if ahead > 0:  # the tile `ahead` tiles on, while this one is read (rows past P: row P)
                for ln in range(T.ceildiv(tile * d, line)):
                    T.evaluate(prefetch(T.address_of(key_cache[
                        b, h // G, T.min((jt + ahead) * tile + ln * line // d, past_len), ln * line % d])))
                    T.evaluate(prefetch(T.address_of(value_cache[
                        b, h // G, T.min((jt + ahead) * tile + ln * line // d, past_len), ln * line % d])))
            for g in range(tile // KG):
                for jj in T.unroll(KG):
                    for lane in T.vectorized(lanes):
                        part[jj, lane] = T.float32(0)
                for c in range(chunks):
                    for jj in T.unroll(KG):  # keys past past_len read row past_len (written above), masked below
                        for lane in T.vectorized(lanes):
                            part[jj, lane] = part[jj, lane] + qr[c * lanes + lane] * T.Cast(
                                f32, key_cache[b, h // G, T.min(jt * tile + g * KG + jj, past_len), c * lanes + lane])
                for jj in T.unroll(KG):
                    score[0, g * KG + jj] = T.Select(jt * tile + g * KG + jj <= past_len,
                                                     row_sum(part, jj, lanes) * T.float32(scale), T.float32(_NEG))
            new_max: T.float32 = T.max(stat[0], row_max(score, 0, tile))
            rescale: T.float32 = exp(stat[0] - new_max)
            for jj in T.vectorized(tile):
                score[0, jj] = T.Select(jt * tile + jj <= past_len, exp(score[0, jj] - new_max), T.float32(0))
            stat[1] = stat[1] * rescale + row_sum(score, 0, tile)
            for dd in T.vectorized(d):
                acc[dd] = acc[dd] * rescale
            for jj in range(T.min(tile, past_len + 1 - jt * tile)):
                for c in T.unroll(chunks):
                    for lane in T.vectorized(lanes):
                        acc[c * lanes + lane] = acc[c * lanes + lane] + score[0, jj] * T.Cast(
                            f32, value_cache[b, h // G, jt * tile + jj, c * lanes + lane])
            stat[0] = new_max
        for dd in T.vectorized(d):
            out[b, 0, h * d + dd] = T.Cast(dtype, acc[dd] / stat[1])

    @T.macro
    def block_task(task, q, turn, key_t, value_cache, past_len, out, batch, seq_len):
        """CPU prefill: rows R*rb .. R*rb+R-1 of head h (task = (b, rb, h)), register-tiled.

        Scores are score_rows x keys tiles vectorised over the keys, a pass of rows at a time over
        each tile of keys (so the tile, from the L2, serves all R rows; ``key_t`` holds the keys
        transposed a tile at a time, [tile, d, KT]: the tile streams from one contiguous block, where
        rows of all positions put every step of dd a page apart, past the reach of Intel's stride
        prefetcher), so no product ends in a lane sum. They are kept for the whole row (``probs``, at
        most R x (P + S)), so the softmax takes one max and one sum a row where the online form took
        a horizontal max, a sum and an accumulator rescale a tile (16.4 -> 13.0 ms at T = 1024 on an
        AVX-512 Xeon, 2 threads). The value update takes value_rows x value_vectors tiles: with
        AVX-512, 4 rows x the head's 4 vectors loaded 4 values and 4 probabilities for 16
        multiply-adds, where 16 rows x 1 vector loaded 17 (8.7 against 10.2 ms, same shapes).
        """
        blocks = T.ceildiv(seq_len, R)
        b = task // (blocks * H)
        k = task % (blocks * H) // H
        rb = T.if_then_else(k % 2 == 0, k // 2, blocks - 1 - k // 2)  # balanced chunks, see row_task
        h = task % H
        last = T.min(R * rb + R, seq_len) - 1  # last row of the block
        qr = T.alloc_buffer((R, d), f32)
        acc = T.alloc_buffer((R, d), f32)
        score = T.alloc_buffer((RS, KT), f32)
        peak = T.alloc_buffer((R, KT), f32)  # largest score so far, per lane
        total = T.alloc_buffer((R, KT), f32)  # sum of the exps, per lane
        row_total = T.alloc_buffer((R,), f32)  # the row's sum of exps
        for r in range(R):
            if R * rb + r <= last:
                if rope:
                    for p in range(d // 2):
                        even, odd = rotate(q[b, R * rb + r, h * d + 2 * p], q[b, R * rb + r, h * d + 2 * p + 1],
                                           turn[R * rb + r, p, 0], turn[R * rb + r, p, 1])
                        qr[r, 2 * p] = T.Cast(f32, even)
                        qr[r, 2 * p + 1] = T.Cast(f32, odd)
                else:
                    for dd in range(d):
                        qr[r, dd] = T.Cast(f32, q[b, R * rb + r, h * d + dd])
            else:  # a row past the end of the last block: computed on zeros, never written out
                for dd in range(d):
                    qr[r, dd] = T.float32(0)
        # 1. the block's scores, every key of the rows' past, and each row's largest (per lane)
        # key tile by key tile ([tile, row, KT]): the value update's R broadcasts of one key lie at fixed
        # offsets from one pointer (rows at a run-time stride had LLVM add the stride before each)
        probs = T.alloc_buffer((T.ceildiv(past_len + seq_len, KT), R, KT), f32)  # (the widest block)
        for r in T.unroll(R):
            for jj in T.vectorized(KT):
                peak[r, jj] = T.float32(_NEG)
                total[r, jj] = T.float32(0)
        for jt in range(T.ceildiv(past_len + last + 1, KT)):
            for rg in range(R // RS):
                if R * rb + rg * RS <= last:  # (a pass of rows all past the last is skipped, here and below)
                    # RS rows x KT keys: each step of dd broadcasts RS query values against KT keys
                    for r in T.unroll(RS):
                        for kv in T.unroll(KT // V):
                            for lane in T.vectorized(V):
                                score[r, kv * V + lane] = T.float32(0)
                    for dd in range(d):
                        for r in T.unroll(RS):
                            for kv in T.unroll(KT // V):
                                for lane in T.vectorized(V):
                                    score[r, kv * V + lane] = score[r, kv * V + lane] + qr[rg * RS + r, dd] * key_t[
                                        b, h // G, jt, dd, kv * V + lane]
                    for r in range(RS):
                        for jj in T.vectorized(KT):
                            probs[jt, rg * RS + r, jj] = T.Select(jt * KT + jj <= past_len + R * rb + rg * RS + r,
                                                                  score[r, jj] * T.float32(scale), T.float32(_NEG))
                            peak[rg * RS + r, jj] = T.max(peak[rg * RS + r, jj], probs[jt, rg * RS + r, jj])
        # 2. exp(score - max) over the row and the sum: one max and one sum per row, no rescaling
        for r in range(T.min(R, last + 1 - R * rb)):
            row_peak: T.float32 = row_max(peak, r, KT)
            for jt in range(T.ceildiv(past_len + last + 1, KT)):
                for jj in T.vectorized(KT):
                    probs[jt, r, jj] = T.Select(jt * KT + jj <= past_len + R * rb + r,
                                                exp(probs[jt, r, jj] - row_peak), T.float32(0))
                    total[r, jj] = total[r, jj] + probs[jt, r, jj]
            row_total[r] = row_sum(total, r, KT)
        # 3. probs @ values, a pass for every RV rows x VC vectors of columns (the accumulators fit in
        # registers; each step of j loads VC values and RV probabilities for RV x VC multiply-adds)
        for rg, cp in T.grid(T.ceildiv(last + 1 - R * rb, RV), d // V // VC):
            for r in T.unroll(RV):
                for c in T.unroll(VC):
                    for lane in T.vectorized(V):
                        acc[rg * RV + r, (cp * VC + c) * V + lane] = T.float32(0)
            for j in range(past_len + last + 1):
                for r in T.unroll(RV):
                    for c in T.unroll(VC):
                        for lane in T.vectorized(V):
                            acc[rg * RV + r, (cp * VC + c) * V + lane] = acc[rg * RV + r, (cp * VC + c) * V + lane] + probs[
                                j // KT, rg * RV + r, j % KT] * T.Cast(f32, value_cache[b, h // G, j, (cp * VC + c) * V + lane])
        for r in T.unroll(R):
            if R * rb + r <= last:
                for c in T.unroll(d // V):
                    for lane in T.vectorized(V):
                        out[b, R * rb + r, h * d + c * V + lane] = T.Cast(dtype, acc[r, c * V + lane] / row_total[r])

    @T.prim_func
    def kernel(q_h: T.handle, k_h: T.handle, v_h: T.handle, inv_freq_h: T.handle,
               key_cache_h: T.handle, value_cache_h: T.handle, past_len: T.int64, out_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        batch = T.int64()
        seq_len = T.int64()
        capacity = T.int64()
        q = T.match_buffer(q_h, (batch, seq_len, H * d), dtype)
        k = T.match_buffer(k_h, (batch, seq_len, Hkv * d), dtype)
        v = T.match_buffer(v_h, (batch, seq_len, Hkv * d), dtype)
        inv_freq = T.match_buffer(inv_freq_h, (half,), f32)
        key_cache = T.match_buffer(key_cache_h, (batch, Hkv, capacity, d), cache_dtype)
        value_cache = T.match_buffer(value_cache_h, (batch, Hkv, capacity, d), cache_dtype)
        out = T.match_buffer(out_h, (batch, seq_len, H * d), dtype)
        assert past_len + seq_len <= capacity, CAPACITY_MESSAGE
        if gpu:  # 1. append the new keys (rotated) and values to the caches
            for bx in T.thread_binding(T.ceildiv(batch * seq_len * Hkv, threads), thread="blockIdx.x"):
                for tx in T.thread_binding(threads, thread="threadIdx.x"):
                    if bx * threads + tx < batch * seq_len * Hkv:
                        b = (bx * threads + tx) // (seq_len * Hkv)
                        i = (bx * threads + tx) % (seq_len * Hkv) // Hkv
                        hk = (bx * threads + tx) % Hkv
                        if rope:
                            for p in range(d // 2):
                                theta = angle(past_len + i, inv_freq[p])
                                even, odd = rotate(k[b, i, hk * d + 2 * p], k[b, i, hk * d + 2 * p + 1],
                                                   T.cos(theta), T.sin(theta))
                                key_cache[b, hk, past_len + i, 2 * p] = T.Cast(cache_dtype, even)
                                key_cache[b, hk, past_len + i, 2 * p + 1] = T.Cast(cache_dtype, odd)
                        else:
                            for dd in range(d):
                                key_cache[b, hk, past_len + i, dd] = T.Cast(cache_dtype, k[b, i, hk * d + dd])
                        for dd in range(d):
                            value_cache[b, hk, past_len + i, dd] = T.Cast(cache_dtype, v[b, i, hk * d + dd])
            # 2. one online-softmax task per (batch, row, head)
            for bx in T.thread_binding(T.ceildiv(batch * seq_len * H, threads), thread="blockIdx.x"):
                for tx in T.thread_binding(threads, thread="threadIdx.x"):
                    if bx * threads + tx < batch * seq_len * H:
                        row_task(bx * threads + tx, q, inv_freq, key_cache, value_cache, past_len, out, batch, seq_len)
        else:
            # cos and sin of each new position's angles, once for every batch row and head
            turn = T.alloc_buffer((seq_len if rope else 1, half, 2), dtype)
            for i in T.parallel(seq_len):
                if rope:
                    for p in range(d // 2):
                        turn[i, p, 0] = T.cos(angle(past_len + i, inv_freq[p]))
                        turn[i, p, 1] = T.sin(angle(past_len + i, inv_freq[p]))
                for b, hk in T.grid(batch, Hkv):
                    if rope:
                        for p in range(d // 2):
                            even, odd = rotate(k[b, i, hk * d + 2 * p], k[b, i, hk * d + 2 * p + 1],
                                               turn[i, p, 0], turn[i, p, 1])
                            key_cache[b, hk, past_len + i, 2 * p] = T.Cast(cache_dtype, even)
                            key_cache[b, hk, past_len + i, 2 * p + 1] = T.Cast(cache_dtype, odd)
                    else:
                        for dd in T.vectorized(d):
                            key_cache[b, hk, past_len + i, dd] = T.Cast(cache_dtype, k[b, i, hk * d + dd])
                    for dd in T.vectorized(d):
                        value_cache[b, hk, past_len + i, dd] = T.Cast(cache_dtype, v[b, i, hk * d + dd])
            # 2. one task per (batch, head) in a decode; in a prefill, per (batch, block of rows, head)
            if seq_len == 1:  # decode: a block of R rows would compute R - 1 rows of padding
                for task in T.parallel(batch * H):
                    decode_task(task, q, turn, key_cache, value_cache, past_len, out)
            else:
                # the keys transposed a tile at a time ([tile, d, KT], float32, zero past the last)
                key_t = T.alloc_buffer((batch, Hkv, T.ceildiv(past_len + seq_len, KT), d, KT), f32)
                for bh in T.parallel(batch * Hkv):
                    for jt, dd in T.grid(T.ceildiv(past_len + seq_len, KT), d):
                        for jj in T.vectorized(KT):
                            key_t[bh // Hkv, bh % Hkv, jt, dd, jj] = T.Select(
                                jt * KT + jj < past_len + seq_len,
                                T.Cast(f32, key_cache[bh // Hkv, bh % Hkv, T.min(jt * KT + jj, past_len + seq_len - 1), dd]),
                                T.float32(0))
                for task in T.parallel(batch * T.ceildiv(seq_len, R) * H):
                    block_task(task, q, turn, key_t, value_cache, past_len, out, batch, seq_len)

    return kernel.with_attr("global_symbol", NAME)
