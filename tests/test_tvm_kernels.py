"""FeedbackAttention TVM kernels (ops/tvm_kernels.py, and ops/tvm_feedback_prefill.py's CPU
prefill) against a float64 NumPy reference of spec §1 steps 3-5.

The reference below is written from the spec, independently of the kernels: a plain loop over
the new rows, full softmax over j < t, float64 throughout.
"""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pytest
import tvm
from tvm import relax, tirx
from tvm.script import relax as R

from sessa_export.ops import tvm_kernels as K
from sessa_export.ops.tvm_feedback_prefill import PrefillTiling, feedback_prefill_kernel
from sessa_export.ops.tvm_matmul import pack_weight
from sessa_export.targets import AARCH64_LINUX, ARCHS, build_feedback_attention, cpu, cuda

D = 64
SCALE = D**-0.5
PASTS = (0, 1, 7, 129, 1000)
SEQS = (1, 3, 64, 257)
BATCHES = (1, 3)
# max |kernel - reference| / max |reference|: fp32 accumulates in fp32; fp16 also rounds every
# solved state to fp16 before later rows read it back.
TOLERANCE = {"float32": 1e-5, "float16": 2e-3}


def reference_states(query, key, forward, gain, past_key, past_state, scale=SCALE) -> np.ndarray:
    """s of the new rows, in float64: s_t = f_t + gain_t * sum_{j<t} softmax_j(scale q_t.k_j) s_j."""
    q, k, f, g = (np.asarray(a, np.float64) for a in (query, key, forward, gain))
    batch, seq, width = q.shape
    past = past_key.shape[1]
    keys = np.concatenate([np.asarray(past_key, np.float64), k], axis=1)
    states = np.zeros((batch, past + seq, width))
    states[:, :past] = past_state
    for i in range(seq):
        t = past + i
        feedback = np.zeros((batch, width))
        if t > 0:
            logits = np.einsum("bd,bjd->bj", q[:, i], keys[:, :t]) * scale
            alpha = np.exp(logits - logits.max(axis=1, keepdims=True))
            alpha /= alpha.sum(axis=1, keepdims=True)
            feedback = np.einsum("bj,bjd->bd", alpha, states[:, :t])
        states[:, t] = f[:, i] + g[:, i] * feedback
    return states[:, past:]


def make_step(batch: int, past: int, seq: int, dtype: str, seed: int = 0) -> dict[str, np.ndarray]:
    """Random step inputs; caches hold `past` valid rows, NaN in every row the step must not read."""
    rng = np.random.default_rng(seed + 1000 * past + seq)
    capacity = past + seq + 5
    gain = rng.uniform(-0.999, 0.999, (batch, seq, 1))
    gain.flat[::4] = np.sign(gain.flat[::4]) * 0.9989  # near ±gamma_max
    step = {
        "query": 2 * rng.standard_normal((batch, seq, D)),
        "key": rng.standard_normal((batch, seq, D)),
        "forward": rng.standard_normal((batch, seq, D)),
        "gain": gain,
        "key_cache": np.full((batch, capacity, D), np.nan),
        "state_cache": np.full((batch, capacity, D), np.nan),
    }
    step["key_cache"][:, :past] = rng.standard_normal((batch, past, D))
    step["state_cache"][:, :past] = rng.standard_normal((batch, past, D))
    return {name: value.astype(dtype) for name, value in step.items()}


def run_step(lib: tvm.runtime.Executable, kernel: str, step: dict[str, np.ndarray], past: int, dev=None):
    """Run one kernel on copies of `step`; returns (state, key_cache, state_cache) after the call."""
    dev = dev or tvm.cpu()
    names = ("query", "key", "forward", "gain", "key_cache", "state_cache")
    args = [tvm.runtime.tensor(step[name], dev) for name in names]
    state = tvm.runtime.tensor(np.zeros_like(step["query"]), dev)
    lib[kernel](*args, past, state)
    return state.numpy(), args[4].numpy(), args[5].numpy()


