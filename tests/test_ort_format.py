"""`export --ort-format`: model.ort (ORT format, for ONNX Runtime Mobile and minimal builds) and its
required-operators configuration, for both state contracts.

The .ort model runs through ONNX Runtime in the same state loop as model.onnx (OrtRunner, its session
swapped for one loaded in ORT format) and every step is compared with the PyTorch reference at the
fp32 bar (tests/parity.py). The operators configuration is checked against the operators of the
optimized graph that ONNX Runtime saves in ONNX format, a second serialisation of the same session.
"""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import onnxruntime as ort
import pytest

from parity import CONFIGS, PARITY_CHECKS, cli
from sessa_export.artifact import member, read_manifest
from sessa_export.data import BUNDLED_MODEL
from sessa_export.errors import SessaExportError
from sessa_export.runtime import OrtRunner
from sessa_export.to_onnx import export_onnx
from sessa_export.to_onnx.ort_format import OPERATORS_CONFIG_NAME, ORT_MODEL_NAME
from sessa_export.tracer import trace

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CONTRACTS = ("grow", "inplace")
CONFIG = "GQA-mlp-tied"  # grouped heads, an MLP and tied embeddings: every op kind of the step graph


class OrtFormatRunner(OrtRunner):
    """OrtRunner on the export's ORT-format model (the manifest's "ort_model_file") instead of model.onnx."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, threads=1)
        model = member(path, self.manifest, "ort_model_file", ORT_MODEL_NAME)
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.add_session_config_entry("session.load_model_format", "ORT")  # never parsed as ONNX
        self.session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
        assert [o.name for o in self.session.get_outputs()] == self.output_names


@pytest.fixture(scope="module")
def exports(make_lm, tmp_path_factory) -> dict:
    model = make_lm(seed=11, std=0.2, **CONFIGS[CONFIG])
    root = tmp_path_factory.mktemp("ort_format")
    return {state: (model, export_onnx(trace(model), root / state, state=state, ort_format=True))
            for state in CONTRACTS}


@pytest.mark.parametrize("check", PARITY_CHECKS.values(), ids=PARITY_CHECKS.keys())
@pytest.mark.parametrize("state", CONTRACTS)
def test_the_ort_model_matches_pytorch(exports, state, check):
    model, out = exports[state]
    check(model, OrtFormatRunner(out))


@pytest.mark.parametrize("state", CONTRACTS)
def test_the_manifest_names_and_hashes_both_files(exports, state):
    _, out = exports[state]
    manifest = read_manifest(out)
    assert manifest["model_file"] == "model.onnx"  # what every other reader loads
    assert manifest["ort_model_file"] == ORT_MODEL_NAME and manifest["ort_operators_config"] == OPERATORS_CONFIG_NAME
    assert {"model.onnx", ORT_MODEL_NAME, OPERATORS_CONFIG_NAME} <= set(manifest["files"])
    assert (out / ORT_MODEL_NAME).read_bytes()[4:8] == b"ORTM"  # the ORT format's FlatBuffer identifier


def operators(graph: onnx.GraphProto) -> set[tuple[str, str]]:
    """(domain, op type) of every node of `graph` and of its Loop / If bodies."""
    found = set()
    for node in graph.node:
        found.add((node.domain or "ai.onnx", node.op_type))
        for attribute in node.attribute:
            for body in [attribute.g] if attribute.HasField("g") else attribute.graphs:
                found |= operators(body)
    return found


@pytest.mark.parametrize("state", CONTRACTS)
def test_the_operators_config_lists_the_optimized_graph_s_operators(exports, state, tmp_path):
    """Each `domain;opset;op,op` line of the config against the nodes of the same optimization saved as ONNX."""
    _, out = exports[state]
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(out / "model.onnx"), options, providers=["CPUExecutionProvider"],
                         disabled_optimizers=["NchwcTransformer"])  # what the converter disables off amd64
    optimized = onnx.load(str(tmp_path / "optimized.onnx"), load_external_data=False)
    want = operators(optimized.graph)
    lines = [line for line in (out / OPERATORS_CONFIG_NAME).read_text().splitlines() if not line.startswith("#")]
    got = {(domain, op) for domain, _, ops in (line.split(";") for line in lines) for op in ops.split(",")}
    assert got == want
    assert ("ai.onnx", "Attention") in got and str(out) not in (out / OPERATORS_CONFIG_NAME).read_text()


def test_a_tampered_ort_model_is_refused(exports, tmp_path):
    import shutil

    _, out = exports["grow"]
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    data = (broken / ORT_MODEL_NAME).read_bytes()
    (broken / ORT_MODEL_NAME).write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    for runner in (OrtFormatRunner, OrtRunner):  # a reader of model.onnx checks every recorded file too
        with pytest.raises(SessaExportError, match=f"{ORT_MODEL_NAME}: its bytes differ from the sha256"):
            runner(broken)


def test_the_cli_option(tmp_path):
    result = cli("export", BUNDLED_MODEL, "-o", tmp_path / "out", "--ort-format")
    assert result.exit_code == 0, result.output
    files = json.loads((tmp_path / "out" / "sessa_config.json").read_text())["files"]
    assert sorted(files) == ["model.onnx", ORT_MODEL_NAME, OPERATORS_CONFIG_NAME]
    assert cli("export", BUNDLED_MODEL, "-o", tmp_path / "plain").exit_code == 0
    assert not (tmp_path / "plain" / ORT_MODEL_NAME).exists()
