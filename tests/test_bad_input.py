"""Plain mistakes get one line and exit code 2 before any work (issue 13's kinds 4-6, as far as they
are closed): configs whose values are the wrong type or too big for this machine, sampling settings
and sizes that cannot run, a report path that cannot be written after the run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from parity import assert_clean_error, cli
from sessa_export.config import SessaConfig
from sessa_export.data import BUNDLED_MODEL
from sessa_export.errors import SessaExportError
from sessa_export.generate import MAX_NEW_TOKENS, Sampling

BASE = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=2)


@pytest.mark.parametrize("change, words", [
    ({"use_forward_rope": "false"}, ("use_forward_rope must be true or false", "'false'")),
    ({"tie_embeddings": "no"}, ("tie_embeddings must be true or false",)),
    ({"max_len": True}, ("max_len must be a positive integer",)),
    ({"n_kv_heads": True}, ("n_kv_heads must be a positive integer",)),
    ({"mlp_ratio": float("inf")}, ("mlp_ratio must be a finite number",)),
    ({"gamma_max": float("nan")}, ("gamma_max must lie in (0, 1)",)),
    ({"n_layers": 10**6, "d_model": 160, "n_heads": 4}, ("parameters need", "GiB of memory", "n_layers")),
    ({"vocab_size": 10**12}, ("parameters need", "GiB of memory")),
])
def test_configs_are_refused_by_value_and_size(change, words, tmp_path):
    with pytest.raises(SessaExportError) as info:
        SessaConfig.from_dict({**BASE, **change}, source="config.json")
    assert all(word in str(info.value) for word in words), str(info.value)
    # the CLI says the same in one line, exit 2, before allocating anything
    (tmp_path / "config.json").write_text(json.dumps({**BASE, **change}, allow_nan=True))
    result = cli("inspect", BUNDLED_MODEL / "model.safetensors", "--config", tmp_path / "config.json")
    assert_clean_error(result, words[0])


def test_a_config_the_size_of_the_bundled_model_is_accepted():
    config = json.loads((BUNDLED_MODEL / "config.json").read_text())
    assert SessaConfig.from_dict(config).num_parameters() == 1_485_124


@pytest.mark.parametrize("settings, words", [
    (dict(temperature=float("nan")), "temperature must be a finite number"),
    (dict(temperature=float("inf")), "temperature must be a finite number"),
    (dict(seed=-1), "seed must be an integer >= 0"),
    (dict(top_p=float("nan")), "top_p must lie in (0, 1]"),
])
def test_sampling_settings_are_refused(settings, words):
    with pytest.raises(SessaExportError, match=words.replace("(", r"\(").replace("]", r"\]")):
        Sampling(**settings)


@pytest.mark.parametrize("args, words", [
    (("--seed", "-1"), ("seed must be an integer >= 0",)),
    (("--temperature", "nan"), ("temperature must be a finite number",)),
    (("--max-new-tokens", str(10**12)), (str(10**12), str(MAX_NEW_TOKENS))),
])
def test_run_refuses_bad_settings_before_loading(args, words, tmp_path):
    result = cli("run", tmp_path / "does-not-exist", "--prompt", "x", *args)
    assert_clean_error(result, *words)  # the setting, not the missing artifact: checked first


def test_validate_refuses_a_report_path_it_cannot_write_before_the_run(tmp_path):
    result = cli("validate", tmp_path / "does-not-exist", "--json", tmp_path / "no" / "such" / "report.json")
    assert_clean_error(result, "--json", "does not exist")


def test_bench_refuses_a_thread_count_below_one():
    result = cli("bench", BUNDLED_MODEL, "--threads", "-1")
    assert result.exit_code == 2 and "--threads" in result.output


# -- weights, prompts and validation settings ---------------------------------------------------------
def _checkpoint_with(make_lm, tmp_path, key: str, tensor) -> Path:
    from safetensors.torch import load_file, save_file

    from sessa_export.checkpoint import save_checkpoint

    out = save_checkpoint(make_lm(seed=1, vocab_size=64, d_model=32, n_layers=1, n_heads=2), tmp_path / "ckpt")
    tensors = load_file(str(out / "model.safetensors"))
    tensors[key] = tensor(tensors[key])
    save_file(tensors, str(out / "model.safetensors"))
    return out


@pytest.mark.parametrize("change, words", [
    (lambda t: t.to(torch.int8), ("layers.0.W_in.weight (int8)", "float16, bfloat16, float32 or float64")),
    (lambda t: t > 0, ("layers.0.W_in.weight (bool)",)),
    (lambda t: t.to(torch.float8_e4m3fn), ("layers.0.W_in.weight (float8_e4m3fn)",)),
    (lambda t: torch.full_like(t, 1e39, dtype=torch.float64), ("non-finite", "as float32", "layers.0.W_in.weight")),
])
def test_weights_that_are_not_trained_floats_are_refused(make_lm, tmp_path, change, words):
    checkpoint = _checkpoint_with(make_lm, tmp_path, "layers.0.W_in.weight", change)
    assert_clean_error(cli("export", checkpoint, "-o", tmp_path / "out"), *words)
    assert not (tmp_path / "out").exists()


def test_a_prompt_that_is_not_utf8_is_refused():
    result = cli("run", BUNDLED_MODEL, "--prompt", "caf\udce9", "--max-new-tokens", "2")
    assert_clean_error(result, "--prompt is not valid UTF-8")


def test_validate_refuses_steps_past_the_artifact_and_fits_its_defaults(make_lm, tmp_path):
    from sessa_export.checkpoint import save_checkpoint

    checkpoint = save_checkpoint(make_lm(seed=1, vocab_size=256, d_model=32, n_layers=1, n_heads=2, max_len=80),
                                 tmp_path / "ckpt")
    assert cli("export", checkpoint, "-o", tmp_path / "onnx").exit_code == 0
    assert_clean_error(cli("validate", tmp_path / "onnx", "--prefill", "70", "--decode", "20"),
                       "need 90 positions", "at most 80")
    result = cli("validate", tmp_path / "onnx")  # the defaults shrink to fit, and say PASS
    assert result.exit_code == 0 and "PASS" in result.stdout, result.output


def test_the_quality_check_refuses_a_text_shorter_than_it_reads():
    from sessa_export import quality

    with pytest.raises(SessaExportError, match="has 10 bytes, fewer than the 16384"):
        quality.text_ids(b"0123456789", 16384, 256, 256)


def test_a_demo_failing_late_leaves_nothing_behind(tmp_path, monkeypatch):
    """Both outputs written (the ONNX export for real, the compile by a stand-in that writes its folder:
    a real one takes 5 s here), then a failure: neither is left."""
    from sessa_export import demo

    def compiled(graph, out, *args, **kwargs):
        out.mkdir()
        (out / "model.so").write_bytes(b"stand-in")

    def broken(*args, **kwargs):
        raise SessaExportError("injected late failure")

    monkeypatch.setattr(demo, "compile_graph", compiled)
    monkeypatch.setattr(demo, "TvmRunner", broken)
    result = cli("demo", "-o", tmp_path / "demo", "--max-new-tokens", "4")
    assert_clean_error(result, "injected late failure")
    assert not (tmp_path / "demo" / "onnx").exists() and not (tmp_path / "demo" / "tvm-cpu").exists()


def test_a_failed_link_names_what_the_linker_said():
    """TVM's compiler errors end with the command line; the one-line message gives the tool's first line."""
    from sessa_export.to_tvm import tool_error

    message = ("Compilation error:\n/usr/bin/ld: lib0.o: relocation truncated to fit: R_X86_64_PC32\n"
               "collect2: error: ld returned 1 exit status\n\nCommand line: /usr/bin/g++ -shared -o model.so lib0.o")
    assert tool_error(RuntimeError(message)) == "/usr/bin/ld: lib0.o: relocation truncated to fit: R_X86_64_PC32"
    assert tool_error(RuntimeError("TVMError: something\nCheck failed: x")) == "Check failed: x"
