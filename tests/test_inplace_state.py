"""The in-place state contract (`export --state inplace`) against the PyTorch reference.

The caches have a capacity of whole blocks of CAPACITY_BLOCK positions that the runner grows with the context;
each step binds them as input and output so ONNX Runtime writes the new rows in place. The
parity checks are the growing contract's (tests/parity.py: PyTorch's step path and its full
forward), so a prefill + 256 decodes and the uneven chunks cross capacity growths mid-run.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from parity import ATOL, CONFIGS, PARITY_CHECKS, assert_clean_error, assert_written_in_place, cli, run_parity
from sessa_export.artifact import read_manifest, state_layout
from sessa_export.errors import SessaExportError
from sessa_export.runtime import OrtRunner
from sessa_export.runtime.ort_runner import CacheState
from sessa_export.state import CAPACITY_BLOCK, INPLACE, PAST_LENGTH, capacity_for
from sessa_export.to_onnx import export_onnx
from sessa_export.tracer import trace

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def inplace_exports(make_lm, tmp_path_factory):
    from parity import models_per_config

    root = tmp_path_factory.mktemp("inplace")
    return {name: (model, export_onnx(trace(model), root / name, state=INPLACE))
            for name, model in models_per_config(make_lm).items()}


@pytest.mark.parametrize("check", PARITY_CHECKS.values(), ids=PARITY_CHECKS.keys())
@pytest.mark.parametrize("name", CONFIGS)
def test_parity(inplace_exports, name, check):
    model, out = inplace_exports[name]
    check(model, OrtRunner(out, threads=1))


def test_the_manifest_and_graph_state_the_contract(inplace_exports):
    _, out = next(iter(inplace_exports.values()))
    manifest = read_manifest(out)
    contract = manifest["state_contract"]
    assert contract["kind"] == INPLACE and contract["past_length_input"] == PAST_LENGTH
    assert contract["aliases"]["present.0.key"] == "past_key_values.0.key"
    assert state_layout(manifest).contract == INPLACE and manifest["opset"] == 24
    model = onnx.load(str(out / "model.onnx"))
    onnx.checker.check_model(model, full_check=True)
    inputs = {i.name: i for i in model.graph.input}
    assert PAST_LENGTH in inputs and inputs[PAST_LENGTH].type.tensor_type.shape.dim == []
    for layer in manifest["state"]:
        for field in layer["fields"]:
            dims = [d.dim_param or d.dim_value for d in inputs[layer["past"][field]].type.tensor_type.shape.dim]
            assert "capacity" in dims, (field, dims)
    assert {f.name for f in model.functions} == {"FeedbackAttention", "FeedbackAttentionCache"}
    assert all(n.domain in ("", "ai.sessa") for n in model.graph.node)


def test_steps_write_the_bound_buffers_in_place(inplace_exports):
    model, out = inplace_exports["GQA-mlp-tied"]
    runner = OrtRunner(out, threads=1)
    ids = np.random.default_rng(4).integers(0, model.config.vocab_size, (2, CAPACITY_BLOCK + 2))
    after, pointers = assert_written_in_place(runner, ids)
    assert after.capacity == CAPACITY_BLOCK
    # past the capacity the caches grow by whole blocks, once, with the valid rows carried over
    _, grown = runner.step(ids[:, 11:], after)
    assert grown.capacity == 2 * CAPACITY_BLOCK and grown.past == CAPACITY_BLOCK + 2
    assert all(grown.values[name].data_ptr() != pointer for name, pointer in pointers.items())


def test_decode_alone_matches_across_a_growth(inplace_exports):
    """Single-token decodes from P = 0 up past the first block: every step against PyTorch."""
    model, out = inplace_exports["rope-off"]
    ids = np.random.default_rng(6).integers(0, model.config.vocab_size, (2, CAPACITY_BLOCK + 8))
    run_parity(model, OrtRunner(out, threads=1), ids, [1] * ids.shape[1])


def test_logits_of_a_width_the_graph_leaves_open_are_learnt(inplace_exports):
    """The runner binds the logits to an array of the graph's declared width; without one it takes ORT's
    output once and learns the width from it. Both give the same numbers, and every step fresh logits."""
    model, out = inplace_exports["GQA-mlp-tied"]
    declared, open_width = OrtRunner(out, threads=1), OrtRunner(out, threads=1)
    assert declared._logits == (model.config.vocab_size, np.float32)
    open_width._logits = None
    ids = np.random.default_rng(8).integers(0, model.config.vocab_size, (2, 12))
    results = []
    for runner in (declared, open_width):
        state, logits = runner.empty_state(2), []
        for chunk in (ids[:, :9], ids[:, 9:10], ids[:, 10:11], ids[:, 11:]):
            step, state = runner.step(chunk, state)
            logits.append(step)
        results.append(logits)
    assert open_width._logits == (model.config.vocab_size, np.float32)
    assert all(np.array_equal(a, b) for a, b in zip(*results))
    assert not np.array_equal(results[0][1], results[0][2])  # an earlier step's logits are not overwritten


def test_capacity_rule():
    block = CAPACITY_BLOCK
    assert [capacity_for(n, None) for n in (1, block, block + 1, 10 * block - 3)] == [block, block, 2 * block, 10 * block]
    assert capacity_for(300, 310) == 310  # whole blocks would be 320: max_len caps them
    with pytest.raises(SessaExportError, match="exceeds the model's max_len=310"):
        capacity_for(311, 310)


def test_a_context_past_max_len_is_refused(make_lm, tmp_path):
    model = make_lm(seed=2, vocab_size=64, d_model=32, n_layers=1, n_heads=2, max_len=300)
    runner = OrtRunner(export_onnx(trace(model), tmp_path / "x", state=INPLACE), threads=1)
    ids = np.zeros((1, 301), np.int64)
    _, state = runner.step(ids[:, :299], runner.empty_state(1))
    assert state.capacity == 300  # the last block is cut at max_len
    with pytest.raises(SessaExportError, match="301 positions exceeds the model's max_len=300"):
        runner.step(ids[:, 299:], state)


def test_bad_states_are_refused(inplace_exports):
    model, out = inplace_exports["H1"]
    runner = OrtRunner(out, threads=1)
    ids = np.zeros((1, 3), np.int64)
    with pytest.raises(SessaExportError, match="keeps its state in place"):
        runner.step(ids, {})
    state = runner.empty_state(1)
    with pytest.raises(SessaExportError, match="the state holds batch 1, the input has batch 2"):
        runner.step(np.zeros((2, 3), np.int64), state)
    past_capacity = CacheState(state.arrays, state.values, state.capacity + 1, 1, state.capacity)
    with pytest.raises(SessaExportError, match="do not hold its capacity"):
        runner.step(ids, past_capacity)
    arrays = dict(state.arrays, **{"past_key_values.0.key": state.arrays["past_key_values.0.key"][..., :4]})
    with pytest.raises(SessaExportError, match=r"past_key_values\.0\.key has shape"):
        runner.step(ids, CacheState(arrays, state.values, 0, 1, state.capacity))


def test_export_refuses_an_unknown_contract(make_lm, tmp_path):
    checkpoint = tmp_path / "ckpt"
    from sessa_export.checkpoint import save_checkpoint

    save_checkpoint(make_lm(seed=2, vocab_size=64, d_model=32, n_layers=1, n_heads=2), checkpoint)
    result = cli("export", checkpoint, "-o", tmp_path / "out", "--state", "shared")
    assert_clean_error(result, "--state 'shared'", "grow, inplace")
    assert not (tmp_path / "out").exists()
    result = cli("export", checkpoint, "-o", tmp_path / "out", "--state", "inplace")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "out" / "sessa_config.json").read_text())["state_contract"]["kind"] == INPLACE


def test_fp16_of_an_inplace_export_is_refused(inplace_exports, tmp_path):
    from sessa_export.to_onnx.quantize import quantize_export

    _, out = inplace_exports["H1"]
    with pytest.raises(SessaExportError, match="--state grow"):
        quantize_export(out, tmp_path / "fp16", "fp16")
    assert not (tmp_path / "fp16").exists()


def test_int8_of_an_inplace_export_keeps_the_contract(inplace_exports, tmp_path):
    from sessa_export.to_onnx.quantize import quantize_export

    model, out = inplace_exports["GQA-mlp-tied"]
    manifest = quantize_export(out, tmp_path / "int8", "int8")
    assert manifest["state_contract"]["kind"] == INPLACE
    runner, reference = OrtRunner(tmp_path / "int8", threads=1), OrtRunner(out, threads=1)
    ids = np.random.default_rng(8).integers(0, model.config.vocab_size, (1, 40))
    got, state = runner.step(ids[:, :39], runner.empty_state(1))
    got, _ = runner.step(ids[:, 39:], state)
    want, state = reference.step(ids[:, :39], reference.empty_state(1))
    want, _ = reference.step(ids[:, 39:], state)
    assert np.abs(got - want).max() < 0.1 * np.abs(want).max() + ATOL  # quantized, not exact
