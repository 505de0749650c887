"""The forward-attention TVM kernel (ops/tvm_attention.py) against a float64 NumPy reference.

The reference is written from the kernel's docstring (spec §1 step 2), independently of the
kernel: RoPE on interleaved pairs, then a full softmax over j <= t per head, float64 throughout.
Tilings: the CPU rule's for this machine and for the default x86-64 build, and odd ones whose
tiles divide none of the shapes (several value passes, one score vector, 3 or 5 rows).
"""

from __future__ import annotations

import numpy as np
import pytest
import tvm

from sessa_export.ops import tvm_attention
from sessa_export.targets import cpu

H, HKV, HEAD_DIM = 4, 2, 24
INV_FREQ = (10000.0 ** (-np.arange(0, HEAD_DIM, 2) / HEAD_DIM)).astype(np.float32)
X86_64 = "x86_64-pc-linux-gnu"  # the triple of the x86-64 CPUs named below, whatever this machine is
# (batch, past, new rows): decode with and without a past (300: over three tiles of 128 keys), prefill
# from empty, chunked prefill
CASES = ((1, 0, 1), (2, 19, 1), (2, 300, 1), (1, 0, 37), (3, 5, 11), (1, 40, 29))
TILINGS = {
    "rule, this machine": cpu.attention_tiling(HEAD_DIM, cpu.tvm_target(cpu=cpu.NATIVE)),
    "rule, default build": cpu.attention_tiling(HEAD_DIM, cpu.tvm_target()),
    "rule, AMD Zen 4 build": cpu.attention_tiling(HEAD_DIM, cpu.tvm_target(host=X86_64, cpu="znver4")),
    "3 rows, 1 score vector, 3 x 3 value passes, decode prefetching 2 tiles ahead": tvm_attention.AttentionTiling(
        lanes=4, key_tile=5, rows=3, vector=8, score_rows=3, score_vectors=1, value_rows=1, value_vectors=1, prefetch_tiles=2),
    "5 rows, 3 score vectors of 4": tvm_attention.AttentionTiling(
        lanes=2, key_tile=7, rows=5, vector=4, score_rows=5, score_vectors=3, value_rows=5, value_vectors=2),
    "6 rows, score passes of 3 rows, value passes of 2 rows x 3 vectors": tvm_attention.AttentionTiling(
        lanes=4, key_tile=4, rows=6, vector=4, score_rows=3, score_vectors=2, value_rows=2, value_vectors=3),
}


