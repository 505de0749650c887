"""A user's own model, first time (issue 14): the reference-style worked example end to end, `--model
path/to/file.py:factory` and its messages, per-layer kv heads and a biased head in SessaLM on both back
ends, `convert`, and tied tables under quantization."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from conftest import TESTS_DIR, randomize_weights
from parity import ATOL, CHUNKS, assert_clean_error, cli, max_abs, run_parity
from sessa_export.checkpoint import load_checkpoint, save_checkpoint
from sessa_export.config import SessaConfig
from sessa_export.errors import SessaExportError
from sessa_export.model import SessaLM
from sessa_export.runtime import OrtRunner, StepGraphRunner
from sessa_export.sources import load_factory_model
from sessa_export.to_onnx import export_onnx
from sessa_export.to_onnx.quantize import quantize_export
from sessa_export.tracer import trace

REPO = TESTS_DIR.parent
EXAMPLE = REPO / "examples" / "reference_model"
SPEC = f"{EXAMPLE / 'model.py'}:build"


def _env() -> dict:
    """The environment a user has: no PYTHONPATH, one thread each."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return {**env, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """examples/reference_model/train.py, briefly, saving `torch.save(model.state_dict(), "ckpt.pt")`."""
    root = tmp_path_factory.mktemp("reference_model")
    proc = subprocess.run([sys.executable, str(EXAMPLE / "train.py"), "--steps", "40", "--length", "32",
                           "--batch", "8", "--out", str(root / "ckpt.pt")],
                          cwd=root, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return root / "ckpt.pt"


@pytest.fixture(scope="module")
def exported(trained) -> Path:
    """`sessa-export export ckpt.pt --model examples/reference_model/model.py:build -o OUT` from the
    repository root, as the README shows it, with no PYTHONPATH."""
    out = trained.parent / "onnx"
    proc = subprocess.run([sys.executable, "-m", "sessa_export.cli", "export", str(trained), "--model",
                           "examples/reference_model/model.py:build", "-o", str(out)],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out


def test_example_exports_with_input_ids_and_its_layers(exported):
    manifest = json.loads((exported / "sessa_config.json").read_text())
    assert (manifest["input"]["name"], manifest["input"]["kind"]) == ("input_ids", "tokens")  # forward() says `ids`
    assert [s["n_kv_heads"] for s in manifest["state"]] == [4, 2, 1]
    assert [i.name for i in onnx.load(str(exported / "model.onnx")).graph.input][0] == "input_ids"


def test_example_validates_with_state(exported, tmp_path):
    """validate compares logits and every state tensor against the step-wise reference."""
    report_file = tmp_path / "report.json"
    result = cli("validate", exported, "--model", SPEC, "--prefill", 40, "--decode", 12, "--json", report_file)
    assert result.exit_code == 0, result.output
    report = json.loads(report_file.read_text())
    for case in report["cases"]:
        assert list(case["tensors"]) == ["logits", "key", "value", "feedback_key", "feedback_state"]
        assert 0 < max(t["max_abs"] for t in case["tensors"].values()) <= ATOL
    # live: with no tolerance at all, rounding differences fail it
    assert cli("validate", exported, "--model", SPEC, "--prefill", 40, "--decode", 12,
               "--atol", 0, "--rtol", 0).exit_code == 1


def test_example_runs_with_prompt_ids(exported):
    result = cli("run", exported, "--prompt-ids", "3,6,9,12", "--max-new-tokens", 6, "--ids")
    assert result.exit_code == 0, result.output
    generated = [int(t) for t in result.stdout.replace(",", " ").split()]
    assert len(generated) == 6 and all(0 <= t < 48 for t in generated)


def test_example_int8_passes_quality_on_token_ids(exported, trained, tmp_path):
    """quantize int8, then validate's quality check on token ids (--text-ids) of the training task."""
    sys.path.insert(0, str(EXAMPLE))
    try:
        from train import batch  # noqa: PLC0415 - the example's own data
    finally:
        sys.path.remove(str(EXAMPLE))
    ids = batch(torch.Generator().manual_seed(99), 64, 32).reshape(-1).numpy()
    np.save(tmp_path / "ids.npy", ids)
    out = tmp_path / "int8"
    assert cli("quantize", exported, "--mode", "int8", "-o", out).exit_code == 0
    report_file = tmp_path / "quality.json"
    result = cli("validate", out, "--model", SPEC, "--text-ids", tmp_path / "ids.npy", "--tokens", 2048,
                 "--window", 32, "--chunk", 16, "--json", report_file)
    assert result.exit_code == 0, result.output
    report = json.loads(report_file.read_text())
    assert report["ok"] and report["top1_agreement"] >= 0.99


