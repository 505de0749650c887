"""CPU (LLVM) target: what to build for, the weight layout, and the schedule rules.

FeedbackAttention rule: one parallel task per (batch row, D chunk); SIMD over D in the key-tile
copy, the accumulator update and the solve, and over the interleaved partial sums of the q.k
products (``FeedbackTiling.dot_lanes`` is set to the SIMD width, which makes that loop the
vector loop). The recurrence itself (row blocks, key tiles, rows inside a block) stays serial.

Linear layers: weights are packed in panels of 32 output columns, each panel one contiguous
run over the inputs (``pack_weight``), and ``CpuMatmul`` schedules the matmuls over them: a
decode step streams every panel once from memory with its accumulators in registers, a
prefill tile reads its panel with unit stride. ``CpuElementwise`` and ``CpuRowReduction`` (dlight's)
parallelise the rest of a prefill (`schedule_rules`).
"""

from __future__ import annotations

import math
from typing import Callable

import tvm
from tvm import relax, s_tir, tirx
from tvm.s_tir import dlight as dl
from tvm.target import Target
from tvm.target.codegen import llvm_get_system_cpu, llvm_get_system_triple, llvm_get_vector_width, target_has_features

from sessa_export.ops.tvm_attention import AttentionTiling
from sessa_export.ops.tvm_feedback_prefill import PrefillTiling, feedback_prefill_kernel
from sessa_export.ops.tvm_kernels import DECODE, PREFILL, FeedbackTiling, feedback_attention_kernels
from sessa_export.ops.tvm_matmul import PACKED_MATMUL, packed_matmul
from sessa_export.ops.tvm_prefetch import LINE_BYTES, prefetch

from . import packaging

# The storage scope of a task's small accumulator and register tiles: TVM puts "global" allocations
# of constant size under 1 KiB on the stack (LLVM then keeps them in registers), "local" ones it
# takes from the workspace pool, a call per allocation and task.
SCRATCH = "global"
PANELS = (32, 16, 8)  # columns per weight panel, by preference: 32 = two AVX-512 or eight NEON registers
# Float32 prefill rows per register tile at most (8 x 32 accumulators: 16 AVX-512 registers); see
# register_tile. 1024 x 768 @ 768 x 2304 on an AMD Zen 3, 2 threads: 55-61 GFLOP/s with 8 rows of a
# 32-column panel (32 accumulators for 16 AVX2 registers: spilled), 87-108 with 2, 45-64 with 1, 3, 4
# or 6 (BENCHMARKS.md, 2026-12-07).
ROW_TILE = 8
# Rows a float32 prefill register tile keeps at least, by narrowing its columns to a part of the panel:
# each row tile streams its columns of the panel from the L2, so 2 rows read it twice as often as 4.
# Same product, AVX2, in turns: 2 rows x 32 columns 105-138 GFLOP/s, 4 x 16 137-159, 8 x 8 132-140
# (BENCHMARKS.md, 2026-12-07, 21:47 UTC).
TILE_ROWS = 4
# Weight bytes a float prefill matmul's panel group holds at most: its tasks (a row tile over a panel
# each) run every row tile over the group's panels in turn, so the group's weights stay in the L2 and
# a row tile comes from the L3 once a group, not once a panel. 125M shapes, T = 1024, 2 threads, in
# turns, against one panel a group: 768 x 2304 339 -> 383 GFLOP/s, 768 x 32000 355 -> 389, 3072 x
# 768 391 -> 390 (BENCHMARKS.md, 2026-12-03); 768 KB 386-394, 18 panels (1.7 MB, near this 2 MB L2)
# fell to 330. Under the L2 of most cores.
PANEL_GROUP_BYTES = 512 * 1024
# Quantized prefill rows per tile (4 x 32 int32 and float32 accumulators: 16 AVX-512 registers). One
# 768 x 3840 kernel over 1024 rows, AVX-512 VNNI, 2 threads, q8 / q4: 3 rows 6.7 / 7.5 ms, 4 rows 6.4 / 7.1,
# 5 rows 6.4 / 7.0, 6 rows 6.4 / 8.9, 8 rows 7.2 / 9.3 (BENCHMARKS.md, 2026-12-02, 19:31 UTC).
INT_ROW_TILE = 4


def host_triple() -> str:
    """This machine's LLVM triple (a conda-built LLVM names its vendor "conda": use "pc")."""
    return str(llvm_get_system_triple()).replace("-conda-", "-pc-")


def host_cpu() -> str:
    """LLVM's name for this machine's CPU (what `-mcpu=native` would pick)."""
    try:
        return str(llvm_get_system_cpu()) or "generic"
    except Exception:  # builds without the query: a safe baseline
        return "generic"


# --cpu: what a library may assume of the processor that runs it. Per architecture, LLVM's CPU name
# and the instruction-set features it needs, named as Linux's /proc/cpuinfo names them (the
# runners check those before loading). x86-64 levels as psABI defines them (SSE3 is "pni", LZCNT "abm").
X86_64_V2 = ("pni", "ssse3", "sse4_1", "sse4_2", "popcnt", "cx16")
X86_64_V3 = X86_64_V2 + ("avx", "avx2", "bmi1", "bmi2", "fma", "f16c", "movbe", "abm")
X86_64_V4 = X86_64_V3 + ("avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl")
CPUS = {
    "x86_64": {"x86-64": (), "x86-64-v2": X86_64_V2, "x86-64-v3": X86_64_V3, "x86-64-v4": X86_64_V4},
    "aarch64": {"generic": ("asimd",), "cortex-a76": ("asimd", "asimddp"),
                "neoverse-v1": ("asimd", "asimddp", "i8mm", "sve")},
}
# The default runs on every x86-64 server and desktop chip since 2013-2017 (Haswell, Zen 1) at
# AVX2 speed; AArch64 builds assume NEON only. "native" (this machine's CPU) is for local use.
DEFAULT_CPU = {"x86_64": "x86-64-v3", "aarch64": "generic"}
NATIVE = "native"


def architecture(triple: str) -> str:
    """The CPUS key of an LLVM triple."""
    return "aarch64" if triple.startswith(("aarch64", "arm64")) else triple.split("-")[0]


def cpu_choices(host: str | None) -> tuple[tuple[str, ...], str]:
    """The --cpu names for a build whose host code is for `host` (None: this machine), and the default."""
    arch = architecture(host or host_triple())
    native = (NATIVE,) if host is None else ()
    return (*native, *CPUS.get(arch, {})), DEFAULT_CPU.get(arch, NATIVE if host is None else "generic")


