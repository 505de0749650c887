"""The contracts every part agrees on, each with one owner: the op table (ops/registry.py), the
state layout (sessa_export/state.py), the artifact manifest (sessa_export/artifact.py), the
target table (targets/) and the quantization modes (sessa_export/quantization.py).

The op test is a coverage test: one model applies every position-wise op of the table, and both
back ends must match its PyTorch forward (the reference is torch's own forward, not the code under
test). An op added to the table without being added here fails it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import randomize_weights
from parity import ATOL, forward_logits, max_abs
from sessa_export.artifact import MANIFEST_NAME, SCHEMA_VERSION, read_manifest, state_layout
from sessa_export.errors import SessaExportError
from sessa_export.model import SessaLayer
from sessa_export.ops.registry import OPS
from sessa_export.quantization import MODES
from sessa_export.runtime import OrtRunner, TorchRunner
from sessa_export.runtime.tvm_runner import TvmRunner
from sessa_export.state import FIELDS, FIXED, StateLayout
from sessa_export.targets import TARGETS
from sessa_export.to_onnx import export_onnx
from sessa_export.to_tvm import CompileTarget, compile_graph
from sessa_export.tracer import trace

pytestmark = pytest.mark.usefixtures("one_tvm_thread")

WIDTH, VOCAB = 32, 64


class EveryOp(nn.Module):
    """Token ids -> every position-wise op of the table, as modules, functions and methods -> logits."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.norm = nn.LayerNorm(WIDTH)
        self.layer = SessaLayer(WIDTH, n_heads=4, n_kv_heads=2)
        self.up = nn.Linear(WIDTH, 2 * WIDTH)
        self.down = nn.Linear(WIDTH // 2, WIDTH)
        self.acts = nn.ModuleList([nn.GELU(approximate="tanh"), nn.ReLU(), nn.SiLU(), nn.Tanh(), nn.Sigmoid(),
                                   nn.Dropout(0.1), nn.Identity()])
        self.head = nn.Linear(WIDTH, VOCAB)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.layer(self.norm(self.embed(ids)))
        gate, value = self.up(x).split(WIDTH, dim=-1)
        a, b = value.chunk(2, dim=-1)
        h = F.silu(gate) * torch.tanh(value) + torch.sigmoid(gate) - F.relu(value) / 2.0 + self.down(a * b)
        h = F.gelu(h) + torch.relu(h) + F.dropout(h, training=False)
        for act in self.acts:
            h = act(h)
        h = h.add(x).sub(0.25).mul(1.5).div(2.0).tanh().relu().sigmoid()
        return self.head(h + torch.add(x, 1.0) - torch.sub(x, 0.5) * torch.mul(x, 0.5) + torch.div(x, 4.0))


@pytest.fixture(scope="module")
def every_op():
    return randomize_weights(EveryOp(), seed=11, std=0.2).eval()


def test_the_model_uses_every_op_of_the_table(every_op):
    used = {node.op for node in trace(every_op).nodes}
    assert used == set(OPS), f"ops of the table this test does not exercise: {sorted(set(OPS) - used)}"


def test_every_op_lowers_to_onnx_and_tvm_like_pytorch(every_op, tmp_path):
    graph = trace(every_op)
    ids = np.random.default_rng(2).integers(0, VOCAB, (2, 19))
    reference = forward_logits(every_op, ids)
    onnx = OrtRunner(export_onnx(graph, tmp_path / "onnx"), threads=1)
    tvm = TvmRunner(compile_graph(graph, tmp_path / "tvm", CompileTarget("cpu"), max_len=32), threads=1)
    for runner in (onnx, tvm):
        state, logits = runner.empty_state(2), []
        for start, stop in ((0, 11), (11, 12), (12, 19)):  # a prefill, a decode step, a chunk
            out, state = runner.step(ids[:, start:stop], state)
            logits.append(out)
        err = max_abs(np.concatenate(logits, axis=1), reference)
        assert err <= ATOL * (1 + np.abs(reference).max()), f"{runner.name}: max abs error {err:.3g}"


# -- the state layout ---------------------------------------------------------------------------
def test_runners_read_one_state_layout(make_lm, tmp_path):
    model = make_lm(seed=3, vocab_size=VOCAB, d_model=WIDTH, n_layers=2, n_heads=4, n_kv_heads=2)
    out = export_onnx(trace(model), tmp_path / "onnx")
    layouts = [TorchRunner(model).layout, OrtRunner(out).layout, state_layout(read_manifest(out))]
    assert layouts[0] == layouts[1] == layouts[2]
    layer = layouts[0].layers[1]
    assert layer.shape("key", 3, 5) == [3, 2, 5, WIDTH // 4] and layer.shape("feedback_state", 3, 5) == [3, 5, WIDTH]
    assert [StateLayout(()).position_axis(f) for f in FIELDS] == [2, 2, 1, 1]
    assert [StateLayout((), "genai").position_axis(f) for f in FIELDS] == [2, 2, 2, 2]
    assert layouts[0].values_per_position() == model.config.state_values_per_token()


def test_a_manifest_without_fields_reads_and_a_tampered_layout_is_refused(make_lm, tmp_path):
    out = export_onnx(trace(make_lm(seed=3, vocab_size=VOCAB, d_model=WIDTH, n_layers=1, n_heads=2)), tmp_path / "x")
    manifest = read_manifest(out)
    written = manifest["state"]
    old = [{k: v for k, v in layer.items() if k != "fields"} for layer in written]  # schema version 1
    assert StateLayout.from_manifest(old) == StateLayout.from_manifest(written)
    tampered = json.loads(json.dumps(written))
    tampered[0]["shapes"]["key"][1] = 7
    with pytest.raises(SessaExportError, match="state"):
        StateLayout.from_manifest(tampered)
    with pytest.raises(SessaExportError, match="positive integers"):
        StateLayout.from_manifest([{**written[0], "head_dim": "16"}])


def test_the_fixed_contract_records_its_capacity_and_reads_back(make_lm):
    """A compiled module's contract: the caches' capacity in the manifest, the "capacity" axis, no presents."""
    mixers = [layer.mixer for layer in make_lm(seed=3, vocab_size=VOCAB, d_model=WIDTH, n_layers=2, n_heads=2).layers]
    grow = StateLayout.from_mixers(mixers)
    fixed = StateLayout(grow.layers, FIXED, "float16", capacity=48)
    contract = fixed.contract_manifest()
    assert contract["kind"] == FIXED and contract["capacity"] == 48 and "aliases" not in contract
    assert StateLayout.from_manifest(fixed.to_manifest(), contract) == fixed
    assert not any("present" in layer for layer in fixed.to_manifest())
    compiled_before = [{**layer, "present": written["present"]}  # TVM manifests of 2026-12-03 list presents
                       for layer, written in zip(fixed.to_manifest(), grow.to_manifest())]
    assert StateLayout.from_manifest(compiled_before, contract) == fixed
    renamed = [{**layer, "past": {**layer["past"], "key": "nope"}} for layer in fixed.to_manifest()]
    with pytest.raises(SessaExportError, match="differ from the state contract; re-run the compile"):
        StateLayout.from_manifest(renamed, contract)
    assert all(axes[fixed.position_axis(f)] == "capacity" for layer in fixed.to_manifest()
               for f, axes in layer["shapes"].items())
    for capacity in (None, 0, "48"):
        with pytest.raises(SessaExportError, match="capacity"):
            StateLayout.from_manifest(fixed.to_manifest(), {**contract, "capacity": capacity})
    with pytest.raises(SessaExportError, match="--state 'fixed'"):  # an ONNX export cannot take it
        StateLayout.from_mixers(mixers, FIXED)


def test_a_state_of_the_wrong_shape_is_refused_by_name(make_lm, tmp_path):
    model = make_lm(seed=3, vocab_size=VOCAB, d_model=WIDTH, n_layers=1, n_heads=2)
    runner = OrtRunner(export_onnx(trace(model), tmp_path / "x"))
    state = runner.empty_state(1)
    state["past_key_values.0.feedback_state"] = runner._ort.OrtValue.ortvalue_from_numpy(
        np.zeros((1, 0, WIDTH + 1), np.float32))
    with pytest.raises(SessaExportError, match=r"past_key_values\.0\.feedback_state has shape \[1, 0, 33\]"):
        runner.step(np.zeros((1, 2), np.int64), state)


# -- the artifact manifest ----------------------------------------------------------------------
@pytest.fixture()
def export_dir(make_lm, tmp_path) -> Path:
    return export_onnx(trace(make_lm(seed=3, vocab_size=VOCAB, d_model=WIDTH, n_layers=1, n_heads=2)), tmp_path / "x")


def _rewrite(path: Path, **changes) -> None:
    manifest = json.loads((path / MANIFEST_NAME).read_text())
    (path / MANIFEST_NAME).write_text(json.dumps({**manifest, **changes}))


def test_manifest_records_its_schema_and_file_hashes(export_dir):
    import hashlib

    manifest = read_manifest(export_dir)
    assert manifest["schema_version"] == SCHEMA_VERSION and manifest["quantization"] is None
    assert manifest["files"] == {"model.onnx": hashlib.sha256((export_dir / "model.onnx").read_bytes()).hexdigest()}


def test_a_newer_schema_is_refused(export_dir):
    _rewrite(export_dir, schema_version=SCHEMA_VERSION + 1)
    with pytest.raises(SessaExportError, match="newer than this sessa-export reads"):
        read_manifest(export_dir)


@pytest.mark.parametrize("name", ["../model.onnx", "/etc/passwd", "sub/model.onnx", ".."])
def test_a_model_file_outside_the_artifact_is_never_opened(export_dir, name):
    shutil.copy(export_dir / "model.onnx", export_dir.parent / "model.onnx")
    _rewrite(export_dir, model_file=name)
    with pytest.raises(SessaExportError, match="must name a file inside"):
        OrtRunner(export_dir)


@pytest.mark.parametrize("key, value", [("max_len", "512"), ("max_len", True), ("capacity", 1.5), ("capacity", 0)])
def test_a_manifest_size_of_the_wrong_type_is_refused(export_dir, key, value):
    _rewrite(export_dir, **{key: value})
    with pytest.raises(SessaExportError, match=f"'{key}' must be a positive integer"):
        read_manifest(export_dir)


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc to build the planted library")
def test_a_library_named_outside_the_artifact_is_never_loaded(make_lm, tmp_path):
    """A manifest naming a shared library elsewhere: its constructor (which would write a file) never runs."""
    import subprocess

    marker = tmp_path / "constructor-ran"
    source = tmp_path / "planted.c"
    source.write_text('#include <stdio.h>\n__attribute__((constructor)) static void run(void) '
                      f'{{ fclose(fopen("{marker}", "w")); }}\n')
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(tmp_path / "planted.so"), str(source)], check=True)
    model = make_lm(seed=3, vocab_size=VOCAB, d_model=WIDTH, n_layers=1, n_heads=2)
    out = compile_graph(trace(model), tmp_path / "tvm", CompileTarget("cpu"), max_len=16)
    for name in ("../planted.so", str(tmp_path / "planted.so")):
        _rewrite(out, library=name)
        with pytest.raises(SessaExportError, match="must name a file inside"):
            TvmRunner(out)
    assert not marker.exists()