def check_step(lib, kernel: str, batch: int, past: int, seq: int, dtype: str, scale=SCALE, dev=None) -> None:
    """One step against the reference, plus the in-place cache contract."""
    step = make_step(batch, past, seq, dtype)
    state, key_cache, state_cache = run_step(lib, kernel, step, past, dev)
    expected = reference_states(
        step["query"], step["key"], step["forward"], step["gain"],
        step["key_cache"][:, :past], step["state_cache"][:, :past], scale,
    )
    assert np.isfinite(state).all()
    error = np.abs(state.astype(np.float64) - expected).max() / np.abs(expected).max()
    assert error < TOLERANCE[dtype], f"{kernel} B={batch} P={past} S={seq} {dtype}: {error:.2e}"
    new = slice(past, past + seq)
    np.testing.assert_array_equal(key_cache[:, new], step["key"])
    np.testing.assert_array_equal(state_cache[:, new], state)
    for cache, name in ((key_cache, "key_cache"), (state_cache, "state_cache")):
        np.testing.assert_array_equal(cache[:, :past], step[name][:, :past])  # old rows untouched
        assert np.isnan(cache[:, past + seq :]).all()  # nothing written past the new rows


@pytest.fixture(scope="module", params=["float32", "float16"])
def cpu_lib(request):
    """(dtype, both kernels built for this host), once per dtype."""
    return request.param, build_feedback_attention("cpu", D, request.param)


def _cases():
    return [(past, seq, batch) for past in PASTS for seq in SEQS for batch in BATCHES]


@pytest.mark.parametrize("past", PASTS)
@pytest.mark.parametrize("seq", SEQS)
def test_cpu_kernels_match_reference(cpu_lib, past, seq):
    dtype, lib = cpu_lib
    for batch in BATCHES:
        check_step(lib, K.DECODE if seq == 1 else K.PREFILL, batch, past, seq, dtype)
        if seq == 1:  # the prefill kernel is general: it also takes single rows
            check_step(lib, K.PREFILL, batch, past, seq, dtype)


SMALL_TILES = {  # key tile wider than the row block, key columns staged in pieces, D in chunks, keys in
    # 3 slices (uneven, and more slices than tiles for short pasts)
    K.DECODE: K.FeedbackTiling(block_rows=1, key_tile=8, key_cols=16, dot_lanes=4, d_chunks=2, key_splits=3),
    K.PREFILL: K.FeedbackTiling(block_rows=4, key_tile=8, key_cols=16, dot_lanes=4, d_chunks=2),
}
UNSTAGED_TILES = {name: dataclasses.replace(t, stage_keys=False) for name, t in SMALL_TILES.items()}
# The CUDA tile geometry run by one worker: everything but the thread distribution.
CUDA_TILES = {name: dataclasses.replace(t, workers=1) for name, t in cuda.feedback_tilings(D, "float32").items()}


@pytest.mark.parametrize("tilings", [SMALL_TILES, UNSTAGED_TILES, CUDA_TILES], ids=["small", "small-unstaged", "cuda-geometry"])
def test_cpu_other_tilings_match_reference(tilings):
    tgt = cpu.tvm_target()
    kernels = K.feedback_attention_kernels(D, "float32", None, tilings)
    scheduled = {name: cpu.schedule_feedback_attention(func, tgt) for name, func in kernels.items()}
    lib = tvm.compile(K.feedback_attention_module(scheduled), target=tgt)
    for past, seq in ((0, 1), (7, 1), (300, 1), (0, 3), (0, 64), (129, 3), (1, 257)):
        check_step(lib, K.DECODE if seq == 1 else K.PREFILL, 3, past, seq, "float32")
        check_step(lib, K.PREFILL, 3, past, seq, "float32")


PREFILL_TILES = {  # the CPU prefill's register tiles at sizes that divide none of the shapes, in
    # groups of a few blocks (a prompt of 257 rows is 22 and 13 groups)
    "3 rows, 1 vector of 4 keys, 2 chunks, groups of 12 rows": PrefillTiling(
        rows=3, vector=4, score_rows=3, score_vectors=1, value_rows=3, value_vectors=1, d_chunks=2, group_rows=12),
    "5 rows, 2 vectors of 8 keys, groups of 20 rows, updates a row a pass": PrefillTiling(
        rows=5, vector=8, score_rows=5, score_vectors=2, value_rows=1, value_vectors=2, group_rows=20),
    "6 rows, scores 3 rows a pass, updates of 2 rows x 4 vectors, 2 chunks": PrefillTiling(
        rows=6, vector=4, score_rows=3, score_vectors=2, value_rows=2, value_vectors=4, d_chunks=2, group_rows=12),
}


