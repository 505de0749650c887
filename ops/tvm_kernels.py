"""TVM kernels for ``ai.sessa.FeedbackAttention`` (spec §1 steps 3-5, §4).

For S new rows at absolute positions t = P + i, with P rows already in the caches::

    alpha_{t,j} = softmax_{j<t}(scale * query_t . feedback_key_j)
    s_t         = forward_t + gain_t * sum_{j<t} alpha_{t,j} * feedback_state_j

``feedback_key_j`` / ``feedback_state_j`` come from ``key_cache`` / ``state_cache`` for j < P
and from the new rows for P <= j < t. Both kernels write the new rows into the caches in place
(``key_cache[:, P:P+S] = key``, ``state_cache[:, P:P+S] = s``) and return ``state`` (the new s
rows). Scores, softmax statistics and sums are float32 for every input dtype; a state is stored
in the input dtype as soon as it is solved, and later rows read it back from ``state_cache``.

Algorithm (one code path for both kernels). The S rows are solved in blocks of ``block_rows``.
A block runs an online (running max / running sum) softmax over every earlier position,
``key_tile`` keys at a time, and accumulates ``prob @ feedback_state`` for the positions that are
already solved: the past cache rows and the previous blocks, whose states are in
``state_cache`` by then. The block's last key tile is its own diagonal tile: it only completes
the softmax statistics, then the rows of the block are solved in order (forward substitution)
with those probabilities. Work is O(S * (P + S) * D); scratch is a few ``block_rows x key_tile``
tiles, a ``key_tile x key_cols`` key tile and a ``block_rows x D`` float32 accumulator per task.
The key tile is staged (copied into a task buffer that the block's rows share: GPU shared memory)
unless the tiling says ``stage_keys=False``; then the products read the cache itself (a CPU decode,
where the copy cost more than it saved).
Decode (S = 1) is the same code with one row per block and no diagonal tile: a single pass over
the P cached rows.

Parallel structure. A task is one (batch row, D chunk) pair: D can be cut into ``d_chunks``
slices that are solved independently (each task recomputes the full-width scores and owns its
slice of the state), which buys parallelism for small batches at the price of repeating the
q.k products per chunk. Inside a task, ``workers`` cooperate SPMD-style: every stage deals its
items (key tile elements, (row, key) pairs, rows, state columns) round-robin to the workers,
and stages communicate only through the task's tile buffers. Decode can also cut the P keys into
``key_splits`` slices, one task each (split-K, as flash-decoding does): a task keeps its slice's
softmax statistics and weighted sum, and a last pass merges them (``merge_weights``, ``merge``),
so a single row's pass over the caches runs on every core. A worker owns fixed columns of
the state, so its accumulator and the state rows it reads back are its own. A CPU runs one
worker per task; a GPU runs a thread block per task and a thread per worker, the tiles in
shared memory (TVM inserts the barriers between stages).

The PrimFuncs are S-TIR with named (opaque) blocks and no schedule;
each target in ``sessa_export/targets/`` picks the tile sizes (``feedback_tilings``) and
schedules them (``schedule_feedback_attention``); ``targets.scheduled_kernels`` finds the rule.
CPU builds take only the decode from here: their prefill is ops/tvm_feedback_prefill.py's
register-tiled loop nest of the same algorithm (the CPU rule still schedules this prefill, which
the tests run on the CPU as the GPUs tile it).

Calling convention, shared by both kernels (``batch``, ``seq_len`` and ``capacity`` symbolic;
``seq_len`` is 1 for decode)::

    kernel(query, key, forward, gain, key_cache, state_cache, past_len, state)

query/key/forward/state ``[batch, seq_len, D]``, gain ``[batch, seq_len, 1]``, caches
``[batch, capacity, D]``, ``past_len`` an int64 scalar with 0 <= P and P + seq_len <= capacity
(not checked at run time). ``state`` is the only output; the caches are updated in place. From
Relax, call it with ``R.call_tir_inplace``: its arguments fill the leading parameters, the
freshly allocated outputs (``inplace_indices`` -1) are appended after them::

    key_cache, state_cache, state = R.call_tir_inplace(
        cls.feedback_attention_prefill,
        (query, key, forward, gain, key_cache, state_cache, R.prim_value(past_len)),
        inplace_indices=[4, 5, -1],
        out_ty=[R.Tensor((b, c, D), dtype), R.Tensor((b, c, D), dtype), R.Tensor((b, s, D), dtype)],
    )
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass

import tvm
from tvm import tirx
from tvm.script import tirx as T

from .tvm_fastmath import row_sum as lane_sum, tree_sum

DECODE = "feedback_attention_decode"
PREFILL = "feedback_attention_prefill"
DTYPES = ("float32", "float16")
CACHE_DTYPES = ("float32", "float16", "bfloat16")

_LOWEST = -3.4028234663852886e38  # running max before any key: exp(_LOWEST - m) is 0, not NaN


@dataclass(frozen=True)
class FeedbackTiling:
    """Tile sizes of one kernel; each target picks its own (``targets.*.feedback_tilings``)."""

    block_rows: int = 16  # rows solved together; must be 1 for decode
    key_tile: int = 32  # keys per online-softmax step; >= block_rows (the diagonal tile)
    key_cols: int | None = None  # columns of the key tile staged at once; None: all of D
    dot_lanes: int = 1  # interleaved partial sums per q.k product (SIMD lanes); divides key_cols
    d_chunks: int = 1  # independent slices of D, one task each; divides D
    workers: int = 1  # cooperating workers per task (GPU threads per block)
    key_splits: int = 1  # decode: slices of the keys, one task each, merged by a last pass (split-K)
    stage_keys: bool = True  # copy each key tile into a task buffer (GPU shared memory); False: read key_cache

    def columns(self, d_model: int) -> int:
        """Key tile width for this model width."""
        return d_model if self.key_cols is None else self.key_cols

    def check(self, d_model: int, decode: bool) -> None:
        """Raise ValueError for tile sizes the kernel cannot use."""
        cols = self.columns(d_model)
        sizes = (self.block_rows, self.key_tile, cols, self.dot_lanes, self.d_chunks, self.workers, self.key_splits)
        if min(sizes) < 1:
            raise ValueError(f"tile sizes must be positive: {self}")
        if decode and self.block_rows != 1:
            raise ValueError(f"decode solves one row: block_rows must be 1, got {self.block_rows}")
        if self.key_splits > 1 and not (decode and self.workers == 1):
            raise ValueError(f"key_splits > 1 is for decode with one worker a task: {self}")
        if self.key_tile < self.block_rows:
            raise ValueError(f"key_tile {self.key_tile} < block_rows {self.block_rows}")
        if d_model % cols or cols % self.dot_lanes or d_model % self.d_chunks:
            raise ValueError(f"{self} does not divide d_model {d_model}")


DEFAULT_TILINGS: Mapping[str, FeedbackTiling] = {
    DECODE: FeedbackTiling(block_rows=1, key_tile=32),
    PREFILL: FeedbackTiling(block_rows=16, key_tile=32),
}

# Tile buffers shared by the workers of a task, each with a block that writes it. Every stage
# (block) writes a shared location at most once and never reads one it writes in another
# statement: GPU barriers can then go between stages, never inside a stage's conditions.
TASK_TILES = {
    "key_tile": "key_tile",
    "score": "score",
    "prob": "prob",
    "row_max": "init_rows",
    "row_sum": "init_rows",
    "tile_max": "tile_max",
    "rescale": "row_stats",
}


def feedback_attention_kernels(
    d_model: int,
    dtype: str = "float32",
    scale: float | None = None,
    tilings: Mapping[str, FeedbackTiling] = DEFAULT_TILINGS,
    cache_dtype: str | None = None,
) -> dict[str, tirx.PrimFunc]:
    """Unscheduled decode (S = 1) and prefill (any S >= 1) PrimFuncs, keyed by global symbol: those
    that ``tilings`` names (CPUs take the prefill from ops/tvm_feedback_prefill.py).

    ``scale`` defaults to ``d_model ** -0.5``, the ONNX op's default attribute. The caches are
    stored in ``cache_dtype`` (default ``dtype``; compile --state-dtype).
    """
    cache_dtype = cache_dtype or dtype
    if dtype not in DTYPES or cache_dtype not in CACHE_DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES} and cache_dtype one of {CACHE_DTYPES}, "
                         f"got {dtype!r}, {cache_dtype!r}")
    scale = d_model**-0.5 if scale is None else float(scale)
    return {
        name: _feedback_attention(name, d_model, dtype, scale, tilings[name], cache_dtype)
        for name in (DECODE, PREFILL) if name in tilings
    }


def feedback_attention_module(kernels: Mapping[str, tirx.PrimFunc]) -> tvm.IRModule:
    """One IRModule holding the given (scheduled) kernels under their global symbols."""
    return tvm.IRModule({name: func.with_attr("global_symbol", name) for name, func in kernels.items()})


@functools.lru_cache(maxsize=None)  # PrimFuncs are immutable: parse the TVMScript once a process
def _feedback_attention(
    name: str, d_model: int, dtype: str, scale: float, tiling: FeedbackTiling, cache_dtype: str
) -> tirx.PrimFunc:
    """Build one kernel; ``name`` DECODE fixes S = 1 and drops the (empty) diagonal tile."""
    decode = name == DECODE
    tiling.check(d_model, decode)
    # Sizes are int64 constants, like the shapes, so that index arithmetic stays in one type
    # (a mixed int32/int64 index defeats contiguous vector loads).
    KC = tiling.columns(d_model)
    W = tiling.workers
    split = tiling.key_splits > 1
    stage = tiling.stage_keys
    D, R, J, L, NC, DC, KS = (
        tirx.IntImm("int64", n)
        for n in (d_model, tiling.block_rows, tiling.key_tile, tiling.dot_lanes, tiling.d_chunks,
                  d_model // tiling.d_chunks, tiling.key_splits)
    )
    # items each worker takes in a stage: (row, key) pairs, rows, state columns, tile elements
    PAIRS, ROWS, COLS, ELEMS = (
        tirx.IntImm("int64", -(-n // W))
        for n in (int(R * J), int(R), int(DC), int(J) * KC)
    )
    KC, W = tirx.IntImm("int64", KC), tirx.IntImm("int64", W)
    seq_len = tirx.IntImm("int64", 1) if decode else tirx.Var("seq_len", "int64")
    f32 = "float32"

    def item(q, w):
        """The q-th item dealt round-robin to worker w."""
        return q * W + w

    def row_blocks():
        """Blocks of R new rows, solved one after the other."""
        return T.ceildiv(seq_len, R)

    def past_tiles(past_len, r):
        """Key tiles before row block r: positions [0, P + r*R), aligned to end at P + r*R."""
        return T.ceildiv(past_len + r * R, J)

    def key_tiles(past_len, r):
        """Tiles visited by block r: the past ones, then the diagonal one (prefill only).

        Decode visits at least one (empty when P = 0), so that on GPUs the barriers inside the
        tile loop also order the row-statistics init before the solve.
        """
        if decode:
            return T.max(past_tiles(past_len, r), 1)
        return past_tiles(past_len, r) + 1

    def first_tile(past_len, r, ks):
        """The first key tile task slice ks visits (all slices start at 0 without key_splits). Slices
        differ by one tile at most (ceil-sized ones left the last slices short or empty: 33 tiles in 8
        slices put 20 on one of two cores)."""
        if not split:
            return T.int64(0)
        return ks * past_tiles(past_len, r) // KS

    def end_tile(past_len, r, ks):
        """One past its last: all of key_tiles, or the end of its share of the past tiles."""
        if not split:
            return key_tiles(past_len, r)
        return (ks + 1) * past_tiles(past_len, r) // KS

    def merged(weight, part_acc, b, d):
        """sum over the key slices of weight * partial sum, for column d of batch row b."""
        return tree_sum(weight[b, d // DC, k] * part_acc[b, k, d] for k in range(tiling.key_splits))

    def tile_start(past_len, r, ks, kt):
        """First key position of tile kt of slice ks of block r; the first tile may start below 0."""
        return past_len + r * R - (past_tiles(past_len, r) - first_tile(past_len, r, ks) - kt) * J

    def is_key(past_len, r, ks, kt, jj):
        """Key jj of tile kt is one that some row of block r attends: 0 <= j < its last t."""
        j = tile_start(past_len, r, ks, kt) + jj
        return T.And(0 <= j, j < past_len + T.min(seq_len, r * R + R) - 1)

    def is_valid(past_len, r, ks, kt, ri, jj):
        """Row r*R+ri exists and attends to key jj of tile kt: 0 <= j < t (diagonal excluded)."""
        j = tile_start(past_len, r, ks, kt) + jj
        return T.And(r * R + ri < seq_len, T.And(0 <= j, j < past_len + r * R + ri))

    def is_solved(past_len, r, ks, kt, jj):
        """Key jj of tile kt holds a solved state (j >= 0 in a past tile): prob @ state may read it."""
        return T.And(first_tile(past_len, r, ks) + kt < past_tiles(past_len, r), 0 <= tile_start(past_len, r, ks, kt) + jj)


    def tile_key(key_tile, key_cache, past_len, b, r, ks, kt, jj, kb, col):
        """Column kb * KC + col of key jj of tile kt: from the staged tile, or straight from the cache."""
        if stage:
            return key_tile[jj, col]
        return key_cache[b, tile_start(past_len, r, ks, kt) + jj, kb * KC + col]

    @T.prim_func(s_tir=True)
    def kernel(
        query_h: T.handle,
        key_h: T.handle,
        forward_h: T.handle,
        gain_h: T.handle,
        key_cache_h: T.handle,
        state_cache_h: T.handle,
        past_len: T.int64,
        state_h: T.handle,
    ):
        T.func_attr({"tirx.noalias": True})
        batch = T.int64()
        capacity = T.int64()
        query = T.match_buffer(query_h, (batch, seq_len, D), dtype)
        key = T.match_buffer(key_h, (batch, seq_len, D), dtype)
        forward = T.match_buffer(forward_h, (batch, seq_len, D), dtype)
        gain = T.match_buffer(gain_h, (batch, seq_len, 1), dtype)
        key_cache = T.match_buffer(key_cache_h, (batch, capacity, D), cache_dtype)
        state_cache = T.match_buffer(state_cache_h, (batch, capacity, D), cache_dtype)
        state = T.match_buffer(state_h, (batch, seq_len, D), dtype)
        with T.sblock("root"):
            if not decode:
                # Keys first, in a pass of their own: every row block reads them from key_cache.
                for b, i, d in T.grid(batch, seq_len, D):
                    with T.sblock("append_key"):
                        key_cache[b, past_len + i, d] = T.Cast(cache_dtype, key[b, i, d])
            if split:
                part_max = T.sblock_alloc_buffer((batch, NC, KS), f32)
                part_sum = T.sblock_alloc_buffer((batch, NC, KS), f32)
                part_acc = T.sblock_alloc_buffer((batch, KS, D), f32)
                weight = T.sblock_alloc_buffer((batch, NC, KS), f32)
            for b, c, ks in T.grid(batch, NC, KS):
                with T.sblock("task"):
                    key_tile = T.sblock_alloc_buffer((J, KC) if stage else (1,), cache_dtype)  # unused unless staged
                    score = T.sblock_alloc_buffer((R, J), f32)
                    prob = T.sblock_alloc_buffer((R, J), f32)
                    row_max = T.sblock_alloc_buffer((R,), f32)
                    row_sum = T.sblock_alloc_buffer((R,), f32)
                    tile_max = T.sblock_alloc_buffer((R,), f32)
                    rescale = T.sblock_alloc_buffer((R,), f32)
                    for w in range(W):
                        with T.sblock("worker"):
                            part = T.sblock_alloc_buffer((PAIRS, L), f32, scope="local")
                            acc = T.sblock_alloc_buffer((R, COLS), f32, scope="local")
                            run = T.sblock_alloc_buffer((1,), f32, scope="local")
                            for r in range(row_blocks()):
                                for rq in range(ROWS):
                                    with T.sblock("init_rows"):
                                        if item(rq, w) < R:
                                            row_max[item(rq, w)] = T.float32(_LOWEST)
                                            row_sum[item(rq, w)] = T.float32(0)
                                for ri, cq in T.grid(R, COLS):
                                    with T.sblock("init_acc"):
                                        acc[ri, cq] = T.float32(0)
                                for kt in range(end_tile(past_len, r, ks) - first_tile(past_len, r, ks)):
                                    # score = query rows . key tile, key_cols columns at a time
                                    for kb in range(D // KC):
                                        if stage:
                                            for e in range(ELEMS):
                                                with T.sblock("key_tile"):
                                                    if T.And(
                                                        item(e, w) < J * KC,
                                                        is_key(past_len, r, ks, kt, item(e, w) // KC),
                                                    ):
                                                        key_tile[item(e, w) // KC, item(e, w) % KC] = key_cache[
                                                            b,
                                                            tile_start(past_len, r, ks, kt) + item(e, w) // KC,
                                                            kb * KC + item(e, w) % KC,
                                                        ]
                                        for pq, ko, lane in T.grid(PAIRS, KC // L, L):
                                            with T.sblock("dot"):
                                                if T.And(
                                                    item(pq, w) < R * J,
                                                    is_valid(past_len, r, ks, kt, item(pq, w) // J, item(pq, w) % J),
                                                ):
                                                    if kb == 0 and ko == 0:
                                                        part[pq, lane] = T.float32(0)
                                                    part[pq, lane] += T.Cast(
                                                        f32,
                                                        query[b, r * R + item(pq, w) // J, kb * KC + ko * L + lane],
                                                    ) * T.Cast(f32, tile_key(key_tile, key_cache, past_len, b, r, ks, kt,
                                                                             item(pq, w) % J, kb, ko * L + lane))
                                    for pq in range(PAIRS):
                                        with T.sblock("score"):
                                            if item(pq, w) < R * J:
                                                score[item(pq, w) // J, item(pq, w) % J] = lane_sum(part, pq, int(L))
                                    # online softmax: tile_max, prob = exp(score - tile_max), rescale
                                    for rq in range(ROWS):
                                        with T.sblock("tile_max"):
                                            if item(rq, w) < R:
                                                run[0] = row_max[item(rq, w)]
                                                for jj in range(J):
                                                    if is_valid(past_len, r, ks, kt, item(rq, w), jj):
                                                        run[0] = T.max(run[0], score[item(rq, w), jj] * T.float32(scale))
                                                tile_max[item(rq, w)] = run[0]
                                    for pq in range(PAIRS):
                                        with T.sblock("prob"):
                                            if item(pq, w) < R * J:
                                                prob[item(pq, w) // J, item(pq, w) % J] = T.if_then_else(
                                                    is_valid(past_len, r, ks, kt, item(pq, w) // J, item(pq, w) % J),
                                                    T.exp(
                                                        score[item(pq, w) // J, item(pq, w) % J] * T.float32(scale)
                                                        - tile_max[item(pq, w) // J]
                                                    ),
                                                    T.float32(0),
                                                )
                                    for rq in range(ROWS):
                                        with T.sblock("row_stats"):
                                            if item(rq, w) < R:
                                                run[0] = T.float32(0)
                                                for jj in range(J):
                                                    run[0] += prob[item(rq, w), jj]
                                                rescale[item(rq, w)] = T.exp(row_max[item(rq, w)] - tile_max[item(rq, w)])
                                                row_sum[item(rq, w)] = (
                                                    row_sum[item(rq, w)] * T.exp(row_max[item(rq, w)] - tile_max[item(rq, w)])
                                                    + run[0]
                                                )
                                    for rq in range(ROWS):
                                        with T.sblock("advance_max"):
                                            if item(rq, w) < R:
                                                row_max[item(rq, w)] = tile_max[item(rq, w)]
                                    # acc = acc * rescale + prob @ feedback_state, solved positions only; key
                                    # rows outermost, so that each state row streams in once, in order
                                    for ri, cq in T.grid(R, COLS):
                                        with T.sblock("rescale_acc"):
                                            if item(cq, w) < DC:
                                                acc[ri, cq] = acc[ri, cq] * rescale[ri]
                                    for jj, ri, cq in T.grid(J, R, COLS):
                                        with T.sblock("accumulate"):
                                            if T.And(item(cq, w) < DC, is_solved(past_len, r, ks, kt, jj)):
                                                acc[ri, cq] += prob[ri, jj] * T.Cast(
                                                    f32,
                                                    state_cache[b, tile_start(past_len, r, ks, kt) + jj, c * DC + item(cq, w)],
                                                )
                                if split:  # this slice's statistics and sum, merged below
                                    for ri, cq in T.grid(R, COLS):
                                        with T.sblock("partial"):
                                            if item(cq, w) < DC:
                                                part_acc[b, ks, c * DC + item(cq, w)] = acc[ri, cq]
                                    with T.sblock("partial_stats"):
                                        part_max[b, c, ks] = row_max[0]
                                        part_sum[b, c, ks] = row_sum[0]
                                else:
                                    # forward substitution inside the block, row by row
                                    for ri, cq in T.grid(R, COLS):
                                        with T.sblock("solve"):
                                            if T.And(r * R + ri < seq_len, item(cq, w) < DC):
                                                for jj in range(ri):
                                                    acc[ri, cq] += prob[ri, jj] * T.Cast(
                                                        f32, state_cache[b, past_len + r * R + jj, c * DC + item(cq, w)]
                                                    )
                                                state[b, r * R + ri, c * DC + item(cq, w)] = T.Cast(
                                                    dtype,
                                                    T.Cast(f32, forward[b, r * R + ri, c * DC + item(cq, w)])
                                                    + T.Cast(f32, gain[b, r * R + ri, 0])
                                                    * T.if_then_else(
                                                        row_sum[ri] > T.float32(0), acc[ri, cq] / row_sum[ri], T.float32(0)
                                                    ),
                                                )
                                                state_cache[b, past_len + r * R + ri, c * DC + item(cq, w)] = T.Cast(
                                                    cache_dtype, state[b, r * R + ri, c * DC + item(cq, w)]
                                                )
                                                if decode:
                                                    # Nothing reads key P in this call: it is written last.
                                                    key_cache[b, past_len, c * DC + item(cq, w)] = T.Cast(
                                                        cache_dtype, key[b, 0, c * DC + item(cq, w)])
            if split:
                # each slice's weight: exp(its max - the max) / the merged sum (0 when P = 0)
                for b, c in T.grid(batch, NC):
                    with T.sblock("merge_weights"):
                        top = T.sblock_alloc_buffer((2,), f32, scope="local")
                        top[0] = T.float32(_LOWEST)
                        for k in range(KS):
                            top[0] = T.max(top[0], part_max[b, c, k])
                        top[1] = T.float32(0)
                        for k in range(KS):
                            top[1] += part_sum[b, c, k] * T.exp(part_max[b, c, k] - top[0])
                        for k in range(KS):
                            weight[b, c, k] = T.if_then_else(
                                top[1] > T.float32(0), T.exp(part_max[b, c, k] - top[0]) / top[1], T.float32(0))
                for b, d in T.grid(batch, D):
                    with T.sblock("merge"):
                        state[b, 0, d] = T.Cast(
                            dtype, T.Cast(f32, forward[b, 0, d]) + T.Cast(f32, gain[b, 0, 0]) * merged(weight, part_acc, b, d))
                        state_cache[b, past_len, d] = T.Cast(cache_dtype, state[b, 0, d])
                        key_cache[b, past_len, d] = T.Cast(cache_dtype, key[b, 0, d])

    return kernel.with_attr("global_symbol", name)