def test_a_capacity_past_this_machine_s_memory_is_refused_before_compiling(make_lm, tmp_path):
    model = make_lm(seed=3, vocab_size=VOCAB, d_model=WIDTH, n_layers=1, n_heads=2)
    with pytest.raises(SessaExportError, match="GiB of caches for one sequence.*lower --max-len"):
        compile_graph(trace(model), tmp_path / "tvm", CompileTarget("cpu"), max_len=10**12)
    assert not (tmp_path / "tvm").exists()


def test_a_changed_model_file_is_refused_before_it_loads(export_dir):
    data = (export_dir / "model.onnx").read_bytes()
    (export_dir / "model.onnx").write_bytes(data[:-8])
    with pytest.raises(SessaExportError, match="model.onnx: its bytes differ from the sha256"):
        OrtRunner(export_dir)


# -- targets and quantization modes -------------------------------------------------------------
@pytest.mark.parametrize("name", list(TARGETS))
def test_every_target_file_has_the_target_interface(name):
    rules = TARGETS[name].implementation()
    for attr in ("tvm_target", "attention_tiling", "scheduled_feedback_attention", "pipeline", "library_name",
                 "package"):
        assert callable(getattr(rules, attr, None)), f"targets/{TARGETS[name].module}.py has no {attr}()"
    target = CompileTarget(name)
    assert target.tvm_target().kind.name == ("llvm" if name == "cpu" else name)


def test_compile_refuses_choices_outside_the_target_table():
    with pytest.raises(SessaExportError, match="choose one of cpu, cuda, metal, opencl"):
        CompileTarget("vulkan")
    with pytest.raises(SessaExportError, match="--arch is for --target cuda"):
        CompileTarget("opencl", arch="sm_90")
    with pytest.raises(SessaExportError, match="choose one of aarch64-linux-gnu"):
        CompileTarget("opencl", host="x86_64-linux-gnu")


def test_every_quantization_mode_has_a_quality_bar():
    from sessa_export.quality import THRESHOLDS

    assert {mode.quality for mode in MODES.values()} <= set(THRESHOLDS)
    assert MODES["q8"].quality == "int8" and MODES["q4"].quality == "int4"