@pytest.mark.parametrize("tiling", PREFILL_TILES.values(), ids=PREFILL_TILES.keys())
def test_cpu_prefill_tilings_match_reference(tiling):
    func = feedback_prefill_kernel(D, "float32", None, tiling)
    lib = tvm.compile(K.feedback_attention_module({K.PREFILL: func}), target=cpu.tvm_target())
    for past, seq in ((0, 1), (0, 2), (7, 1), (0, 64), (129, 3), (1, 257), (13, 37)):
        check_step(lib, K.PREFILL, 3, past, seq, "float32")


@pytest.mark.parametrize("cpu_name", ["x86-64", "x86-64-v3", "x86-64-v4"])
def test_cpu_prefill_rule_fits_any_width(cpu_name):
    """The rule's tiles are valid for odd, small and uneven model widths (a user's model), not only 768."""
    tgt = cpu.tvm_target(cpu=cpu_name)
    for width in (1, 7, 48, 64, 99, 100, 768, 2050):
        cpu.prefill_tiling(width, tgt).check(width)


def test_cpu_scale_attribute():
    """The op's `scale` attribute replaces D^-0.5."""
    lib = build_feedback_attention("cpu", D, "float32", scale=0.3)
    for past, seq in ((9, 1), (9, 20)):
        check_step(lib, K.DECODE if seq == 1 else K.PREFILL, 2, past, seq, "float32", scale=0.3)


def test_chunked_steps_equal_full_sequence():
    """Prefill, decodes and another chunk through the kernels' own caches give the full-sequence s."""
    lib = build_feedback_attention("cpu", D, "float32")
    total = 90
    whole = make_step(2, 0, total, "float32", seed=7)
    expected = reference_states(
        whole["query"], whole["key"], whole["forward"], whole["gain"],
        np.zeros((2, 0, D)), np.zeros((2, 0, D)),
    )
    key_cache, state_cache = whole["key_cache"], whole["state_cache"]
    got, past = [], 0
    for seq in (40, 1, 1, 1, 17, 1, 29):
        step = {name: whole[name][:, past : past + seq] for name in ("query", "key", "forward", "gain")}
        step.update(key_cache=key_cache, state_cache=state_cache)
        state, key_cache, state_cache = run_step(lib, K.DECODE if seq == 1 else K.PREFILL, step, past)
        got.append(state)
        past += seq
    assert past == total
    np.testing.assert_allclose(np.concatenate(got, axis=1), expected, rtol=0, atol=1e-5 * np.abs(expected).max())


def test_relax_call_tir_inplace_updates_caches():
    """The calling convention documented for Relax: call_tir_inplace aliases the caches."""
    dtype = "float32"
    tgt, kernels = cpu.scheduled_feedback_attention(D, dtype)
    bb = relax.BlockBuilder()
    gvars = {name: bb.add_func(func, name) for name, func in kernels.items()}
    b, s, c = (tirx.Var(name, "int64") for name in ("b", "s", "c"))
    params = [relax.Var(name, R.Tensor((b, s, D), dtype)) for name in ("query", "key", "forward")]
    params.append(relax.Var("gain", R.Tensor((b, s, 1), dtype)))
    params += [relax.Var(name, R.Tensor((b, c, D), dtype)) for name in ("key_cache", "state_cache")]
    params.append(relax.Var("past_len", R.Prim("int64")))
    cache_ty = R.Tensor((b, c, D), dtype)
    with bb.function("step", params):
        out = bb.emit(
            R.call_tir_inplace(
                gvars[K.PREFILL], params, inplace_indices=[4, 5, -1],
                out_ty=[cache_ty, cache_ty, R.Tensor((b, s, D), dtype)],
            )
        )
        bb.emit_func_output(out)
    vm = relax.VirtualMachine(tvm.compile(bb.get(), target=tgt), tvm.cpu())

    past, seq = 5, 4
    step = make_step(2, past, seq, dtype)
    names = ("query", "key", "forward", "gain", "key_cache", "state_cache")
    args = [tvm.runtime.tensor(step[name]) for name in names]
    key_cache, state_cache, state = vm["step"](*args, past)
    expected = reference_states(
        step["query"], step["key"], step["forward"], step["gain"],
        step["key_cache"][:, :past], step["state_cache"][:, :past],
    )
    np.testing.assert_allclose(state.numpy(), expected, rtol=0, atol=1e-5 * np.abs(expected).max())
    np.testing.assert_array_equal(args[5].numpy()[:, past : past + seq], state.numpy())  # in place
    np.testing.assert_array_equal(args[4].numpy()[:, past : past + seq], step["key"])
    np.testing.assert_array_equal(key_cache.numpy(), args[4].numpy())
    np.testing.assert_array_equal(state_cache.numpy(), args[5].numpy())


