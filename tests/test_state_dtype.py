"""The state's precision (`export` / `compile --state-dtype float16|bfloat16`) against the float32 reference.

A 16-bit state is the float32 reference's state rounded once per write: every state tensor must stay
within a few units of the dtype's roundoff of the reference (relative to the tensor's scale) and
must differ from it (the caches really are narrow), the logits within the quality bar, and the
buffers must be of the narrow type. The drift report is checked on runners with known errors.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from parity import assert_clean_error, cli
from sessa_export.artifact import read_manifest, state_layout
from sessa_export.drift import greedy_drift
from sessa_export.runtime import OrtRunner, TorchRunner
from sessa_export.state import GROW, INPLACE, STATE_DTYPES
from sessa_export.to_onnx import export_onnx
from sessa_export.tracer import trace

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROUNDOFF = {"float16": 2.0**-11, "bfloat16": 2.0**-8}  # unit roundoff of each narrow dtype
CASES = [(GROW, "float16"), (INPLACE, "float16"), (INPLACE, "bfloat16")]


@pytest.fixture(scope="module")
def model(make_lm):
    return make_lm(seed=3, vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, use_forward_rope=True)


@pytest.fixture(scope="module")
def exports(model, tmp_path_factory):
    root = tmp_path_factory.mktemp("state_dtype")
    graph = trace(model)
    return {(contract, dtype): export_onnx(graph, root / f"{contract}-{dtype}", state=contract, state_dtype=dtype)
            for contract, dtype in CASES}


def decode(runner, ids: np.ndarray, prefill: int):
    """A prefill of `prefill` tokens (two uneven chunks), then one-token steps; every step's logits."""
    state, logits = runner.empty_state(ids.shape[0]), []
    for lo, hi in ((0, prefill // 3), (prefill // 3, prefill)):
        out, state = runner.step(ids[:, lo:hi], state)
        logits.append(out)
    for t in range(prefill, ids.shape[1]):
        out, state = runner.step(ids[:, t:t + 1], state)
        logits.append(out)
    return np.concatenate(logits, axis=1), runner.state_arrays(state)


def check_against_reference(model, runner, dtype: str) -> None:
    ids = np.random.default_rng(5).integers(0, model.config.vocab_size, (2, 300))  # past 256: a capacity growth
    ref_logits, ref_state = decode(TorchRunner(model), ids, 200)
    logits, state = decode(runner, ids, 200)
    assert np.abs(logits - ref_logits).max() <= 1e-2 * np.abs(ref_logits).max()  # quality.THRESHOLDS["state"]
    for name, want in ref_state.items():
        error = np.abs(state[name] - want).max() / np.abs(want).max()
        assert error <= 4 * ROUNDOFF[dtype], (name, error)
        assert error > ROUNDOFF[dtype] / 16, (name, error)  # a float32 state would be ~1e-7 off


@pytest.mark.parametrize("contract,dtype", CASES)
def test_onnx_state_within_the_dtypes_roundoff(model, exports, contract, dtype):
    runner = OrtRunner(exports[contract, dtype], threads=1)
    check_against_reference(model, runner, dtype)
    assert state_layout(read_manifest(exports[contract, dtype])).dtype == dtype


@pytest.mark.parametrize("contract,dtype", CASES)
def test_the_buffers_are_narrow(exports, contract, dtype):
    runner = OrtRunner(exports[contract, dtype], threads=1)
    state = runner.empty_state(1)
    _, state = runner.step(np.zeros((1, 3), np.int64), state)
    values = state.values.values() if contract == INPLACE else state.values()
    assert {v.data_type() for v in values} == {f"tensor({dtype})"}
    if contract == INPLACE:
        assert all(a.itemsize == STATE_DTYPES[dtype].itemsize for a in state.arrays.values())
    manifest = read_manifest(exports[contract, dtype])
    assert manifest["state_contract"]["dtype"] == dtype and manifest["dtype"] == "float32"  # weights stay float32


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_tvm_narrow_caches(model, tmp_path, one_tvm_thread, dtype):
    from sessa_export.runtime.tvm_runner import TvmRunner
    from sessa_export.to_tvm import compile_graph

    out = compile_graph(trace(model), tmp_path / dtype, max_len=320, state_dtype=dtype)
    manifest = read_manifest(out)
    assert state_layout(manifest).dtype == dtype
    assert all(f": {dtype} [" in arg for arg in manifest["calling_convention"]["arguments"][2:])
    runner = TvmRunner(out, threads=1)
    assert {c.dtype for c in runner.empty_state(1).caches} == {dtype}
    check_against_reference(model, runner, dtype)


class Scaled:
    """A runner whose logits are another's times (1 + eps) from its `start`-th call on."""

    def __init__(self, runner, eps: float, start: int = 0) -> None:
        self.runner, self.eps, self.start, self.calls = runner, eps, start, 0

    def empty_state(self, batch):
        return self.runner.empty_state(batch)

    def step(self, ids, state):
        logits, state = self.runner.step(ids, state)
        self.calls += 1
        return (logits * (1 + self.eps) if self.calls > self.start else logits), state


def test_drift_measures_the_logits_error(model):
    prompt = np.arange(5)[None] % model.config.vocab_size
    same = greedy_drift(TorchRunner(model), TorchRunner(model), prompt, 40, "float16", bar=1e-2)
    assert same.max_error == 0.0 and same.argmax_agreement == 1.0 and same.ok
    late = greedy_drift(TorchRunner(model), Scaled(TorchRunner(model), 0.05, start=300), prompt, 600, "float16", 1e-2)
    assert late.max_error == pytest.approx(0.05, rel=1e-5)
    assert late.first_window_error == 0.0 and late.last_window_error == pytest.approx(0.05, rel=1e-5)
    assert not late.ok
    assert greedy_drift(TorchRunner(model), Scaled(TorchRunner(model), 0.05), prompt, 8, "float16", None).ok


def test_validate_reports_quality_and_drift(exports, tmp_path, model):
    from sessa_export.checkpoint import save_checkpoint

    ckpt = save_checkpoint(model, tmp_path / "ckpt")
    report, text = tmp_path / "report.json", tmp_path / "ids.npy"
    np.save(text, np.random.default_rng(0).integers(0, model.config.vocab_size, 4096))
    result = cli("validate", str(exports[INPLACE, "bfloat16"]), "--checkpoint", str(ckpt), "--text-ids", str(text),
                 "--bytes", "2048", "--drift", "300", "--json", str(report))
    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())
    assert data["mode"] == "state" and data["ok"]
    assert data["drift"]["steps"] == 300 and data["drift"]["ok"] and 0 < data["drift"]["max_error"] <= 1e-2


def test_quantize_keeps_the_state_dtype(exports, tmp_path):
    out = tmp_path / "int4"
    assert cli("quantize", str(exports[INPLACE, "float16"]), "--mode", "int4", "-o", str(out)).exit_code == 0
    assert state_layout(read_manifest(out)).dtype == "float16"
    runner = OrtRunner(out, threads=1)
    state = runner.empty_state(1)
    _, state = runner.step(np.zeros((1, 4), np.int64), state)
    assert {v.data_type() for v in state.values.values()} == {"tensor(float16)"}


def test_bad_state_dtypes(exports, tmp_path, model):
    from sessa_export.checkpoint import save_checkpoint

    ckpt = save_checkpoint(model, tmp_path / "ckpt")
    assert_clean_error(cli("export", str(ckpt), "-o", str(tmp_path / "x"), "--state-dtype", "float8"),
                       "unknown --state-dtype 'float8'")
    assert_clean_error(cli("export", str(ckpt), "-o", str(tmp_path / "x"), "--state-dtype", "bfloat16"),
                       "--state-dtype bfloat16 needs --state inplace")
    assert_clean_error(cli("compile", str(ckpt), "-o", str(tmp_path / "x"), "--state-dtype", "half"),
                       "unknown --state-dtype 'half'")
    assert_clean_error(cli("quantize", str(exports[GROW, "float16"]), "--mode", "fp16", "-o", str(tmp_path / "y")),
                       "fp16 stores the state in float16 itself")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
