"""`export --mobile`: the fixed-shape ORT Mobile step graphs (sessa_export/to_onnx/mobile.py).

The decode and prefill models run through plain ONNX Runtime CPU in MobileRunner's host loop (chunks
of 64, the last one padded, decode steps, the new rows copied into the caches) and every step is
compared with the PyTorch reference (TorchRunner, SessaLM.step) at validate's fp32 bar; the graphs
are checked for fixed shapes and for operators that ORT Mobile's NNAPI and CoreML providers list,
and `check_onnx_model_mobile_usability`'s node coverage is measured against the 90% target.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch

from parity import CONFIGS, cli
from sessa_export.artifact import read_manifest
from sessa_export.data import BUNDLED_MODEL
from sessa_export.errors import SessaExportError
from sessa_export.runtime import TorchRunner, open_runner
from sessa_export.to_onnx import export_onnx
from sessa_export.to_onnx.mobile import (CHUNK, DECODE_MODEL, MAX_CAPACITY, PREFILL_MODEL, WEIGHTS, MobileBuilder,
                                         MobileRunner, usability)
from sessa_export.tracer import trace

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TOLERANCE = 1e-4  # validate's fp32 bar: max |got - ref| <= atol + rtol * max |ref|, atol = rtol = 1e-4
MAX_LEN = 256  # the random models' max_len, so their caches hold 256 rows (the bundled model: MAX_CAPACITY)
# 64 + 64: whole chunks; 22: a padded one; single tokens: the decode model; 2: a padded chunk again;
# 57 from P = 199: the padded rows run past the capacity (256 = the context's end)
STEPS = [64, 64, 22, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 37, 57]
MODELS = (DECODE_MODEL, PREFILL_MODEL)
PROVIDER_LISTS = Path(ort.__file__).parent / "tools" / "mobile_helpers"


def assert_close(got: np.ndarray, ref: np.ndarray, what: str) -> None:
    assert got.shape == ref.shape, f"{what}: shape {got.shape} != reference {ref.shape}"
    err = float(np.max(np.abs(got.astype(np.float64) - ref))) if ref.size else 0.0
    bound = TOLERANCE + TOLERANCE * float(np.max(np.abs(ref))) if ref.size else 0.0
    assert err <= bound, f"{what}: max abs error {err:.3g} > {bound:.3g}"


def run_parity(model, runner: MobileRunner, steps: list[int], seed: int = 0) -> None:
    """Feed the same chunks to PyTorch and the mobile models, batch 1; compare every step's logits and
    the states after the first step and after the last."""
    ids = np.random.default_rng(seed).integers(0, model.config.vocab_size, (1, sum(steps)))
    ref = TorchRunner(model)
    ref_state, state = ref.empty_state(1), runner.empty_state(1)
    position = 0
    for index, size in enumerate(steps):
        chunk = ids[:, position:position + size]
        ref_logits, ref_state = ref.step(chunk, ref_state)
        logits, state = runner.step(chunk, state)
        assert_close(logits, ref_logits, f"logits of step {index} (positions {position}..{position + size - 1})")
        position += size
        if index in (0, len(steps) - 1):
            want, got = ref.state_arrays(ref_state), runner.state_arrays(state)
            assert set(got) == set(want)
            for name in want:
                assert_close(got[name], want[name], f"{name} after step {index}")


@pytest.fixture(scope="module")
def exports(make_lm, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("mobile")
    models = {name: make_lm(seed=20 + i, std=0.2, max_len=MAX_LEN, **fields)
              for i, (name, fields) in enumerate(CONFIGS.items())}
    return {name: (model, export_onnx(trace(model), root / name, mobile=True)) for name, model in models.items()}


@pytest.fixture(scope="module")
def bundled(tmp_path_factory) -> Path:
    """The bundled model's export through the CLI option."""
    out = tmp_path_factory.mktemp("mobile_bundled") / "tiny"
    result = cli("export", BUNDLED_MODEL, "-o", out, "--mobile")
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.parametrize("config", CONFIGS)
def test_the_mobile_models_match_pytorch(exports, config):
    model, out = exports[config]
    run_parity(model, MobileRunner(out, threads=1), STEPS)


