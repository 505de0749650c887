"""The q8 / q4 kernels of ops/tvm_dequant_matmul.py, as targets/cpu.py schedules them, against float64 NumPy.

The references are written here from the storage format (values, zero points, scales), not from the
kernels: the weight a stored (q, scales) pair stands for is rebuilt by unpacking the bytes by hand,
and the integer kernels' activation quantization (int8 per group of G inputs, scale max|x| / 127)
either is exact (activations on that grid: the kernel must then match to float32 rounding) or is
bounded (random activations: the error of each output is at most Σ_g scale_x[g] / 2 · Σ_{k∈g} |w[k]|).
Shapes are not multiples of the SIMD tiles (3 groups, 80 or 40 columns: panels of 16 and 8), group
sizes 32 and 128, batches 1 and 3, decode and prefill (rows past the last whole tile), on every
x86-64 instruction path this machine runs (AVX-512 VNNI, AVX-VNNI, AVX2, none); the AArch64 paths
are checked in their object code.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import tvm
from tvm import tirx
from tvm.s_tir import dlight as dl

from sessa_export.ops import tvm_dequant_matmul as dq
from sessa_export.targets import AARCH64_LINUX, cpu

MODES = ("q8", "q4")
# (K, N, G): 3 groups each; N = 80 and 40 fill panels of 16 and 8 columns (not of 32)
SHAPES = [(96, 80, 32), (384, 40, 128)]
# --cpu -> the instruction of its path (in the object code), for the paths this machine can run
X86_PATHS = {"native": None, "alderlake": "vpdpbusd", "x86-64-v3": "vpmaddubsw", "x86-64-v2": None}
NEEDS = {"alderlake": "avx_vnni", "x86-64-v3": "avx2"}


def stored_weight(q: np.ndarray, scales: np.ndarray, bits: int, group: int) -> np.ndarray:
    """W [N, K] in float64 from the stored bytes, unpacked element by element (module docstring of dq)."""
    count, runs, width = q.shape
    panel = width // 4
    k = runs * 4 * (2 if bits == 4 else 1)
    weight = np.zeros((count * panel, k))
    for p in range(count):
        for j in range(panel):
            for kk in range(k):
                if bits == 8:
                    value = int(q[p, kk // 4, 4 * j + kk % 4]) - 128
                else:
                    byte = int(q[p, kk // 8, 4 * j + kk % 4])
                    value = ((byte >> 4) if (kk // 4) % 2 else (byte & 15)) - 8
                weight[p * panel + j, kk] = value * float(scales[p, kk // group, j])
    return weight


def schedule(func: tirx.PrimFunc, target) -> tvm.IRModule:
    """`func` scheduled by the CPU rules (`cpu.schedule_rules`: the first that fits)."""
    mod = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
    with target:
        mod = dl.ApplyDefaultSchedule(*cpu.schedule_rules())(mod)
    assert mod["main"].attrs and mod["main"].attrs["tirx.is_scheduled"], "no CPU rule scheduled the kernel"
    return mod


def int_inputs(rng, batch: int, rows: int, k: int, group: int, exact: bool) -> np.ndarray:
    """x [B, S, K]: on the int8 grid of each group when `exact` (peak 127 · 2^-5), else random."""
    if not exact:
        return (rng.standard_normal((batch, rows, k)) * rng.uniform(0.1, 3.0, (batch, rows, k // group)).repeat(group, -1)
                ).astype(np.float32)
    values = rng.integers(-127, 128, (batch, rows, k))
    values[..., ::group] = rng.choice([-127, 127], (batch, rows, k // group))
    return (values * 2.0**-5).astype(np.float32)


def activation_bound(x: np.ndarray, weight: np.ndarray, group: int) -> np.ndarray:
    """max |error| per output of quantizing x to int8 per group: Σ_g (max|x_g| / 127) / 2 · Σ_{k∈g} |w[n, k]|."""
    b, s, k = x.shape
    step = np.abs(x.reshape(b, s, k // group, group)).max(-1) / 127  # [B, S, G]
    per_group = np.abs(weight).reshape(weight.shape[0], k // group, group).sum(-1)  # [N, G]
    return (step / 2) @ per_group.T  # [B, S, N]


# decode: one row; prefill: tiles of INT_ROW_TILE rows, S not a multiple of the tile (13 = 3 tiles + 1, 5)
ROWS = {"decode": (None, (1,)), "prefill": (cpu.INT_ROW_TILE, (13, 5))}


@pytest.mark.parametrize("step", ROWS)
@pytest.mark.parametrize("cpu_name", list(X86_PATHS))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"k{s[0]}n{s[1]}g{s[2]}")
@pytest.mark.parametrize("mode", MODES)
def test_int_matmul_matches_numpy(mode, shape, cpu_name, step):
    """Integer dot products over int8 activations, the scales once per group after: decode (S = 1)
    and prefill (row tiles, the last one partly past S)."""
    need = NEEDS.get(cpu_name)
    if need and need not in cpu.running_cpu_features():
        pytest.skip(f"this CPU lacks {need}")
    k, n, group = shape
    bits = dq.MODES[mode].bits
    rng = np.random.default_rng(k + n + bits)
    panel = cpu.weight_panel(n)
    q, scales = dq.quantize(rng.standard_normal((n, k)).astype(np.float32), mode, panel, group)
    weight = stored_weight(q, scales, bits, group)
    bias = rng.standard_normal((n // panel, panel)).astype(np.float32)
    target = cpu.tvm_target(cpu=cpu_name)
    row_tile, row_counts = ROWS[step]
    lib = tvm.compile(schedule(dq.int_matmul_kernel(k, n, mode, True, panel, group, row_tile), target), target=target)
    instruction = X86_PATHS[cpu_name] or ("vpdpbusd" if cpu.dot_instruction(target) == "vnni512" else None)
    if instruction:
        asm = lib.mod.inspect_source("asm")
        assert instruction in asm, f"{cpu_name}: no {instruction} in the kernel"
        if step == "decode":  # the GEMV's weight stream is prefetched ahead of the products
            assert "prefetcht0" in asm, f"{cpu_name}: the weights are not prefetched"
    for batch, rows in ((1, row_counts[0]), (3, row_counts[-1])):
        for exact in (True, False):
            x = int_inputs(rng, batch, rows, k, group, exact)
            y = tvm.runtime.tensor(np.zeros((batch, rows, n // panel, panel), np.float32))
            lib["main"](*(tvm.runtime.tensor(a) for a in (x, q, scales, bias)), y)
            got = y.numpy().reshape(batch, rows, n)
            expected = x.astype(np.float64) @ weight.T + bias.reshape(-1)
            if exact:
                np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6 * np.abs(expected).max())
            else:
                slack = activation_bound(x, weight, group) + 1e-5 * np.abs(expected).max()
                assert (np.abs(got - expected) <= slack).all(), np.abs(got - expected).max()


@pytest.mark.parametrize("shape", SHAPES + [(96, 96, 32)], ids=lambda s: f"k{s[0]}n{s[1]}g{s[2]}")
@pytest.mark.parametrize("mode", MODES)
def test_dequant_matmul_matches_numpy(mode, shape):
    """Prefill without a dot-product instruction: float32 matmul with each weight decoded in the
    reduction, rows not a multiple of the tile."""
    k, n, group = shape
    rng = np.random.default_rng(k * n)
    panel = cpu.weight_panel(n)
    q, scales = dq.quantize(rng.standard_normal((n, k)).astype(np.float32), mode, panel, group)
    weight = stored_weight(q, scales, dq.MODES[mode].bits, group)
    target = cpu.tvm_target(cpu="native")
    lib = tvm.compile(schedule(dq.dequant_matmul_kernel(k, n, mode, False, panel, group), target), target=target)
    for batch, rows in ((1, 13), (3, 5)):
        x = rng.standard_normal((batch, rows, k)).astype(np.float32)
        y = tvm.runtime.tensor(np.zeros((batch, rows, n // panel, panel), np.float32))
        lib["main"](*(tvm.runtime.tensor(a) for a in (x, q, scales)), y)
        expected = x.astype(np.float64) @ weight.T
        np.testing.assert_allclose(y.numpy().reshape(batch, rows, n), expected, rtol=0,
                                   atol=1e-5 * np.abs(expected).max())


@pytest.mark.parametrize("bits", [8, 4])
def test_weights_quantize_alike_in_any_chunks(bits, monkeypatch):
    """quantize_groups quantizes in chunks of rows on parallel threads: chunks of one row and of 3 rows
    (the last one short) give the bytes of one pass over the whole weight; q8 is absmax per group."""
    rng = np.random.default_rng(5)
    weight = (rng.standard_normal((10, 64)) * rng.exponential(1.0, (10, 1))).astype(np.float32)
    weight[3, :32] = 0.0  # an all-zero group
    monkeypatch.setattr(dq, "QUANTIZE_CHUNK", weight.size)
    whole = dq.quantize_groups(weight, bits)
    for rows in (1, 3):
        monkeypatch.setattr(dq, "QUANTIZE_CHUNK", rows * weight.shape[1])
        q, scale = dq.quantize_groups(weight, bits)
        assert np.array_equal(q, whole[0]) and np.array_equal(scale, whole[1]), f"chunks of {rows} rows"
    if bits == 8:
        groups = weight.reshape(10, 2, 32).astype(np.float64)
        stored = (np.abs(groups).max(axis=-1) / 127).astype(np.float16).astype(np.float64)
        stored[stored == 0] = 1.0
        assert np.array_equal(whole[1], stored.astype(np.float32))
        assert np.array_equal(whole[0], np.clip(np.rint(groups / stored[..., None]), -127, 127).reshape(10, 64))


@pytest.mark.parametrize("group", [32, 128])
@pytest.mark.parametrize("mode", MODES)
def test_embedding_rows_match_numpy(mode, group):
    """One row dequantized per token (ids clipped into the table), batch 3: 72 rows, a prefill's (a decode
    step's few rows are left serial, unscheduled: cpu._many_rows)."""
    from tvm import te

    vocab, width = 37, 3 * group
    rng = np.random.default_rng(group)
    rows, scales = dq.quantize_rows(rng.standard_normal((vocab, width)).astype(np.float32), mode, group)
    bits = dq.MODES[mode].bits
    table = np.zeros((vocab, width))
    for t in range(vocab):
        for d in range(width):
            byte = int(rows[t, d if bits == 8 else d // 2])
            value = byte - 128 if bits == 8 else ((byte >> 4) if d % 2 else (byte & 15)) - 8
            table[t, d] = value * float(scales[t, d // group])
    ids_t = te.placeholder((3, 24), "int64", name="ids")
    rows_t = te.placeholder(rows.shape, "uint8", name="rows")
    scales_t = te.placeholder(scales.shape, "float16", name="scales")
    out = dq.embedding(ids_t, rows_t, scales_t, mode, group)
    target = cpu.tvm_target(cpu="native")
    lib = tvm.compile(schedule(te.create_prim_func([ids_t, rows_t, scales_t, out]), target), target=target)
    ids = rng.integers(0, vocab, (3, 24))
    ids[0, 0], ids[1, 1] = vocab + 5, -3  # clipped like the float path's take(mode="clip")
    got = tvm.runtime.tensor(np.zeros((3, 24, width), np.float32))
    lib["main"](*(tvm.runtime.tensor(a) for a in (ids, rows, scales)), got)
    np.testing.assert_allclose(got.numpy(), table[np.clip(ids, 0, vocab - 1)], rtol=0, atol=1e-6)


@pytest.mark.parametrize("cpu_name,instruction", [("generic", None), ("cortex-a76", "sdot"), ("neoverse-v1", "usdot")])
@pytest.mark.parametrize("mode", MODES)
def test_aarch64_object_code_has_the_dot_product(mode, cpu_name, instruction):
    """An AArch64 build's decode kernel uses sdot (dot product) / usdot (i8mm) when --cpu has them, and
    so does its prefill kernel (the builder takes it only then: `quantized_row_tile`)."""
    if shutil.which(f"{AARCH64_LINUX}-g++") is None:
        pytest.skip(f"{AARCH64_LINUX}-g++ not found (apt-get install g++-aarch64-linux-gnu)")
    target = cpu.tvm_target(host=AARCH64_LINUX, cpu=cpu_name)
    lib = tvm.compile(schedule(dq.int_matmul_kernel(96, 64, mode, False, 32, 32), target), target=target)
    asm = lib.mod.inspect_source("asm")
    dots = {name for name in ("sdot", "usdot") if f"\t{name}\t" in asm}
    assert dots == ({instruction} if instruction else set()), dots
    assert ("\tprfm\t" in asm) == bool(dots)  # the weight stream prefetched on the dot-product paths
    assert "smlal" in asm or dots  # plain NEON widening multiply-adds without the dot product
    assert (cpu.quantized_row_tile(target, mode) is not None) == bool(dots)
    if dots:
        prefill = tvm.compile(schedule(dq.int_matmul_kernel(96, 64, mode, False, 32, 32, cpu.INT_ROW_TILE), target),
                              target=target)
        assert f"\t{instruction}\t" in prefill.mod.inspect_source("asm")


@pytest.mark.parametrize("cpu_name,integer", [("x86-64-v3", {"q8", "q4"}), ("znver3", {"q4"}), ("znver4", {"q8", "q4"}),
                                              ("x86-64", set())])
def test_the_prefill_kernel_follows_the_cpu(cpu_name, integer):
    """A quantized prefill runs on integer dot products where the CPU has them, but q8 on a Zen 3 (AVX2
    only) decodes its weights into the float32 matmul (cpu.FLOAT_PREFILL); decode is integer on all."""
    target = cpu.tvm_target(cpu=cpu_name)
    for mode in MODES:
        prefill, _ = cpu.quantized_matmul_kernel(768, 768, mode, False, 32, False, target)
        decode, _ = cpu.quantized_matmul_kernel(768, 768, mode, False, 32, True, target)
        assert prefill.startswith("int_matmul_prefill" if mode in integer else "dequant_matmul_prefill"), prefill
        assert decode.startswith("int_matmul_decode"), decode