def test_aarch64_cross_build():
    ex = build_feedback_attention("cpu", D, "float16", host=AARCH64_LINUX)
    asm = ex.mod.inspect_source("asm")
    assert "fmla" in asm  # NEON multiply-add: the dot products and accumulators vectorised
    assert all(name in asm for name in (K.DECODE, K.PREFILL))


GPU_KERNELS = (
    "feedback_attention_decode_kernel",
    "feedback_attention_prefill_kernel",  # the key append
    "feedback_attention_prefill_kernel_1",  # the solve
)


@pytest.mark.parametrize("arch", ARCHS)
def test_cuda_build_holds_device_code(arch):
    ex = build_feedback_attention("cuda", D, "float16", arch=arch)
    (device,) = ex.mod.imports
    assert device.kind == "cuda"
    source = device.inspect_source()
    assert all(f"void __launch_bounds__({cuda.THREADS}) {name}(" in source for name in GPU_KERNELS)
    assert "__shared__" in source and "__syncthreads()" in source
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc not found: CUDA source checked, not compiled")
    from tvm.support import nvcc

    with cuda.tvm_target(arch):
        ptx = bytes(nvcc.compile_cuda(source, target_format="ptx", arch=arch, compiler="nvcc")).decode()
    assert f".target {arch}" in ptx
    assert all(f".entry {name}(" in ptx for name in GPU_KERNELS)


def test_metal_build_holds_shader_source():
    ex = build_feedback_attention("metal", D, "float16")
    (device,) = ex.mod.imports
    assert device.kind == "metal"
    source = device.inspect_source()
    assert all(f"kernel void {name}(" in source for name in GPU_KERNELS)
    assert "threadgroup half key_tile_shared" in source and "threadgroup_barrier" in source


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_cuda_kernels_match_reference(dtype):
    dev = tvm.cuda(0)
    if not dev.exist:
        pytest.skip("no CUDA device")
    lib = build_feedback_attention("cuda", D, dtype, arch="sm_" + dev.compute_version.replace(".", ""))
    for past, seq, batch in _cases():
        check_step(lib, K.DECODE if seq == 1 else K.PREFILL, batch, past, seq, dtype, dev=dev)
        if seq == 1:
            check_step(lib, K.PREFILL, batch, past, seq, dtype, dev=dev)


# -- linear layers on CPU: panel-packed weights (targets/cpu.py) ---------------------------------
@pytest.mark.parametrize("cpu_name", [None, "native"], ids=["default build", "this machine"])
@pytest.mark.parametrize("columns, inputs", [(96, 64), (48, 64), (40, 64), (7, 64), (160, 2048)],
                         ids=["panel32", "panel16", "panel8", "plain", "panel32-groups"])