def test_example_converts_to_a_sessa_lm_with_the_same_logits(exported, trained, tmp_path):
    out = tmp_path / "sessa"
    result = cli("convert", trained, "--model", SPEC, "-o", out)
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    assert config["n_kv_heads"] == [4, 2, 1] and config["lm_head_bias"] is True
    assert config["tie_embeddings"] is False
    module = load_factory_model(SPEC, trained)
    lm = load_checkpoint(out)
    ids = torch.from_numpy(np.random.default_rng(5).integers(0, 48, (2, 40)))
    with torch.no_grad():
        err = max_abs(lm(ids).numpy(), module(ids).numpy())
    assert err <= ATOL, f"converted SessaLM vs the module: {err:.3g}"
    # the SessaLM route exports it as well: validated against its own reference
    assert cli("export", out, "-o", tmp_path / "onnx").exit_code == 0
    assert cli("validate", tmp_path / "onnx", "--prefill", 40, "--decode", 8).exit_code == 0


def test_inspect_with_model(trained):
    result = cli("inspect", trained, "--model", SPEC)
    assert result.exit_code == 0, result.output
    assert "input_ids" in result.stdout and "maps onto SessaLM" in result.stdout
    assert "layers.2.mixer" in result.stdout


def test_step_wise_reference_is_checked_against_the_module_forward(trained):
    """The step-wise reference is built once against the module's forward, which catches a tracer
    that misread the module (here: one residual add read as a subtraction)."""
    import dataclasses

    module = load_factory_model(SPEC, trained)
    graph = trace(module)
    assert StepGraphRunner(module, graph).check_against_forward("example") <= ATOL
    index = next(i for i, n in enumerate(graph.nodes) if n.op == "add")
    graph.nodes[index] = dataclasses.replace(graph.nodes[index], op="sub")
    with pytest.raises(SessaExportError, match="differs from its own forward"):
        StepGraphRunner(module, graph).check_against_forward("example")


# -- `--model path/to/file.py:factory` and the messages ---------------------------------------------------------

def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_model_spec_messages(tmp_path, trained, exported):
    missing = tmp_path / "nope.py"
    assert_clean_error(cli("export", trained, "--model", f"{missing}:build", "-o", tmp_path / "o"),
                       "no such file", str(missing))
    assert_clean_error(cli("export", trained, "--model", f"{EXAMPLE / 'model.py'}:make", "-o", tmp_path / "o"),
                       "defines no factory 'make'", "build")
    raising = _write(tmp_path / "raising.py", "def build():\n    raise ValueError('bad width')\n")
    assert_clean_error(cli("inspect", trained, "--model", f"{raising}:build"), "build() raised ValueError: bad width")
    not_module = _write(tmp_path / "not_module.py", "def build():\n    return 42\n")
    assert_clean_error(cli("validate", exported, "--model", f"{not_module}:build"),
                       "build() returned int, not a torch.nn.Module")
    broken = _write(tmp_path / "broken.py", "import no_such_package_here\n")
    assert_clean_error(cli("convert", trained, "--model", f"{broken}:build", "-o", tmp_path / "c"),
                       f"importing {broken} failed", "no_such_package_here")
    assert_clean_error(cli("export", trained, "--model", "model.py", "-o", tmp_path / "o"), "path/to/file.py:factory")
    assert not (tmp_path / "o").exists() and not (tmp_path / "c").exists()


def test_pickled_module_is_refused_with_what_to_do(tmp_path):
    module = load_factory_model(SPEC, None)
    torch.save(module, tmp_path / "whole.pt")  # the whole module pickled: its code would run at load
    message = assert_clean_error(cli("export", tmp_path / "whole.pt", "--model", SPEC, "-o", tmp_path / "o"),
                                 "save model.state_dict() (or safetensors) and pass --config or --model")
    assert "add_safe_globals" not in message and "safe_globals" not in message