def test_the_bundled_model_s_mobile_models_match_pytorch(bundled):
    from sessa_export.sources import load_model

    model = load_model(BUNDLED_MODEL, None, None)
    run_parity(model, open_runner(bundled, threads=1, mobile=True), [150, 1, 1, 1, 1, 1, 1, 1, 1, 70], seed=4)


def provider_ops(file: str) -> set[str]:
    """`domain:op` of every operator a provider's list (onnxruntime/tools/mobile_helpers) names."""
    return set(re.findall(r"^\|([\w.]+:\w+)\|", (PROVIDER_LISTS / file).read_text(), re.MULTILINE))


@pytest.mark.parametrize("name", MODELS)
def test_the_graphs_have_fixed_shapes_and_only_operators_both_providers_list(bundled, name):
    model = onnx.shape_inference.infer_shapes(onnx.load(str(bundled / name)), strict_mode=True)
    graph = model.graph
    for value in [*graph.input, *graph.output, *graph.value_info]:
        dims = value.type.tensor_type.shape.dim
        assert all(d.HasField("dim_value") for d in dims), f"{value.name} has a dynamic shape"
    ops = {f"{node.domain or 'ai.onnx'}:{node.op_type}" for node in graph.node}
    assert not ops & {"ai.onnx:Loop", "ai.onnx:If", "ai.onnx:Scan", "ai.onnx:Range", "ai.onnx:EyeLike"}
    both = provider_ops("nnapi_supported_ops.md") & provider_ops("coreml_supported_mlprogram_ops.md")
    assert ops - both == {"ai.onnx:Gather"}  # the token embedding: NNAPI only (CoreML's MLProgram list has no Gather)
    inputs = {i.name: i.type.tensor_type.elem_type for i in graph.input}
    assert inputs["input_ids"] == inputs["past_sequence_length"] == onnx.TensorProto.INT32  # NNAPI has no int64


@pytest.mark.parametrize("name", MODELS)
def test_nnapi_and_coreml_take_at_least_90_percent_of_the_nodes(bundled, name):
    """check_onnx_model_mobile_usability's partition figures (the same library functions, fixed shapes
    required); the bundled model measured 100% NNAPI and 99.8-99.9% CoreML MLProgram, one partition each."""
    figures = usability(bundled / name)
    print(name, {ep: f"{f['supported']}/{f['nodes']} ({f['percent']:.1f}%), {f['partitions']} partition(s)"
                 for ep, f in figures.items()})
    for ep, f in figures.items():
        assert f["percent"] >= 90.0 and f["partitions"] == 1, f"{name} on {ep}: {f}"


def test_the_manifest_names_the_models_and_they_share_one_copy_of_the_weights(bundled):
    manifest = read_manifest(bundled)
    assert manifest["model_file"] == "model.onnx"  # what every other reader loads
    assert {manifest["mobile_decode_file"], manifest["mobile_prefill_file"], manifest["mobile_weights_file"]} == \
        {DECODE_MODEL, PREFILL_MODEL, WEIGHTS}
    assert {DECODE_MODEL, PREFILL_MODEL, WEIGHTS, "model.onnx"} <= set(manifest["files"])
    record = manifest["mobile"]
    assert record["capacity"] == MAX_CAPACITY and record["prefill_sequence"] == CHUNK and record["batch"] == 1
    for name in MODELS:
        external = {t.name for t in onnx.load(str(bundled / name), load_external_data=False).graph.initializer
                    if t.data_location == onnx.TensorProto.EXTERNAL
                    and {e.key: e.value for e in t.external_data}["location"] == WEIGHTS}
        assert sum(n.endswith(".weight") for n in external) >= 20, f"{name} keeps its weights inline"
    weights = (bundled / WEIGHTS).stat().st_size
    assert sum((bundled / name).stat().st_size for name in MODELS) < 0.1 * weights  # not a second copy