def cpu_features(cpu: str, host: str | None) -> list[str]:
    """The /proc/cpuinfo features a library for `cpu` needs: its level's, or for "native" the ones
    this machine has of every level known for its architecture."""
    arch = architecture(host or host_triple())
    if cpu != NATIVE:
        return list(CPUS[arch][cpu])
    known = {feature for features in CPUS.get(arch, {}).values() for feature in features}
    return sorted(known & set(running_cpu_features()))


def running_cpu_features() -> list[str]:
    """The instruction-set features of the CPU this process runs on (Linux /proc/cpuinfo; empty elsewhere)."""
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        return []
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return value.split()
    return []


def tvm_target(arch: str | None = None, host: str | None = None, cpu: str | None = None) -> Target:
    """LLVM target for the host triple `host` (None: this machine's) and the --cpu `cpu`
    (None: DEFAULT_CPU of its architecture; "native": this machine's CPU model)."""
    triple = host or host_triple()
    cpu = cpu or cpu_choices(host)[1]
    return Target({"kind": "llvm", "mtriple": triple, "mcpu": host_cpu() if cpu == NATIVE else cpu})


def attention_tiling(head_dim: int, tgt: Target) -> AttentionTiling:
    """Parallel CPU tasks: decode vectors of up to 8 lanes, prefill register tiles sized to ``tgt``.

    Decode: 8 lanes, not 16, even with AVX-512: a head of 64 then sums 8 lanes, not 16, at the end of
    each key's product (`benchmarks/tvm_kernels.py`, 125M shapes, 2 threads, in turns, two runs:
    decode over 12 layers at P = 1024 as fast or 11% faster); the products of ``decode_keys`` keys
    run interleaved, one accumulator each, in half the SIMD registers; the key tile and its prefetch
    come from `decode_streaming`.

    Prefill: a task takes PREFILL_BLOCK_ROWS rows of a head; its scores, a pass at a time, are
    score_rows x PREFILL_KEYS keys of accumulators, at most half the SIMD registers (32 with AVX-512
    and on AArch64, 16 with AVX2), so that the loads and the broadcasts keep the rest; its value
    update takes value_tile's passes.
    """
    registers, lanes = simd_registers(tgt), vector_lanes(tgt)
    rows, score_rows = prefill_rows(tgt)
    vector = math.gcd(lanes, head_dim)
    decode_lanes = next(n for n in (8, 4, 2, 1) if head_dim % n == 0)
    interleaved = registers // 2 // max(1, decode_lanes // lanes)  # accumulators of decode_lanes each
    value_rows, value_vectors = value_tile(rows, head_dim // vector, registers)
    key_tile, ahead = decode_streaming(tgt)
    return AttentionTiling(lanes=decode_lanes, key_tile=key_tile, rows=rows, vector=vector, prefetch_tiles=ahead,
                           decode_keys=next(n for n in (16, 8, 4, 2, 1) if n <= interleaved),
                           score_rows=score_rows, score_vectors=PREFILL_KEYS // vector, value_rows=value_rows,
                           value_vectors=value_vectors)


# The forward attention's decode streams each head's keys and values a tile of keys at a time: (keys a
# tile, tiles ahead prefetched) by the LLVM CPU name's prefix, measured over 96 layers' caches at P = 1024
# read cold (2 threads, in turns). Intel Xeon (AVX-512): tiles of 16, one prefetched ahead, 24.9 / 26.0
# GB/s against 23.3 / 21.5 without (BENCHMARKS.md, 2026-12-02, 17:00 UTC). AMD Zen 4 (znver4): tiles of
# 128 without prefetches 25.5 / 21.7 GB/s against 19.9 / 11.4 for Intel's choice, every prefetch slower
# (BENCHMARKS.md, 2026-12-03, 12:17 UTC). Other CPUs take the first row.
DECODE_STREAMING = (("", 16, 1), ("znver", 128, 0))


def decode_streaming(tgt: Target) -> tuple[int, int]:
    """(key tile, tiles prefetched ahead) of the forward attention's decode for `tgt`'s CPU (DECODE_STREAMING)."""
    mcpu = str(tgt.attrs.get("mcpu", ""))
    _, tile, ahead = max((row for row in DECODE_STREAMING if mcpu.startswith(row[0])), key=lambda row: len(row[0]))
    return tile, ahead


def prefill_rows(tgt: Target) -> tuple[int, int]:
    """(rows, score_rows) of a prefill task of either attention kernel: score tiles of score_rows x
    PREFILL_KEYS accumulators in half the SIMD registers, PREFILL_BLOCK_ROWS rows a task in passes of them."""
    score_rows = register_rows(tgt, PREFILL_KEYS, PREFILL_ROWS)
    return score_rows * max(1, PREFILL_BLOCK_ROWS // score_rows), score_rows


def value_tile(rows: int, vectors: int, registers: int) -> tuple[int, int]:
    """(value_rows, value_vectors) of a prefill's probabilities @ values pass, for a block of `rows`
    rows and a task of `vectors` SIMD vectors of columns: at most half the `registers` as
    accumulators, and the fewest loads per multiply-add (a step loads value_vectors values and
    broadcasts value_rows probabilities for their product); on a tie the more columns, fewer passes.

    With AVX-512 (forward attention, a head of 64): 4 rows x 4 vectors, 8 loads for 16
    multiply-adds, took 8.7 ms at T = 1024 where 16 rows x 1 vector, 17 loads, took 10.2
    (`benchmarks/tvm_kernels.py`, 2 threads; BENCHMARKS.md, 2026-12-03).
    """
    tiles = [(r, v) for r in range(1, rows + 1) for v in range(1, vectors + 1)
             if rows % r == 0 and vectors % v == 0 and r * v <= registers // 2]
    return max(tiles, key=lambda tile: (tile[0] * tile[1] / (tile[0] + tile[1]), tile[1]))


def vector_lanes(tgt: Target) -> int:
    """float32 lanes of one SIMD register of ``tgt`` (at least 4).

    LLVM reports 512 bits for x86-64 CPUs without AVX-512 too (x86-64-v3 here), so on x86-64 the
    width comes from the features: 512 bits with AVX-512, 256 with AVX, else SSE's 128.
    """
    width = llvm_get_vector_width(tgt)
    if architecture(str(tgt.attrs["mtriple"])) == "x86_64":
        width = 512 if target_has_features("avx512f", tgt) else 256 if target_has_features("avx", tgt) else 128
    return max(4, width // 32)


def simd_registers(tgt: Target) -> int:
    """SIMD registers of ``tgt``: 32 with AVX-512 and on AArch64, 16 with AVX2 and SSE."""
    return 32 if vector_lanes(tgt) >= 16 or architecture(str(tgt.attrs["mtriple"])) == "aarch64" else 16


def register_rows(tgt: Target, columns: int, most: int) -> int:
    """Rows of a register tile of `columns` float32 accumulators a row in half the SIMD registers of
    ``tgt`` (the loads and broadcasts keep the rest), at most `most`."""
    return max(1, min(most, simd_registers(tgt) // 2 // max(1, columns // vector_lanes(tgt))))


def register_tile(tgt: Target, width: int) -> tuple[int, int]:
    """(rows, columns) of a float32 prefill register tile over a `width`-column panel: the widest
    columns (the panel, its half, its quarter... down to one vector) that leave at least TILE_ROWS
    rows of accumulators in half the SIMD registers (AVX-512: 8 x 32; AVX2 and NEON: 4 x 16)."""
    lanes, columns = vector_lanes(tgt), width
    while columns % 2 == 0 and columns // 2 >= lanes and register_rows(tgt, columns, ROW_TILE) < TILE_ROWS:
        columns //= 2
    return register_rows(tgt, columns, ROW_TILE), columns


# Keys in a prefill score tile on every CPU target: the FeedbackAttention prefill sums each row's
# exps in this many lanes, so the tile fixes its rounding, and its x86-64 and AArch64 builds write
# the same bytes (tests/test_embed_cpp.py compares them under qemu).
PREFILL_KEYS = 16
# Rows of a prefill score tile at most: with AVX-512, 16 rows of one vector of keys (half the
# registers) load a key for 16 multiply-adds (BENCHMARKS.md, 2026-12-02 13:47-15:30 UTC: with 8
# rows, FeedbackAttention 35 -> 25 ms together with the key layout, forward attention 22 -> 17.5 ms a
# layer at T = 1024). AVX2 and NEON tiles stay at 4 rows.
PREFILL_ROWS = 16
PREFILL_D_CHUNKS = 8  # most solve tasks of a FeedbackAttention prefill (prefill_tiling)
# Rows of a prefill task (a block), in score passes of the score tile's rows: a key tile is loaded
# from the L3 (FeedbackAttention: D x 16 keys, 48 KB at D = 768) or the L2 (a head's) once for them
# all. `benchmarks/tvm_kernels.py` shapes, T = 1024, 2 threads (BENCHMARKS.md, 2026-12-03): with
# AVX-512 from 16 rows, FeedbackAttention 7.6 -> 6.6 ms (64 rows 6.9), forward attention 8.5 -> 7.7
# (64 rows 7.6); with AVX2 (x86-64-v3) from 4 rows, 13.1 -> 11.0 ms and 20.4 -> 12.6.
PREFILL_BLOCK_ROWS = 32
DECODE_KEY_SPLITS = 8  # key slices of a decode step: enough tasks for 8 cores, merged in one short pass


def feedback_tilings(d_model: int, tgt: Target, d_chunks: int | None = None) -> dict[str, FeedbackTiling]:
    """Tile sizes of the decode kernel for ``tgt`` (the prefill is prefill_tiling's); ``d_chunks``
    > 1 cuts D into independent tasks.

    Decode cuts the keys into DECODE_KEY_SPLITS slices, a task each, so that one sequence's pass
    over the caches runs on every core: with one task a row, a batch-1 decode read them on one core
    (`benchmarks/tvm_kernels.py`, 12 layers' caches at P = 1024, 2 threads, two runs: 3.24 and 2.99 ms
    with one slice, 2.74 and 2.57 with eight). It keeps one D chunk by default: a second would read
    every key twice. The products read the keys from the cache, not from a staged copy of the tile:
    96 layers' caches at P = 1024 cycled through (each read from memory), 2 threads, 25.7 against 22.2
    GB/s (BENCHMARKS.md, 2026-12-02, 17:00 UTC).
    """
    return {DECODE: FeedbackTiling(block_rows=1, key_tile=32, dot_lanes=math.gcd(vector_lanes(tgt), d_model),
                                   d_chunks=d_chunks or 1, key_splits=DECODE_KEY_SPLITS, stage_keys=False)}


def prefill_tiling(d_model: int, tgt: Target, d_chunks: int | None = None) -> PrefillTiling:
    """Register tiles of ops/tvm_feedback_prefill.py for ``tgt``, each at most half the SIMD registers.

    The probabilities are computed in parallel over row blocks; D chunks split only the solve, each
    chunk a task, so a batch-1 prefill's solve runs on as many cores. By default (None) up to
    PREFILL_D_CHUNKS, while a chunk stays a whole number of SIMD vectors (else two when D allows):
    `benchmarks/tvm_kernels.py`, native, D = 768, T = 1024, 2 threads: 14.4 ms with two chunks
    against 25.0 with one; eight timed as two within this machine's noise (13.2-15.3 against
    14.7-17.1 ms), and leave work for the cores of larger machines.
    """
    registers, lanes = simd_registers(tgt), vector_lanes(tgt)
    fits = [c for c in range(PREFILL_D_CHUNKS, 0, -1) if d_model % c == 0 and d_model // c % lanes == 0]
    chunks = d_chunks or (fits[0] if fits else math.gcd(2, d_model))
    vector = math.gcd(lanes, d_model // chunks)
    rows, score_rows = prefill_rows(tgt)
    value_rows, value_vectors = value_tile(rows, d_model // chunks // vector, registers)
    return PrefillTiling(rows=rows, vector=vector, score_rows=score_rows, score_vectors=PREFILL_KEYS // vector,
                         value_rows=value_rows, value_vectors=value_vectors, d_chunks=chunks)


def schedule_feedback_attention(func: tirx.PrimFunc, tgt: Target) -> tirx.PrimFunc:
    """Apply the CPU rule to an unscheduled FeedbackAttention kernel (decode or prefill).

    The schedule is built with ``enable_check=False``: S-TIR cannot prove the serial recurrence
    safe, so the rule only parallelises the independent tasks and vectorises loops whose
    iterations are independent columns or lanes.
    """
    lanes = vector_lanes(tgt)
    sch = s_tir.Schedule(func, enable_check=False)
    if has_block(sch, "append_key"):
        b, i, d = sch.get_loops("append_key")
        sch.parallel(sch.fuse(b, i))
        _vectorize(sch, d, lanes)
    sch.parallel(sch.fuse(*sch.get_loops("task")))
    if has_block(sch, "key_tile"):
        # the key tile copy runs over key_tile x key_cols elements: split it back into rows, columns
        (key_tile,) = (buf for buf in sch.get(sch.get_sblock("task")).alloc_buffers if buf.name == "key_tile")
        _vectorize(sch, sch.split(sch.get_loops("key_tile")[-1], [None, key_tile.shape[1]])[1], lanes)
    split = has_block(sch, "merge")  # decode over key slices: a partial sum per task, merged after
    for block in ("init_acc", "rescale_acc", "accumulate", "partial" if split else "solve"):
        _vectorize(sch, sch.get_loops(block)[-1], lanes)
    if split:
        _vectorize(sch, sch.get_loops("merge")[-1], lanes)
    sch.vectorize(sch.get_loops("dot")[-1])
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


def scheduled_feedback_attention(
    d_model: int,
    dtype: str = "float32",
    scale: float | None = None,
    arch: str | None = None,
    host: str | None = None,
    cpu: str | None = None,
    d_chunks: int | None = None,
    cache_dtype: str | None = None,
) -> tuple[Target, dict[str, tirx.PrimFunc]]:
    """The CPU target and both kernels for it (keyed by global symbol): ops/tvm_kernels.py's decode,
    tiled and scheduled by this rule, and ops/tvm_feedback_prefill.py's register-tiled prefill."""
    tgt = tvm_target(arch, host, cpu)
    (decode,) = feedback_attention_kernels(d_model, dtype, scale, feedback_tilings(d_model, tgt, d_chunks),
                                           cache_dtype).values()
    prefill = feedback_prefill_kernel(d_model, dtype, scale, prefill_tiling(d_model, tgt, d_chunks), cache_dtype)
    return tgt, {DECODE: schedule_feedback_attention(decode, tgt), PREFILL: prefill}


def has_block(sch: s_tir.Schedule, name: str) -> bool:
    """Whether the function being scheduled has a block called ``name``."""
    try:
        sch.get_sblock(name)
    except s_tir.ScheduleError:
        return False
    return True


def _vectorize(sch: s_tir.Schedule, loop: s_tir.LoopRV, lanes: int) -> None:
    """Split ``loop`` (constant extent) into SIMD-wide pieces and vectorise the inner one."""
    width = math.gcd(int(sch.get(loop).extent), lanes)
    if width > 1:
        sch.vectorize(sch.split(loop, [None, width])[1])


# -- linear layers -------------------------------------------------------------------------------
def weight_panel(columns: int) -> int | None:
    """Columns per panel for a weight with ``columns`` outputs (None: keep the plain [in, out] layout)."""
    return next((panel for panel in PANELS if columns % panel == 0), None)


def panel_group(panels: int, panel_bytes: int) -> int:
    """The panels of a prefill matmul's group: the most that divide ``panels`` and fit PANEL_GROUP_BYTES."""
    return max(g for g in range(1, panels + 1)
               if panels % g == 0 and (g == 1 or g * panel_bytes <= PANEL_GROUP_BYTES))


def emit_linear(bb: relax.BlockBuilder, x: relax.Expr, panels: relax.Expr, bias: relax.Expr | None,
                shape: list) -> relax.Expr:
    """Emit x @ W^T (+ b) over packed panels (bias as [out / panel, panel]), viewed as ``shape``
    [B, S, out] without a copy."""
    y = bb.emit_te(packed_matmul, x, panels)
    if bias is not None:
        y = bb.emit(relax.op.add(y, bias))
    return bb.emit(relax.op.memory.view(y, relax.ShapeExpr(shape)))


class CpuMatmul(dl.ScheduleRule):
    """x @ W (+ injective epilogues) on LLVM targets: ``packed_matmul`` or W stored [in, out].

    One row (decode, S = 1): a matrix-vector product; each task owns one panel (a packed weight)
    or a run of up to 512 columns, keeps its accumulators in registers and streams the weight
    through them (a packed one prefetched FLOAT_PREFETCH_BYTES ahead). More rows (prefill): tiles
    of `register_tile` rows x columns of one panel (or of 32 columns), accumulators in registers,
    groups of panels outermost (panel_group) so that the group's panels stay in the L2 across row
    tiles. The rows are padded to a multiple of that tile (copies of x and of the result, both
    cheap): a row predicate would keep LLVM from holding the accumulators in registers.
    Weight decode blocks of ops/tvm_dequant_matmul.py (named "dequantize*") lead the function. In a
    matrix-vector product they are inlined into the reduction (each weight widened and scaled in
    registers as it is used); in a prefill each task owns one panel, decodes it once into a float32
    buffer of that panel alone and runs every row tile over it: the float weight of the whole layer
    is never written.
    """

    def apply(self, func, target, _tunable):
        if target.kind.name != "llvm":
            return None
        sch = s_tir.Schedule(func)
        blocks = sch.get_child_blocks(sch.get_sblock("root"))
        decoded = [sch.get(b).name_hint for b in blocks if sch.get(b).name_hint.startswith("dequantize")]
        if decoded and [sch.get(b).name_hint for b in blocks[:len(decoded)]] != decoded:
            return None
        blocks = blocks[len(decoded):]
        if not blocks or not _spatial_reduce(sch, blocks[0]):
            return None
        if any(any(iv.iter_type != 0 for iv in sch.get(b).iter_vars) for b in blocks[1:]):
            return None
        matmul, epilogues = blocks[0], blocks[1:]
        name = sch.get(matmul).name_hint
        packed = name == PACKED_MATMUL

        def loops():
            """(outer loops, row loop, column-tile loop or None, column loop, reduction loop)."""
            *rows, col, red = sch.get_loops(matmul)
            panel = rows.pop() if packed else None
            return rows[:-1], rows[-1], panel, col, red

        if len(sch.get_loops(matmul)) < (4 if packed else 3):
            return None
        outer, row, panel, col, red = loops()
        try:
            columns = int(sch.get(col).extent)
        except TypeError:
            return None
        if _vector_width(columns) == 1:
            return None
        extent = sch.get(row).extent
        if isinstance(extent, tirx.IntImm) and int(extent) == 1:
            for block in decoded:
                sch.compute_inline(sch.get_sblock(block))
            width = columns if packed else _gemv_width(columns)
            col_o, col_i = (panel, col) if packed else sch.split(col, [None, width])
            sch.reorder(*outer, row, col_o, red, col_i)
            task = tile = sch.fuse(*outer, row, col_o)
            row_i = None
        else:
            width = columns if packed else (32 if columns % 32 == 0 else _vector_width(columns))
            rows, tile_columns = register_tile(target, width)
            sch.pad_einsum(matmul, [1] * len(outer) + [rows] + [1] * (3 if packed else 2))
            blocks = sch.get_child_blocks(sch.get_sblock("root"))
            at = [sch.get(b).name_hint for b in blocks].index(name)
            producers, epilogues = blocks[:at], blocks[at + 1:]
            producers = [b for b in producers if sch.get(b).name_hint not in decoded]
            for block in producers:
                body = sch.get_loops(block)
                sch.parallel(sch.fuse(*body[:-1]) if len(body) > 2 else body[0])
            outer, row, panel, col, red = loops()
            row_o, row_i = sch.split(row, [None, rows])
            col_o, col_i = (panel, col) if packed else sch.split(col, [None, width])
            col_t, col_i = sch.split(col_i, [None, tile_columns])  # the register tile's columns of the panel
            sch.reorder(col_o, *outer, row_o, col_t, red, row_i, col_i)
            if decoded:  # a task per panel: decoded once, then every row tile over it
                task = col_o
                for block in decoded:
                    sch.compute_at(sch.get_sblock(block), col_o)
                    inner = sch.get_loops(sch.get_sblock(block))[-1]
                    _vectorize(sch, inner, _vector_width(sch.get(inner).extent))
            else:  # row tiles over a group of panels at a time, the group's weights held in the L2
                item = tvm.DataType(sch.get(matmul).writes[0].source.dtype).bits // 8
                group = panel_group(int(sch.get(col_o).extent), int(sch.get(red).extent) * width * item)
                col_g, col_in = sch.split(col_o, [None, group])
                sch.reorder(col_g, *outer, row_o, col_in)
                task = sch.fuse(col_g, *outer, row_o, col_in)
            tile = col_t
        sch.parallel(task)
        acc = sch.cache_write(matmul, 0, SCRATCH)
        sch.reverse_compute_at(acc, tile)
        for block in epilogues:
            sch.reverse_compute_at(block, tile)
        for block in [acc, *epilogues]:
            inner = sch.get_loops(block)[-1]
            lanes = _vector_width(sch.get(inner).extent)
            if lanes > 1:
                sch.vectorize(sch.split(inner, [None, lanes])[1] if lanes < int(sch.get(inner).extent) else inner)
        if row_i is not None:
            sch.unroll(row_i)
        lanes = _vector_width(width)
        sch.vectorize(sch.split(col_i, [None, lanes])[1] if lanes < width else col_i)
        sch.decompose_reduction(matmul, red)
        if row_i is not None or not packed or decoded:
            return sch
        (weight,) = (r.source for r in sch.get(matmul).reads  # [panels, in, panel]: the one read of that shape
                     if len(r.source.shape) == 3 and all(isinstance(n, tirx.IntImm) for n in r.source.shape)
                     and int(r.source.shape[2]) == columns and int(r.source.shape[1]) > 1)
        return s_tir.Schedule(_prefetch_panel(sch.mod["main"], f"{name}_update", weight.name, FLOAT_PREFETCH_BYTES))


# -- quantized decode: integer dot products ---------------------------------------------------------
# int_dot (ops/tvm_dequant_matmul.py) sums, per group, int32(xq) · int32(w) over runs of 4 inputs: the
# activation xq int8, the stored weight w uint8 (q8: up to 255; q4: up to 15). Per build, the widest
# instruction that does 4 such products into one int32 lane, L lanes at once:
#   x86-64 AVX-512 VNNI: vpdpbusd zmm (L 16); AVX-VNNI: vpdpbusd ymm (L 8);
#   AVX2: vpmaddubsw + vpmaddwd (L 8; q8 through |w - 128| and the sign of w - 128, then + 128 · Σxq,
#         since vpmaddubsw saturates its 16-bit pair sums);
#   AArch64 i8mm: usdot (L 4); dot product: sdot (L 4; q8 with w - 128, then + 128 · Σxq);
#   else: no tensorization, the int32 lanes vectorised (plain NEON / SSE).
DOT_LANES = {"vnni512": 16, "vnni256": 8, "avx2": 8, "usdot": 4, "sdot": 4}
# How far ahead of the quantized GEMV's dot products its weight stream is prefetched: 150 fused
# q/k/v/proj_fb weights (768 x 3840) read cold, 2 threads, against none: q4 21.6 -> 24.4 GB/s at 2 and 4
# KB, q8 25.8 -> 27.1 at 4 KB (BENCHMARKS.md, 2026-12-02, 17:00 UTC).
WEIGHT_PREFETCH_BYTES = 4096
# The same for the float32 GEMV over packed panels: 24 cold 768 x 3840 weights, 2 threads, in turns, 0 / 2
# / 4 / 8 KB: 10.9 / 14.5 / 14.3 / 14.4 GB/s; the fp32 125M decode 13.19 -> 12.79 ms at 64, 19.33 ->
# 18.76 at 1024 (BENCHMARKS.md, 2026-12-02, 17:00 UTC).
FLOAT_PREFETCH_BYTES = 4096


def dot_instruction(tgt: Target) -> str | None:
    """The dot-product instruction family the build's CPU features give (None: none)."""
    from tvm.target.codegen import target_has_features

    def has(feature: str) -> bool:
        try:
            return bool(target_has_features(feature, tgt))
        except Exception:  # a feature LLVM does not know for this architecture
            return False

    if architecture(str(tgt.attrs.get("mtriple", "")) or host_triple()) == "aarch64":
        return "usdot" if has("i8mm") else "sdot" if has("dotprod") else None
    if has("avx512vnni"):
        return "vnni512"
    if has("avxvnni"):
        return "vnni256"
    return "avx2" if has("avx2") else None


# Quantized prefills that decode their weights into the float32 matmul although the CPU has a dot-product
# instruction: (LLVM CPU name prefix, mode). AMD Zen 3 (AVX2 only): AVX2's q8 product takes 7 instructions
# per 32 weights (the |w - 128| and sign trick), q4's 3; the 125M q8 prefill of 1024 went from 336 / 327 to
# 465 / 455 tokens/s over dequantized panels, in turns; q4's integer kernel stays the faster (BENCHMARKS.md,
# 2026-12-07, 21:47 UTC). The portable x86-64-v3 build keeps the integer kernel: not measured on Intel.
FLOAT_PREFILL = (("znver3", "q8"),)


def quantized_row_tile(tgt: Target, mode: str) -> int | None:
    """Rows per tile of the `mode` prefill's integer kernel, or None where the build has no dot-product
    instruction (there int32 multiplies are slower than decoding the weights into the float matmul:
    SSE2 18 against 67 GFLOP/s, BENCHMARKS.md 2026-12-02, 19:31 UTC) or FLOAT_PREFILL names its CPU."""
    mcpu = str(tgt.attrs.get("mcpu", ""))
    if not dot_instruction(tgt) or any(mcpu.startswith(name) and mode == m for name, m in FLOAT_PREFILL):
        return None
    return INT_ROW_TILE


def quantized_matmul_kernel(in_features: int, out_features: int, mode: str, bias: bool, group_size: int,
                            decode: bool, tgt: Target) -> tuple[str, tirx.PrimFunc]:
    """(name, PrimFunc) of a quantized linear layer's kernel for this build (ops/tvm_dequant_matmul.py,
    weights in panels of `weight_panel`): integer dot products in decode, and in prefill where
    `quantized_row_tile` allows; else the prefill decodes its weights inside the float matmul."""
    from sessa_export.ops import tvm_dequant_matmul as dq

    panel, step = weight_panel(out_features), "decode" if decode else "prefill"
    row_tile = None if decode else quantized_row_tile(tgt, mode)
    if decode or row_tile:
        kind, func = "int", dq.int_matmul_kernel(in_features, out_features, mode, bias, panel, group_size, row_tile)
    else:
        kind, func = "dequant", dq.dequant_matmul_kernel(in_features, out_features, mode, bias, panel, group_size)
    return f"{kind}_matmul_{step}_{mode}_k{in_features}_n{out_features}" + ("_bias" if bias else ""), func


def dot_product(kind: str, wide: bool, acc, a, b, a_values):
    """C + Σ_c int32(a[c]) · int32(b[lane, c]) per int32 lane with `kind`'s instruction: `acc` int32 x L,
    `a` int8 x 4 (the activation run), `b` uint8 x 4L (4 inputs of each of L columns), `a_values`
    the four scalars of `a`; `wide`: b up to 255 (q8), else up to 15 (q4)."""
    L = DOT_LANES[kind]
    n = 4 * L
    call = tirx.call_llvm_pure_intrin
    broadcast = tirx.Broadcast(tirx.reinterpret("int32", a), L)
    a = tirx.reinterpret(f"int8x{n}", broadcast)
    raw = tirx.reinterpret(f"int8x{n}", b)
    # w - 128 as int8 (the stored w >= 1); q4's w <= 15 fits int8 as it is
    signed = tirx.reinterpret(f"int8x{n}", tirx.bitwise_xor(b, tirx.Broadcast(tirx.const(128, "uint8"), n))) \
        if wide else raw
    compensation = tirx.Broadcast(128 * sum(v.astype("int32") for v in a_values), L)  # Σ 128 · a
    if kind in ("vnni512", "vnni256"):
        return call(f"int32x{L}", f"llvm.x86.avx512.vpdpbusd.{8 * n}", acc, raw, a)
    if kind == "usdot":
        return call("int32x4", "llvm.aarch64.neon.usdot.v4i32.v16i8", acc, raw, a)
    if kind == "sdot":
        dot = call("int32x4", "llvm.aarch64.neon.sdot.v4i32.v16i8", acc, signed, a)
        return dot + compensation if wide else dot
    if wide:  # avx2, q8: |w - 128| · (sign(w - 128) · a): pair sums stay within int16
        magnitude = call("int8x32", "llvm.x86.avx2.psign.b", signed, signed)
        pairs = call("int16x16", "llvm.x86.avx2.pmadd.ub.sw", magnitude,
                     call("int8x32", "llvm.x86.avx2.psign.b", a, signed))
    else:
        pairs = call("int16x16", "llvm.x86.avx2.pmadd.ub.sw", raw, a)
    dot = acc + call("int32x8", "llvm.x86.avx2.pmadd.wd", pairs, tirx.Broadcast(tirx.const(1, "int16"), 16))
    return dot + compensation if wide else dot


def _vector_index(region, lanes: int) -> list:
    """Indices of a BufferRegion whose last dim is `lanes` contiguous elements, as one vector access."""
    *lead, last = region
    return [r.min for r in lead] + [tirx.Ramp(last.min, tirx.IntImm(str(last.min.ty), 1), lanes)]


def _dot_body(block, kind: str, wide: bool):
    """The body of a blockized run of `int_dot` (L lanes x 4 inputs) as one dot-product instruction."""
    L = DOT_LANES[kind]
    out = block.writes[0]
    reads = {str(r.source.dtype): r for r in block.reads}
    a, b = reads["int8"], reads["uint8"]
    *lead, last = a.region
    a_values = [tirx.BufferLoad(a.source, [r.min for r in lead] + [last.min + i]) for i in range(4)]
    value = dot_product(kind, wide, tirx.BufferLoad(out.source, _vector_index(out.region, L)),
                        tirx.BufferLoad(a.source, _vector_index(a.region, 4)),
                        tirx.BufferLoad(b.source, _vector_index(b.region, 4 * L)), a_values)
    return tirx.BufferStore(out.source, value, _vector_index(out.region, L))


def _rewrite(stmt, visit: Callable):
    """`stmt` with every statement for which visit(stmt) returns one replaced by it, through the loop
    nests (SeqStmt, For, blocks) that the schedules here produce; unchanged parts stay shared."""
    from tvm.s_tir import SBlock, SBlockRealize

    replaced = visit(stmt)
    if replaced is not None:
        return replaced
    if isinstance(stmt, tirx.SeqStmt):
        parts = [_rewrite(s, visit) for s in stmt.seq]
        return stmt if all(p.same_as(s) for p, s in zip(parts, stmt.seq)) else tirx.SeqStmt(parts)
    if isinstance(stmt, tirx.For):
        inner = _rewrite(stmt.body, visit)
        return stmt if inner.same_as(stmt.body) else tirx.For(
            stmt.loop_var, stmt.min, stmt.extent, stmt.kind, inner, stmt.thread_binding, stmt.annotations, stmt.step)
    if isinstance(stmt, SBlockRealize):
        block = stmt.block
        inner = _rewrite(block.body, visit)
        return stmt if inner.same_as(block.body) else SBlockRealize(stmt.iter_values, stmt.predicate, SBlock(
            block.iter_vars, block.reads, block.writes, block.name_hint, inner, block.init,
            block.alloc_buffers, block.match_buffers, block.annotations))
    return stmt


def _replace_block_body(func: tirx.PrimFunc, name: str, body: Callable) -> tirx.PrimFunc:
    """`func` with the body of every block called `name` replaced by body(block) (what tensorize does;
    s_tir's tensorize crashes in this TVM build)."""
    from tvm.s_tir import SBlock, SBlockRealize

    def visit(stmt):
        if isinstance(stmt, SBlockRealize) and stmt.block.name_hint == name:
            block = stmt.block
            return SBlockRealize(stmt.iter_values, stmt.predicate, SBlock(
                block.iter_vars, block.reads, block.writes, block.name_hint, body(block), block.init,
                block.alloc_buffers, block.match_buffers, block.annotations))
        return None

    return func.with_body(_rewrite(func.body, visit))


class CpuIntMatmul(dl.ScheduleRule):
    """The quantized matmuls of ops/tvm_dequant_matmul.py (blocks ``int_dot``, ``int_scale``).

    Decode (one row): the activation blocks (absmax, int8 quantization, group sums: K values) run
    once, serially. Then one parallel task per weight panel: for each batch row and group, the
    panel's integer dot products into int32 accumulators in registers (``int_dot``, tensorized with
    the build's dot-product instruction, `dot_instruction`; q4 nibbles unpacked a run of 4 inputs
    at a time into a register tile first), then the float32 scaling into the panel's float
    accumulators (``int_scale``): the weight streams once from memory, the scales are applied once
    per group. On the dot-product paths every run also prefetches the weights
    WEIGHT_PREFETCH_BYTES ahead.

    Prefill (tiles of INT_ROW_TILE rows): the activation blocks in parallel over the rows, then one
    task per panel running every row tile over it (the panel stays in cache): per group, each run of
    4 inputs (unpacked once) meets the tile's rows in one dot-product instruction a row and vector.
    """

    def apply(self, func, target, _tunable):
        from sessa_export.ops.tvm_dequant_matmul import INT_DOT, INT_ROWS, INT_SCALE

        if target.kind.name != "llvm":
            return None
        sch = s_tir.Schedule(func)
        if not (has_block(sch, INT_DOT) and has_block(sch, INT_SCALE)):
            return None
        dot, scale = sch.get_sblock(INT_DOT), sch.get_sblock(INT_SCALE)
        unpack = sch.get_sblock("unpack") if has_block(sch, "unpack") else None
        epilogues = [b for b in sch.get_child_blocks(sch.get_sblock("root"))
                     if sch.get(b).name_hint in ("bias_add", INT_ROWS)]
        b, s, p, j, g = sch.get_loops(scale)
        panel = int(sch.get(j).extent)
        tiled = has_block(sch, INT_ROWS)
        if tiled:  # prefill: the activations in parallel over the rows, a task per panel over the row tiles
            for name in ("act_absmax", "act_quantize", "act_sum"):
                loops = sch.get_loops(sch.get_sblock(name))
                sch.parallel(sch.fuse(*loops[:2]))
            s, row = sch.split(s, [None, INT_ROW_TILE])
            sch.reorder(p, b, s, g, row, j)
        else:
            sch.reorder(p, b, s, g, j)
        sch.parallel(p)
        acc = sch.cache_write(scale, 0, SCRATCH)
        sch.reverse_compute_at(acc, s)
        for block in epilogues:
            sch.reverse_compute_at(block, s if tiled else p)
        sch.compute_at(dot, g)
        sch.set_scope(dot, 0, SCRATCH)
        j_dot, r4, c = sch.get_loops(dot)[-3:]
        rows = [sch.get_loops(dot)[-4]] if tiled else []
        kind = dot_instruction(target)
        if kind == "vnni512" and panel % DOT_LANES[kind]:  # panels of 8 columns: the ymm form (AVX512-VL)
            kind = "vnni256"
        lanes = DOT_LANES.get(kind, 0)
        if lanes and panel % lanes == 0:
            jo, ji = sch.split(j_dot, [None, lanes])
            sch.reorder(r4, *rows, jo, ji, c)
            if unpack is not None:
                sch.compute_at(unpack, r4)
                sch.set_scope(unpack, 0, SCRATCH)
                sch.vectorize(sch.get_loops(unpack)[-1])
            init = sch.decompose_reduction(dot, r4)
            sch.vectorize(sch.fuse(*sch.get_loops(init)[-2:]))
            for loop in (*rows, jo):
                sch.unroll(loop)
            run = sch.get(sch.blockize(ji)).name_hint
            tensorized = (run, kind, unpack is None)
        else:  # no dot-product instruction: int32 multiply-adds over the panel's lanes
            sch.reorder(r4, c, *rows, j_dot)
            if unpack is not None:
                sch.compute_at(unpack, r4)
                sch.set_scope(unpack, 0, SCRATCH)
            _vectorize(sch, j_dot, 16)
            init = sch.decompose_reduction(dot, r4)
            _vectorize(sch, sch.get_loops(init)[-1], 16)
            tensorized = None
        for block in (scale, acc, *epilogues):
            _vectorize(sch, sch.get_loops(block)[-1], 16)
        init = sch.decompose_reduction(scale, g)
        _vectorize(sch, sch.get_loops(init)[-1], 16)
        if tiled:
            sch.unroll(sch.get_loops(scale)[-2])
        if tensorized is None:
            return sch
        run, kind, wide = tensorized
        func = _replace_block_body(sch.mod["main"], run, lambda block: _dot_body(block, kind, wide))
        return s_tir.Schedule(func if tiled else _prefetch_weights(func, run, WEIGHT_PREFETCH_BYTES))


def _prefetch_stream(func: tirx.PrimFunc, block: str, loop: str, weight: str, reads: Callable,
                     ahead: int) -> tirx.PrimFunc:
    """`func` with prefetches of the buffer `weight`, ``ahead`` bytes past what each iteration of a
    loop reads, prepended to that loop's body: the loop that iterates ``loop`` (an iter var) of
    `block`. ``reads(bindings, buffers, for_loop)`` gives (the flat element an iteration starts at,
    the bytes it reads); bindings map the block's iter var names to their values. A GEMV's weight then
    streams ahead of its multiply-adds, where the hardware prefetcher alone left each core waiting on
    memory between bursts of compute."""
    from tvm.s_tir import SBlockRealize

    bindings: dict[str, tirx.PrimExpr] = {}
    buffers: dict[str, tirx.Buffer] = {}

    def find(stmt):
        if isinstance(stmt, SBlockRealize):
            buffers.update({region.source.name: region.source for region in stmt.block.reads})
            if stmt.block.name_hint == block:
                bindings.update({v.var.name: value for v, value in zip(stmt.block.iter_vars, stmt.iter_values)})
        return None

    _rewrite(func.body, find)
    buffer, var = buffers[weight], bindings[loop]
    shape = [int(n) for n in buffer.shape]
    size, item = math.prod(shape), tvm.DataType(str(buffer.dtype)).bits // 8

    def address(flat):
        flat, indices = tirx.min(flat, size - 1), []
        for extent in reversed(shape):
            indices.insert(0, flat % extent)
            flat = flat // extent
        return tirx.call_intrin("handle", "tirx.address_of", tirx.BufferLoad(buffer, indices))

    def insert(stmt):
        if not (isinstance(stmt, tirx.For) and stmt.loop_var.same_as(var)):
            return None
        start, step = reads(bindings, buffers, stmt)
        lines = [tirx.Evaluate(prefetch(address(start + (ahead + line * LINE_BYTES) // item)))
                 for line in range(max(1, step // LINE_BYTES))]
        return tirx.For(stmt.loop_var, stmt.min, stmt.extent, stmt.kind, tirx.SeqStmt([*lines, _rewrite(stmt.body, insert)]),
                        stmt.thread_binding, stmt.annotations, stmt.step)

    return func.with_body(_rewrite(func.body, insert))


def _prefetch_panel(func: tirx.PrimFunc, block: str, panels: str, ahead: int) -> tirx.PrimFunc:
    """The float32 GEMV over packed panels ([panels, in, panel], one after the other) with the weight
    prefetched ``ahead`` bytes past each input's row of the panel (the reduction loop)."""

    def reads(bindings, buffers, loop):
        _, inputs, panel = (int(n) for n in buffers[panels].shape)
        return bindings["v_p"] * (inputs * panel) + bindings["v_k"] * panel, panel * 4

    return _prefetch_stream(func, block, "v_k", panels, reads, ahead)


def _prefetch_weights(func: tirx.PrimFunc, run: str, ahead: int) -> tirx.PrimFunc:
    """The quantized GEMV with its packed weight ``q`` ([panels, rows, 4 x panel] uint8, panels one after
    the other) prefetched ``ahead`` bytes past each run of 4 inputs (the loop around the blockized `run`)."""

    def reads(bindings, buffers, loop):
        rows, width = (int(n) for n in buffers["q"].shape[1:])
        runs, groups = int(loop.extent), int(buffers["scales"].shape[1])  # scales [panels, groups, panel]
        step = width * rows // (runs * groups)  # bytes of q one run reads: 4 x panel (q8), half that (q4)
        return bindings["v_p_o"] * (rows * width) + (bindings["v_g_o"] * runs + bindings["v_r4_o"]) * step, step

    return _prefetch_stream(func, run, "v_r4_o", "q", reads, ahead)


def schedule_rules() -> tuple[dl.ScheduleRule, ...]:
    """The CPU schedule rules, first fit wins: CpuIntMatmul for the integer quantized matmuls, CpuMatmul for
    the other matmuls, CpuElementwise for injective functions, then CpuRowReduction for the row-wise
    ones; a decode step's row-wise functions are left serial (`_many_rows`)."""
    return CpuIntMatmul(), CpuMatmul(), CpuElementwise(), CpuRowReduction()


def scheduling_passes(tvm_target) -> list:
    """Relax's CPU dispatch and legalization, then `schedule_rules` on every TIR function."""
    from tvm.relax.backend.cpu_generic import pipeline as backend

    return (backend.library_dispatch_passes(tvm_target) + backend.legalize_passes(tvm_target)
            + [dl.ApplyDefaultSchedule(*schedule_rules())])


def pipeline(tvm_target):
    """The default Relax CPU pipeline with `scheduling_passes` in place of its own scheduling."""
    from tvm.relax.backend.cpu_generic import pipeline as backend

    @tvm.transform.module_pass(opt_level=0, name="SessaCpuPipeline")
    def _pipeline(mod, _ctx):
        with tvm_target:
            seq = tvm.transform.Sequential(scheduling_passes(tvm_target) + backend.dataflow_lower_passes(tvm_target)
                                           + backend.finalize_passes(tvm_target))
            return seq(mod)

    return _pipeline


def library_name(host: str | None) -> str:
    return "model.so"


def package(executable, path, arch: str | None, host: str | None, workspace) -> None:
    """An ELF model.so for this machine or the ``host`` triple."""
    packaging.export_elf(executable, path, host, workspace)


# A parallel launch on TVM's thread pool costs 2-5 us: less than this many rows of a row-wise function
# (layer norm, GELU, a split: one model width a row) run on one core.
MIN_PARALLEL_ROWS = 64


def _many_rows(extent) -> bool:
    """Whether `extent` rows are worth a parallel launch: a prefill's batch x seq_len (two run-time sizes),
    or at least MIN_PARALLEL_ROWS; not a decode step's one row per batch row (125M q4 decode at 64:
    1.6 ms a step, 1.8 with its 75 row-wise functions each launched in parallel)."""
    if isinstance(extent, tirx.IntImm):
        return int(extent) >= MIN_PARALLEL_ROWS
    return len(tirx.analysis.undefined_vars(extent)) >= 2


def _rows(sch: s_tir.Schedule, block, leading: int) -> tirx.PrimExpr:
    """The product of the extents of `block`'s first `leading` loops."""
    extent = tirx.IntImm("int64", 1)
    for loop in sch.get_loops(block)[:leading]:
        extent = extent * sch.get(loop).extent
    return extent


class CpuElementwise(dl.ScheduleRule):
    """Injective functions of many rows (`_many_rows`): blocks that write no output inlined into their
    consumers (GELU's steps), then each output block's outer loops fused and run in parallel (a split
    writes several); the last loop is left as it is (no explicit vectorisation)."""

    def apply(self, func, target, _tunable):
        if target.kind.name != "llvm":
            return None
        sch = s_tir.Schedule(func)
        blocks = sch.get_child_blocks(sch.get_sblock("root"))
        if any(iv.iter_type != 0 for block in blocks for iv in sch.get(block).iter_vars):
            return None
        if not _many_rows(_rows(sch, blocks[-1], len(sch.get_loops(blocks[-1])) - 1)):
            return None
        scratch = sch.get(sch.get_sblock("root")).alloc_buffers
        for block in blocks[:-1]:
            if all(any(region.source.same_as(buf) for buf in scratch) for region in sch.get(block).writes):
                sch.compute_inline(block)
        scheduled = False
        for block in sch.get_child_blocks(sch.get_sblock("root")):
            loops = sch.get_loops(block)
            if len(loops) >= 2:
                sch.parallel(sch.fuse(*loops[:-1]) if len(loops) > 2 else loops[0])
                scheduled = True
        return sch if scheduled else None


class CpuRowReduction(dl.cpu.Reduction):
    """dlight's CPU Reduction (row-wise reductions: layer norm, the gain's one-column product, rows in
    parallel, each row's blocks under its loop) for functions of many rows (`_many_rows`) only."""

    def apply(self, func, target, tunable):
        sch = s_tir.Schedule(func)
        blocks = sch.get_child_blocks(sch.get_sblock("root"))
        if not blocks or not _many_rows(_rows(sch, blocks[-1], len(sch.get_loops(blocks[-1])) - 1)):
            return None
        return super().apply(func, target, tunable)


def _spatial_reduce(sch: s_tir.Schedule, block) -> bool:
    kinds = [iv.iter_type for iv in sch.get(block).iter_vars]
    return len(kinds) >= 2 and all(k == 0 for k in kinds[:-1]) and kinds[-1] == 2


def _vector_width(extent) -> int:
    try:
        extent = int(extent)
    except TypeError:
        return 1
    return next((w for w in (16, 8, 4, 2) if extent % w == 0), 1)


def _gemv_width(extent: int) -> int:
    """Columns per task of a matrix-vector product over an [in, out] weight: long contiguous runs
    of each weight row, at least 8 tasks, whole 16-lane vectors."""
    fits = [w for w in range(16, 513, 16) if extent % w == 0 and extent // w >= 8]
    return max(fits) if fits else _vector_width(extent)