def rope(x: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Interleaved-pair rotation of x [..., positions, d] (θ = t · inv_freq in float32, as the reference)."""
    theta = (positions.astype(np.float32)[:, None] * INV_FREQ).astype(np.float64)
    even, odd = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = even * np.cos(theta) - odd * np.sin(theta)
    out[..., 1::2] = even * np.sin(theta) + odd * np.cos(theta)
    return out


def reference(q, k, v, past_keys, past_values, past: int, use_rope: bool):
    """(out [B, S, H·d], keys [B, Hkv, P+S, d], values) in float64."""
    batch, seq, _ = q.shape
    heads = lambda x, n: np.asarray(x, np.float64).reshape(batch, seq, n, HEAD_DIM).transpose(0, 2, 1, 3)  # noqa: E731
    positions = np.arange(past, past + seq)
    qh, kh, vh = heads(q, H), heads(k, HKV), heads(v, HKV)
    if use_rope:
        qh, kh = rope(qh, positions), rope(kh, positions)
    keys = np.concatenate([np.asarray(past_keys, np.float64), kh], axis=2)
    values = np.concatenate([np.asarray(past_values, np.float64), vh], axis=2)
    out = np.zeros((batch, H, seq, HEAD_DIM))
    for h in range(H):
        scores = qh[:, h] @ keys[:, h // (H // HKV)].transpose(0, 2, 1) / np.sqrt(HEAD_DIM)
        scores[:, positions[:, None] < np.arange(past + seq)[None, :]] = -np.inf
        weights = np.exp(scores - scores.max(axis=-1, keepdims=True))
        out[:, h] = weights / weights.sum(axis=-1, keepdims=True) @ values[:, h // (H // HKV)]
    return out.transpose(0, 2, 1, 3).reshape(batch, seq, H * HEAD_DIM), keys, values


@pytest.fixture(scope="module", params=list(TILINGS))
def kernels(request):
    """The kernel with and without RoPE, built for this machine with one tiling."""
    tiling = TILINGS[request.param]
    built = {}
    for use_rope in (True, False):
        func = tvm_attention.forward_attention_kernel(H, HKV, HEAD_DIM, use_rope, "float32", tiling)
        built[use_rope] = tvm.compile(tvm.IRModule({"attn": func.with_attr("global_symbol", "attn")}),
                                      target=cpu.tvm_target(cpu=cpu.NATIVE))["attn"]
    return built


@pytest.mark.parametrize("use_rope", (True, False))
@pytest.mark.parametrize("batch, past, seq", CASES)
def test_matches_reference(kernels, batch: int, past: int, seq: int, use_rope: bool) -> None:
    rng = np.random.default_rng(100 * past + seq)
    capacity = past + seq + 3
    q = rng.standard_normal((batch, seq, H * HEAD_DIM)).astype(np.float32)
    k, v = (rng.standard_normal((batch, seq, HKV * HEAD_DIM)).astype(np.float32) for _ in range(2))
    caches = [np.full((batch, HKV, capacity, HEAD_DIM), np.nan, np.float32) for _ in range(2)]
    for cache in caches:  # valid past rows; NaN in every row the call must neither read nor write
        cache[:, :, :past] = rng.standard_normal((batch, HKV, past, HEAD_DIM))
    expected, keys, values = reference(q, k, v, caches[0][:, :, :past], caches[1][:, :, :past], past, use_rope)
    args = [tvm.runtime.tensor(a) for a in (q, k, v, INV_FREQ, *caches)]
    out = tvm.runtime.tensor(np.zeros_like(q))
    kernels[use_rope](*args, past, out)
    error = np.abs(out.numpy() - expected).max() / np.abs(expected).max()
    assert error < 1e-5, f"B={batch} P={past} S={seq} rope={use_rope}: {error:.2e}"
    for cache, rows in ((args[4].numpy(), keys), (args[5].numpy(), values)):
        np.testing.assert_allclose(cache[:, :, :past + seq], rows, rtol=1e-5, atol=1e-5)
        assert np.isnan(cache[:, :, past + seq:]).all()  # nothing written past the new rows


@pytest.mark.parametrize("prefetch_tiles", (0, 1))
def test_decode_prefetches_the_next_tile(prefetch_tiles: int) -> None:
    """The CPU rule's decode prefetches the caches a tile ahead (prefetcht0); a tiling without it has none."""
    import dataclasses

    target = cpu.tvm_target(cpu="x86-64-v3")
    tiling = dataclasses.replace(cpu.attention_tiling(HEAD_DIM, target), prefetch_tiles=prefetch_tiles)
    assert cpu.attention_tiling(HEAD_DIM, target).prefetch_tiles == 1
    func = tvm_attention.forward_attention_kernel(H, HKV, HEAD_DIM, True, "float32", tiling)
    asm = tvm.compile(tvm.IRModule({"attn": func.with_attr("global_symbol", "attn")}), target=target).mod.inspect_source("asm")
    assert ("prefetcht0" in asm) == bool(prefetch_tiles)


@pytest.mark.parametrize("mcpu, streaming", (("x86-64-v3", (16, 1)), ("skylake-avx512", (16, 1)),
                                             ("znver4", (128, 0)), ("znver3", (128, 0))))
def test_decode_streaming_follows_the_cpu(mcpu: str, streaming: tuple[int, int]) -> None:
    """Zen CPUs decode in tiles of 128 keys without prefetches, the rest in tiles of 16 with one ahead
    (DECODE_STREAMING), and the tiling built for the target carries that choice."""
    target = cpu.tvm_target(host=X86_64, cpu=mcpu)
    tiling = cpu.attention_tiling(HEAD_DIM, target)
    assert cpu.decode_streaming(target) == streaming == (tiling.key_tile, tiling.prefetch_tiles)