def test_package_module_form_needs_no_pythonpath(tmp_path):
    """`--model custom_models:factory` from the directory holding custom_models.py, with the installed
    console script (whose sys.path does not hold the current directory) and no PYTHONPATH."""
    script = shutil.which("sessa-export")
    if script is None:
        pytest.skip("the sessa-export console script is not installed")
    import custom_models

    torch.save(randomize_weights(custom_models.factory(), seed=3).state_dict(), tmp_path / "w.pt")
    proc = subprocess.run([script, "inspect", str(tmp_path / "w.pt"), "--model", "custom_models:factory"],
                          cwd=TESTS_DIR, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "blocks.1.mixer" in proc.stdout


# -- SessaLM: per-layer kv heads and a biased head, on both back ends -----------------------------------------

def mixed_lm(**fields) -> SessaLM:
    config = SessaConfig(**{**dict(vocab_size=64, d_model=32, n_layers=3, n_heads=4, n_kv_heads=(4, 2, 1),
                                   lm_head_bias=True, mlp_ratio=2.0), **fields})
    return randomize_weights(SessaLM(config), seed=11).eval()


def test_config_keys_per_layer_kv_heads_and_head_bias(tmp_path):
    model = mixed_lm()
    assert [layer.mixer.n_kv_heads for layer in model.layers] == [4, 2, 1]
    assert model.lm_head.bias is not None and model.config.num_parameters() == model.num_parameters()
    saved = save_checkpoint(model, tmp_path / "ckpt")
    assert json.loads((saved / "config.json").read_text())["n_kv_heads"] == [4, 2, 1]
    loaded = load_checkpoint(saved)
    assert loaded.config == model.config and torch.equal(loaded.lm_head.bias, model.lm_head.bias)
    base = dict(vocab_size=64, d_model=32, n_layers=3, n_heads=4)
    for bad, words in [({"n_kv_heads": [4, 2]}, "one per layer"), ({"n_kv_heads": [4, 3, 1]}, "multiple"),
                       ({"n_kv_heads": [4, True, 1]}, "one per layer"), ({"lm_head_bias": "yes"}, "lm_head_bias")]:
        with pytest.raises(SessaExportError, match=words):
            SessaConfig.from_dict({**base, **bad})
    # a biased head's checkpoint without the bias names the key
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.bias"}
    torch.save({"config": model.config.to_dict(), "state_dict": state}, tmp_path / "nobias.pt")
    with pytest.raises(SessaExportError, match="missing keys: lm_head.bias"):
        load_checkpoint(tmp_path / "nobias.pt")


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_mixed_kv_heads_and_biased_head_onnx_parity(tmp_path, tied):
    model = mixed_lm(tie_embeddings=tied)
    out = export_onnx(trace(model), tmp_path / "onnx")
    ids = np.random.default_rng(2).integers(0, 64, (2, sum(CHUNKS)))
    run_parity(model, OrtRunner(out, threads=1), ids, CHUNKS)


def test_mixed_kv_heads_and_biased_head_tvm_parity(tmp_path, one_tvm_thread):
    from sessa_export.runtime.tvm_runner import TvmRunner
    from sessa_export.to_tvm import CompileTarget, compile_graph

    model = mixed_lm(tie_embeddings=True)
    out = compile_graph(trace(model), tmp_path / "tvm", CompileTarget("cpu"), max_len=128)
    ids = np.random.default_rng(3).integers(0, 64, (1, 90))
    run_parity(model, TvmRunner(out, threads=1), ids, [1, 1, 70, 3, 1, 14])


# -- convert: what does not map is named -----------------------------------------------------------------------

def test_convert_names_what_does_not_map(tmp_path):
    import custom_models

    for factory, words in [("factory", "SessaLM has one n_heads for all layers; the mixers have blocks.0.mixer: 2"),
                           ("extra_norm_factory", "`pre_norm` (LayerNorm)"),
                           ("unused_parameter_factory", "its keys spare.weight, spare.bias are read by nothing")]:
        weights = tmp_path / f"{factory}.pt"
        torch.save(randomize_weights(getattr(custom_models, factory)(), seed=4).state_dict(), weights)
        out = tmp_path / factory
        message = assert_clean_error(cli("convert", weights, "--model", f"{TESTS_DIR / 'custom_models.py'}:{factory}",
                                         "-o", out), "does not map" if factory != "factory" else "n_heads", words)
        assert not out.exists(), message


# -- tied tables under quantization ----------------------------------------------------------------------------

def test_tied_table_stored_once_and_kept_float_by_int8_and_int4(tmp_path):
    model = mixed_lm(tie_embeddings=True, d_model=64)
    fp32 = export_onnx(trace(model), tmp_path / "fp32")
    graph = onnx.load(str(fp32 / "model.onnx")).graph
    tables = [i for i in graph.initializer if list(i.dims) in ([64, 64],) and i.name in ("embed.weight", "lm_head.weight")]
    assert [t.name for t in tables] == ["embed.weight"], "the tied table is stored once"
    for mode in ("int8", "int4"):
        out = tmp_path / mode
        result = cli("quantize", fp32, "--mode", mode, "-o", out)
        assert result.exit_code == 0, result.output
        assert "left in float32: embed.weight (tied to the LM head" in " ".join(result.stdout.split())
        record = json.loads((out / "sessa_config.json").read_text())["quantization"]
        assert record["float_weights"] == ["embed.weight"] and "tied to the LM head" in record["method"]
        inits = [i.name for i in onnx.load(str(out / "model.onnx")).graph.initializer]
        assert inits.count("embed.weight") == 1 and not any(n.startswith("lm_head.weight") for n in inits)
    # an untied head is quantized as before
    untied = export_onnx(trace(mixed_lm(d_model=64)), tmp_path / "untied")
    manifest = quantize_export(untied, tmp_path / "untied-int8", "int8")
    assert manifest["quantization"]["float_weights"] == []
    assert {"embed.weight", "lm_head.weight"} <= set(manifest["quantization"]["quantized_weights"])