def test_cpu_linear_layout_matches_numpy(columns, inputs, cpu_name):
    """x @ W^T + b as the CPU build emits it, for decode (S = 1) and a prefill whose rows are not
    a multiple of the row tile (4 rows of 16 columns in the AVX2 default build, 8 of 32 in a native
    AVX-512 one), against float64 NumPy; 2048 inputs make panels of 256 KB, a prefill group
    (cpu.panel_group) then holds fewer than all of them."""
    from sessa_export.to_tvm import CompileTarget

    if columns % 32 == 0:  # float32 panels of 32 columns
        assert (cpu.panel_group(columns // 32, inputs * 32 * 4) < columns // 32) == (inputs == 2048)
    rng = np.random.default_rng(columns)
    weight = rng.standard_normal((columns, inputs)).astype("float32")
    bias = rng.standard_normal(columns).astype("float32")
    panel = cpu.weight_panel(columns)
    seq = tirx.Var("seq", "int64")
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([1, seq, inputs], "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            if panel is None:
                y = bb.emit(relax.op.matmul(x, relax.const(np.ascontiguousarray(weight.T))))
                y = bb.emit(relax.op.add(y, relax.const(bias)))
            else:
                y = cpu.emit_linear(bb, x, relax.const(pack_weight(weight, panel)),
                                    relax.const(bias.reshape(-1, panel)), [1, seq, columns])
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    target = CompileTarget("cpu", cpu=cpu_name).tvm_target()
    vm = relax.VirtualMachine(tvm.compile(bb.get(), target=target, relax_pipeline=cpu.pipeline(target)), tvm.cpu())
    for rows in (1, 13):
        data = rng.standard_normal((1, rows, inputs)).astype("float32")
        got = vm["main"](tvm.runtime.tensor(data)).numpy()
        expected = data.astype(np.float64) @ weight.T.astype(np.float64) + bias
        assert got.shape == (1, rows, columns)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)


def test_register_tiles_keep_the_accumulators_in_half_the_registers():
    """Rows of a register tile of 32 columns: 8 with AVX-512 (2 of its 32 registers a row), 2 with AVX2
    and NEON (4 and 8 of their 16 and 32 registers a row); narrower tiles take more rows. A prefill
    tile over a 32-column panel keeps TILE_ROWS = 4 rows at least: AVX2 and NEON take 4 rows of 16 of
    its columns, AVX-512 the whole panel; a panel of one vector stays whole."""
    avx512, avx2, neon = (cpu.tvm_target(cpu="x86-64-v4"), cpu.tvm_target(cpu="x86-64-v3"),
                          cpu.tvm_target(host="aarch64-linux-gnu"))
    assert [cpu.register_rows(avx512, n, cpu.ROW_TILE) for n in (32, 16, 8)] == [8, 8, 8]
    assert [cpu.register_rows(avx2, n, cpu.ROW_TILE) for n in (32, 16, 8)] == [2, 4, 8]
    assert [cpu.register_rows(neon, n, cpu.ROW_TILE) for n in (32, 16, 8)] == [2, 4, 8]
    assert [cpu.register_tile(avx512, n) for n in (32, 16)] == [(8, 32), (8, 16)]
    assert [cpu.register_tile(avx2, n) for n in (32, 16, 8)] == [(4, 16), (4, 16), (8, 8)]
    assert [cpu.register_tile(neon, n) for n in (32, 16, 8, 4)] == [(4, 16), (4, 16), (8, 8), (8, 4)]


def test_cpu_decode_linear_prefetches_its_panels():
    """The decode body's GEMV (one row, a static shape) over packed panels: right, and its weight
    prefetched ahead of the multiply-adds (prefetcht0)."""
    rng = np.random.default_rng(1)
    weight, columns = rng.standard_normal((96, 64)).astype("float32"), 96
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([1, 1, 64], "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(cpu.emit_linear(bb, x, relax.const(pack_weight(weight, 32)), None, [1, 1, columns]))
        bb.emit_func_output(out)
    target = cpu.tvm_target(cpu="x86-64-v3")
    executable = tvm.compile(bb.get(), target=target, relax_pipeline=cpu.pipeline(target))
    assert "prefetcht0" in "".join(m.inspect_source("asm") for m in executable.mod.imports)
    data = rng.standard_normal((1, 1, 64)).astype("float32")
    got = relax.VirtualMachine(executable, tvm.cpu())["main"](tvm.runtime.tensor(data)).numpy()
    np.testing.assert_allclose(got, data.astype(np.float64) @ weight.T.astype(np.float64), rtol=1e-5, atol=1e-4)


def test_fast_exp_matches_numpy():
    """ops/tvm_fastmath.exp (the CPU attention's vectorisable exp) against float64 NumPy."""
    from tvm import te

    from sessa_export.ops import tvm_fastmath

    args = np.concatenate([np.linspace(-90.0, 88.0, 20001), [0.0, -1e-8, 1e-8, -87.0, -87.5, -3.4e38, 88.0, 100.0]])
    x = te.placeholder((args.size,), "float32", name="x")
    y = te.compute(x.shape, lambda i: tvm_fastmath.exp(x[i]), name="y")
    lib = tvm.compile(tvm.IRModule({"main": te.create_prim_func([x, y])}), target=cpu.tvm_target())
    out = tvm.runtime.tensor(np.zeros(args.size, "float32"))
    lib["main"](tvm.runtime.tensor(args.astype("float32")), out)
    got, x32 = out.numpy().astype(np.float64), args.astype("float32").astype(np.float64)
    normal = (x32 >= -87.0) & (x32 <= 88.0)
    expected = np.exp(x32[normal])
    assert np.max(np.abs(got[normal] - expected) / expected) < 3e-7
    assert (got[x32 < -87.0] == 0).all()  # underflow is exactly zero, never a NaN or a denormal
    np.testing.assert_allclose(got[x32 > 88.0], np.exp(88.0), rtol=3e-7)  # clamped
