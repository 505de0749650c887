"""In-place states (TVM caches, ONNX `--state inplace` caches): which may be stepped, and from which
threads (runtime/cache_writes.py). Stepping an earlier state again is allowed and gives the same
logits; a state whose rows a later step from an earlier state overwrote is refused (it gave wrong
logits, off by up to 1.96, before); `copy()` forks; threads may share a runner."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from sessa_export.errors import SessaExportError
from sessa_export.runtime import OrtRunner
from sessa_export.runtime.tvm_runner import TvmRunner
from sessa_export.state import INPLACE
from sessa_export.to_onnx import export_onnx
from sessa_export.to_tvm import CompileTarget, compile_graph
from sessa_export.tracer import trace

pytestmark = pytest.mark.usefixtures("one_tvm_thread")


@pytest.fixture(scope="module")
def runners(make_lm, tmp_path_factory):
    model = make_lm(seed=9, std=0.2, vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2)
    root = tmp_path_factory.mktemp("lineage")
    graph = trace(model)
    return {"tvm": TvmRunner(compile_graph(graph, root / "tvm", CompileTarget("cpu"), max_len=64), threads=1),
            "onnx-inplace": OrtRunner(export_onnx(graph, root / "onnx", state=INPLACE), threads=1)}


IDS = np.random.default_rng(3).integers(0, 64, (1, 12))


@pytest.mark.parametrize("name", ["tvm", "onnx-inplace"])
def test_an_earlier_state_may_be_stepped_again(runners, name):
    runner = runners[name]
    _, prefilled = runner.step(IDS[:, :8], runner.empty_state(1))
    first, _ = runner.step(IDS[:, 8:9], prefilled)
    again, state = runner.step(IDS[:, 8:9], prefilled)  # a retry from the same state
    assert np.array_equal(first, again)
    runner.step(IDS[:, 9:10], state)  # and the newest state goes on


@pytest.mark.parametrize("name", ["tvm", "onnx-inplace"])
def test_a_branch_overwritten_by_another_is_refused_and_copy_forks(runners, name):
    runner = runners[name]
    _, prefilled = runner.step(IDS[:, :8], runner.empty_state(1))
    fork = prefilled.copy()
    _, branch_a = runner.step(IDS[:, 8:9], prefilled)
    _, branch_b = runner.step(IDS[:, 9:10], prefilled)  # writes row 8 again: branch_a's row 8 is gone
    with pytest.raises(SessaExportError, match="overwritten by a step from an earlier state"):
        runner.step(IDS[:, 10:11], branch_a)
    runner.step(IDS[:, 10:11], branch_b)
    # the copy is its own caches: branch a's continuation from it is right
    want, _ = runner.step(IDS[:, 9:10], runner.step(IDS[:, 8:9], runner.step(IDS[:, :8], runner.empty_state(1))[1])[1])
    _, forked = runner.step(IDS[:, 8:9], fork)
    got, _ = runner.step(IDS[:, 9:10], forked)
    assert np.allclose(got, want, atol=1e-6)


@pytest.mark.parametrize("name", ["tvm", "onnx-inplace"])
def test_threads_may_share_a_runner(runners, name):
    runner = runners[name]

    def generate(seed: int) -> np.ndarray:
        ids = np.random.default_rng(seed).integers(0, 64, (1, 20))
        logits, state = runner.step(ids[:, :10], runner.empty_state(1))
        outs = [logits]
        for t in range(10, 20):
            logits, state = runner.step(ids[:, t:t + 1], state)
            outs.append(logits)
        return np.concatenate(outs, axis=1)

    alone = [generate(seed) for seed in range(4)]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(generate, range(4)))
    for a, b in zip(alone, together):
        assert np.allclose(a, b, atol=1e-6)


def cache_arrays(state) -> list[np.ndarray]:
    """The state's caches as numpy arrays over their memory."""
    return list(state.arrays.values()) if hasattr(state, "arrays") else [np.from_dlpack(c) for c in state.caches]


def poison(state) -> None:
    """NaN in every row of the state's caches (what an earlier sequence might leave behind)."""
    if hasattr(state, "arrays"):
        for array in state.arrays.values():
            array.fill(np.nan)
    else:
        for cache in state.caches:
            cache.copyfrom(np.full(cache.shape, np.nan, cache.dtype))


@pytest.mark.parametrize("name", ["tvm", "onnx-inplace"])
def test_a_dropped_state_s_buffers_serve_the_next_sequence_alike(runners, name):
    runner = runners[name]
    want, state = runner.step(IDS[:, :8], runner.empty_state(1))
    pointers = [a.ctypes.data for a in cache_arrays(state)]
    poison(state)
    del state  # the last state over those caches: they go back to the runner's pool
    reused = runner.empty_state(1)
    assert [a.ctypes.data for a in cache_arrays(reused)] == pointers
    got, _ = runner.step(IDS[:, :8], reused)
    assert np.array_equal(got, want)


@pytest.mark.parametrize("name", ["tvm", "onnx-inplace"])
def test_a_held_state_s_buffers_are_not_handed_out(runners, name):
    runner = runners[name]
    want, held = runner.step(IDS[:, :8], runner.empty_state(1))
    held_pointers = {a.ctypes.data for a in cache_arrays(held)}
    others = [runner.empty_state(1) for _ in range(3)]
    assert not held_pointers & {a.ctypes.data for s in others for a in cache_arrays(s)}
    for other in others:
        runner.step(IDS[:, 4:12], other)
    got, _ = runner.step(IDS[:, 8:9], held)
    check, _ = runner.step(IDS[:, 8:9], runner.step(IDS[:, :8], runner.empty_state(1))[1])
    assert np.array_equal(got, check)