def test_the_runner_refuses_what_the_models_cannot_run(exports, tmp_path):
    model, out = exports["GQA-mlp-tied"]
    runner = MobileRunner(out, threads=1)
    with pytest.raises(SessaExportError, match="batch 1"):
        runner.empty_state(2)
    state = runner.empty_state(1)
    _, full = runner.step(np.zeros((1, MAX_LEN), np.int64), state)
    with pytest.raises(SessaExportError, match=f"context of {MAX_LEN + 1} positions exceeds .* capacity {MAX_LEN}"):
        runner.step(np.zeros((1, 1), np.int64), full)
    # a state whose rows a step from an earlier state overwrote is refused; a copy is its own
    first = runner.step(np.ones((1, 3), np.int64), runner.empty_state(1))[1]
    fork = first.copy()
    branch = runner.step(np.ones((1, 1), np.int64), first)[1]
    runner.step(np.ones((1, 2), np.int64), first)  # re-stepping `first` is allowed: it overwrites `branch`'s row 3
    with pytest.raises(SessaExportError, match="overwritten"):
        runner.step(np.ones((1, 1), np.int64), branch)
    runner.step(np.ones((1, 1), np.int64), fork)
    plain = export_onnx(trace(model), tmp_path / "plain")
    with pytest.raises(SessaExportError, match="no ORT Mobile models.*--mobile"):
        MobileRunner(plain)
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    (broken / WEIGHTS).write_bytes((broken / WEIGHTS).read_bytes()[:-4])
    with pytest.raises(SessaExportError, match=f"{WEIGHTS}: its bytes differ"):
        MobileRunner(broken)


def test_the_cli_option_is_off_by_default(tmp_path):
    assert cli("export", BUNDLED_MODEL, "-o", tmp_path / "plain").exit_code == 0
    assert not (tmp_path / "plain" / DECODE_MODEL).exists()


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_the_spelled_out_gelu_and_layer_norm_match_torch(make_lm, approximate):
    """Gelu (erf by Abramowitz & Stegun 7.1.26, or the tanh form) and LayerNormalization in the ops both
    providers take, against torch over a wide range of inputs."""
    builder = MobileBuilder(trace(make_lm()), 1, 8)
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([4, 5001]))
    weight = builder.const(np.linspace(0.5, 1.5, 5001, dtype=np.float32), "w")
    bias = builder.const(np.linspace(-1, 1, 5001, dtype=np.float32), "b")
    gelu = builder.op("Gelu", [x], approximate=approximate)
    norm = builder.op("LayerNormalization", [x, weight, bias], axis=-1, epsilon=1e-5)
    for value, name in ((gelu, "gelu"), (norm, "norm")):
        value.name = name
    model = ir.Model(ir.Graph([x], [gelu, norm], nodes=builder.tape.nodes, initializers=builder.tape.initializers,
                              opset_imports={"": 17}), ir_version=10)
    assert {n.op_type for n in builder.tape.nodes}.isdisjoint({"Gelu", "Erf", "LayerNormalization"})
    session = ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    values = np.stack([np.linspace(-20, 20, 5001), np.linspace(-1e-3, 1e-3, 5001),
                       np.linspace(-4, 4, 5001) ** 3, np.random.default_rng(0).normal(0, 3, 5001)]).astype(np.float32)
    got_gelu, got_norm = session.run(None, {"x": values})
    t = torch.from_numpy(values).double()
    want_gelu = torch.nn.functional.gelu(t, approximate=approximate).numpy()
    want_norm = torch.nn.functional.layer_norm(t, (5001,), torch.from_numpy(np.linspace(0.5, 1.5, 5001)),
                                               torch.from_numpy(np.linspace(-1, 1, 5001)), 1e-5).numpy()
    assert np.max(np.abs(got_gelu - want_gelu) / np.maximum(1.0, np.abs(want_gelu))) < 1e-6
    assert np.max(np.abs(got_norm - want_norm)) < 1e-5
