"""Helpers shared by the back-end test files: step-by-step parity with PyTorch and CLI error checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from typer.testing import CliRunner

from sessa_export.cli import app
from sessa_export.runtime import TorchRunner

ATOL = 1e-4  # the issues' fp32 bar: max |back end - PyTorch| on logits and on every state tensor
BUNDLED_CAPACITY = 256  # positions of the bundled model's CPU libraries that test files share (conftest.bundled_library)

# Small random models covering the cases every back end must get right.
CONFIGS = {
    "H1": dict(n_heads=1, n_layers=2),
    "GQA-mlp-tied": dict(n_heads=4, n_kv_heads=2, mlp_ratio=2.0, tie_embeddings=True),
    "rope-off": dict(n_heads=2, n_layers=3, use_forward_rope=False),
}
# Uneven chunks: t = 0 alone (P = 0, S = 1), single tokens, and chunks over one and several 64-row
# blocks of the ONNX function's triangular solve (70 > 64, 300 > 256), over two of the ONNX forward
# attention's 256-row blocks (300), and over several of the TVM kernels' blocks.
CHUNKS = [1, 1, 70, 1, 300, 3, 1, 50]


def max_abs(got: np.ndarray, ref: np.ndarray) -> float:
    assert got.shape == ref.shape, f"shape {got.shape} != reference {ref.shape}"
    assert np.isfinite(got).all(), "non-finite values in the back end's output"
    return float(np.max(np.abs(got.astype(np.float64) - ref.astype(np.float64)))) if ref.size else 0.0


def assert_states_close(ref, ref_state, got, got_state, where: str) -> None:
    ref_arrays, got_arrays = ref.state_arrays(ref_state), got.state_arrays(got_state)
    assert set(got_arrays) == set(ref_arrays)
    for name, want in ref_arrays.items():
        err = max_abs(got_arrays[name], want)
        assert err <= ATOL, f"{name} {where}: max abs error {err:.3g} > {ATOL}"


def run_parity(model, got, ids: np.ndarray, steps: list[int]) -> np.ndarray:
    """Feed ids [B, T] to PyTorch (SessaLM.step) and runner `got` in the same chunks; check every step."""
    assert sum(steps) == ids.shape[1]
    ref = TorchRunner(model)
    ref_state, got_state = ref.empty_state(ids.shape[0]), got.empty_state(ids.shape[0])
    logits, pos = [], 0
    for index, size in enumerate(steps):
        chunk = ids[:, pos:pos + size]
        ref_logits, ref_state = ref.step(chunk, ref_state)
        got_logits, got_state = got.step(chunk, got_state)
        err = max_abs(got_logits, ref_logits)
        assert err <= ATOL, f"logits at step {index} (positions {pos}..{pos + size - 1}): max abs error {err:.3g}"
        logits.append(got_logits)
        pos += size
        if index == 0:
            assert_states_close(ref, ref_state, got, got_state, f"after step 0 ({size} positions)")
    # Comparing the whole state at the end covers every row written by every step.
    assert_states_close(ref, ref_state, got, got_state, f"after all {len(steps)} steps")
    return np.concatenate(logits, axis=1)


def cli(*args):
    """Run the CLI in-process; stdout and stderr are kept apart."""
    return CliRunner().invoke(app, [str(a) for a in args])


def compile_bundled(out: Path, *options) -> Path:
    """`sessa-export compile` of the bundled model for --target cpu at capacity BUNDLED_CAPACITY with
    `options` into `out`, which it returns; a failed compile fails the test with the CLI's output."""
    from sessa_export.data import BUNDLED_MODEL

    result = cli("compile", BUNDLED_MODEL, "--target", "cpu", "-o", out, "--max-len", BUNDLED_CAPACITY, *options)
    assert result.exit_code == 0, f"compile failed: {result.output}\n{result.exception!r}"
    return out


def assert_clean_error(result, *names: str) -> str:
    """Exit code 2, a one-line message naming each of `names`, no traceback."""
    message = result.stderr
    assert result.exit_code == 2, f"exit {result.exit_code}: {result.output}\n{result.exception!r}"
    assert "Traceback" not in result.output and "Traceback" not in message
    assert message.startswith("error:"), message
    for name in names:
        assert name in message, f"{name!r} not in: {message}"
    return message


def forward_logits(model, ids: np.ndarray) -> np.ndarray:
    """The PyTorch reference's full-sequence forward (the parallel solve, not the step path)."""
    with torch.inference_mode():
        return model(torch.from_numpy(ids)).float().numpy()


def check_prefill_then_decode(model, runner) -> None:
    """A 256-token prefill, then 256 single-token decodes, batch 2: every step against PyTorch."""
    ids = np.random.default_rng(1).integers(0, model.config.vocab_size, (2, 512))
    run_parity(model, runner, ids, [256] + [1] * 256)


def check_long_prefill(model, runner, tokens: int = 600) -> None:
    """One prefill of `tokens` from an empty state against PyTorch's full-sequence forward, batch 2."""
    ids = np.random.default_rng(3).integers(0, model.config.vocab_size, (2, tokens))
    got, _ = runner.step(ids, runner.empty_state(2))
    err = max_abs(got, forward_logits(model, ids))
    assert err <= ATOL, f"{tokens}-token prefill logits: max abs error {err:.3g}"


def check_chunked_prefill(model, runner) -> None:
    """CHUNKS steps against PyTorch's steps, and their logits against its full-sequence forward."""
    ids = np.random.default_rng(2).integers(0, model.config.vocab_size, (2, sum(CHUNKS)))
    chunked = run_parity(model, runner, ids, CHUNKS)
    err = max_abs(chunked, forward_logits(model, ids))  # chunking must not change the result
    assert err <= ATOL, f"chunked logits vs full-sequence forward: max abs error {err:.3g}"


# Every back end runs each of these on each CONFIGS model (its test file parametrizes over both).
PARITY_CHECKS = {
    "prefill_256_then_decode_256": check_prefill_then_decode,
    "chunked_prefill_matches_full_forward": check_chunked_prefill,
    "long_prefill_in_blocks": check_long_prefill,  # past the ONNX forward attention's 256-row blocks
}


def models_per_config(make_lm) -> dict:
    """One random model per CONFIGS entry (fixed seeds), for the back ends' parity tests."""
    return {name: make_lm(seed=10 + i, std=0.2, **fields) for i, (name, fields) in enumerate(CONFIGS.items())}


def assert_written_in_place(runner, ids: np.ndarray):
    """A prefill of 10 tokens, then one decode step on an in-place runner: the step keeps the caches'
    memory, leaves rows < 10 as they were and writes row 10. Returns the state after it and the pointers."""
    _, state = runner.step(ids[:, :10], runner.empty_state(ids.shape[0]))
    pointers = {name: value.data_ptr() for name, value in state.values.items()}
    before = {name: array.copy() for name, array in state.arrays.items()}
    _, after = runner.step(ids[:, 10:11], state)
    assert {name: value.data_ptr() for name, value in after.values.items()} == pointers, "a step moved the caches"
    assert after.arrays is state.arrays and after.past == 11
    for name, array in after.arrays.items():
        axis = runner.layout.position_axis(runner.layout.field_of(name))
        assert np.array_equal(np.take(array, range(10), axis), np.take(before[name], range(10), axis)), name
        assert not np.array_equal(np.take(array, [10], axis), np.take(before[name], [10], axis)), f"{name}: row 10"
    return after, pointers
