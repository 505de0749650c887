"""Checkpoints: every accepted form round-trips; every bad input gets exit code 2 and a message
naming the file, key or shape at fault, through `sessa-export inspect`, without a traceback."""

from __future__ import annotations

import builtins
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from typer.testing import CliRunner

from sessa_export.checkpoint import load_checkpoint, save_checkpoint
from sessa_export.cli import app
from sessa_export.config import SessaConfig
from sessa_export.errors import SessaExportError
from sessa_export.model import SessaLM, init_weights

CONFIG = SessaConfig(vocab_size=40, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_ratio=1.0)


def make_model(config: SessaConfig = CONFIG, seed: int = 0) -> SessaLM:
    return init_weights(SessaLM(config), seed=seed, std=0.1).eval()


def logits(model: SessaLM) -> torch.Tensor:
    ids = torch.arange(12).remainder(model.config.vocab_size)[None]
    with torch.no_grad():
        return model(ids)


def assert_same_model(got: SessaLM, want: SessaLM) -> None:
    assert got.config == want.config
    assert not got.training
    got_sd, want_sd = got.state_dict(), want.state_dict()
    assert set(got_sd) == set(want_sd)
    for key in want_sd:
        assert torch.equal(got_sd[key], want_sd[key]), key
    assert torch.equal(logits(got), logits(want))


def plain_state_dict(model: SessaLM) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def write_config(path: Path, data: dict) -> Path:
    path.write_text(json.dumps(data))
    return path


def inspect(*args: str):
    result = CliRunner().invoke(app, ["inspect", *map(str, args)])
    assert "Traceback" not in result.output
    return result


def inspect_fails(*args: str) -> str:
    """Run `inspect`, require exit code 2 with a one-line error and no traceback; return the output."""
    result = inspect(*args)
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit)
    assert "error:" in result.output
    return " ".join(result.output.split())  # unwrap


# ---------------------------------------------------------------------------------------------
# round trips


def test_directory_round_trip(tmp_path):
    model = make_model()
    out = save_checkpoint(model, tmp_path / "ckpt")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert json.loads((out / "config.json").read_text()) == CONFIG.to_dict()
    assert_same_model(load_checkpoint(out), model)
    # saving again over an existing directory replaces it
    other = make_model(seed=1)
    save_checkpoint(other, out)
    assert_same_model(load_checkpoint(out), other)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temporary left behind


def test_torch_file_with_config_round_trip(tmp_path):
    model = make_model()
    path = tmp_path / "model.pt"
    torch.save({"config": CONFIG.to_dict(), "state_dict": plain_state_dict(model)}, path)
    assert_same_model(load_checkpoint(path), model)
    assert inspect(path).exit_code == 0


def test_bare_state_dict_with_config_file(tmp_path):
    model = make_model()
    path = tmp_path / "weights.bin"
    torch.save(plain_state_dict(model), path)
    cfg = write_config(tmp_path / "my-config.json", CONFIG.to_dict())
    assert_same_model(load_checkpoint(path, cfg), model)
    assert inspect(path, "--config", cfg).exit_code == 0
    # without a config it is refused, saying what to pass
    message = inspect_fails(path)
    assert str(path) in message and "--config" in message


def test_safetensors_file_with_config_beside_it(tmp_path):
    model = make_model()
    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in plain_state_dict(model).items()}, str(path))
    write_config(tmp_path / "config.json", CONFIG.to_dict())
    assert_same_model(load_checkpoint(path), model)
    assert inspect(path).exit_code == 0


def test_tied_embeddings_store_the_head_once(tmp_path):
    config = SessaConfig(vocab_size=40, d_model=32, n_layers=1, n_heads=2, tie_embeddings=True)
    model = make_model(config)
    assert model.lm_head.weight is model.embed.weight
    out = save_checkpoint(model, tmp_path / "tied")
    with safe_open(str(out / "model.safetensors"), "pt") as fh:
        keys = set(fh.keys())
    assert "lm_head.weight" not in keys and "embed.weight" in keys
    loaded = load_checkpoint(out)
    assert loaded.lm_head.weight is loaded.embed.weight
    assert_same_model(loaded, model)
    # a torch file that does carry lm_head.weight for a tied model also loads
    path = tmp_path / "tied.pt"
    torch.save({"config": config.to_dict(), "state_dict": plain_state_dict(model)}, path)
    assert_same_model(load_checkpoint(path), model)


def test_reference_buffers_are_accepted(tmp_path):
    """A SessaLM state_dict with the reference code's derived buffers in every layer loads as it is."""
    config = SessaConfig(vocab_size=40, d_model=32, n_layers=2, n_heads=4, max_len=64)
    model = make_model(config)
    sd = plain_state_dict(model)
    for i in range(config.n_layers):
        p = f"layers.{i}.mixer."
        sd[p + "rope_inv_freq"] = 1.0 / (10000.0 ** (torch.arange(0, 8, 2, dtype=torch.float32) / 8))
        sd[p + "causal_mask_f_full"] = torch.ones(64, 64, dtype=torch.bool).tril()
        sd[p + "causal_mask_fb_full"] = torch.ones(64, 64, dtype=torch.bool).tril(-1)
    path = tmp_path / "ref.pt"
    torch.save({"config": config.to_dict(), "state_dict": sd}, path)
    assert_same_model(load_checkpoint(path), model)


def test_inspect_prints_parameters_and_state_per_token(tmp_path):
    model = make_model()
    out = save_checkpoint(model, tmp_path / "ckpt")
    result = inspect(out)
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    D, L, H, Hkv = CONFIG.d_model, CONFIG.n_layers, CONFIG.n_heads, CONFIG.kv_heads
    hidden = int(CONFIG.mlp_ratio * D)
    per_layer = (2 * D * D + 2 * D) + (D * D + D) + 2 * (Hkv * (D // H) * D + Hkv * (D // H)) + D * D \
        + (2 * D * D + 2 * D) + 1 + D + (D * D + D) + 2 * D \
        + (2 * D + D * hidden + hidden + hidden * D + D)
    params = CONFIG.vocab_size * D * 2 + L * per_layer + 2 * D
    assert params == sum(p.numel() for p in model.parameters())
    assert f"{params:,}" in text
    values = L * (2 * Hkv * (D // H) + 2 * D)  # spec §2: (2·Hkv·d + 2·D) per layer
    assert f"{values:,} values" in text
    assert f"{values * 4} B" in text  # float32


@pytest.mark.parametrize("rope, inv_freq_len", [(True, 3), (False, 4)], ids=["wrong-shape", "rope-off"])
def test_bad_reference_buffer_is_a_clean_error(tmp_path, rope, inv_freq_len):
    """A rope_inv_freq buffer that does not fit (wrong shape, or RoPE off) is ignored or refused by name."""
    config = SessaConfig(vocab_size=40, d_model=32, n_layers=1, n_heads=4, use_forward_rope=rope)
    sd = plain_state_dict(make_model(config))
    sd["layers.0.mixer.rope_inv_freq"] = torch.ones(inv_freq_len)
    path = tmp_path / "buffers.pt"
    torch.save({"config": config.to_dict(), "state_dict": sd}, path)
    result = inspect(path)
    assert result.exit_code in (0, 2), repr(result.exception)
    assert isinstance(result.exception, (SystemExit, type(None)))
    if result.exit_code == 2:
        assert "layers.0.mixer.rope_inv_freq" in result.output


# ---------------------------------------------------------------------------------------------
# bad inputs, each through the CLI


def good_directory(tmp_path: Path, config: SessaConfig = CONFIG) -> Path:
    return save_checkpoint(make_model(config), tmp_path / "ckpt")


def test_missing_file(tmp_path):
    path = tmp_path / "nope.safetensors"
    message = inspect_fails(path)
    assert "not found" in message and str(path) in message
    empty = tmp_path / "empty-dir"
    empty.mkdir()
    message = inspect_fails(empty)
    assert "model.safetensors" in message and str(empty) in message


def test_missing_config_json_in_directory(tmp_path):
    out = good_directory(tmp_path)
    (out / "config.json").unlink()
    message = inspect_fails(out)
    assert "config.json" in message and "not found" in message


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    sd = plain_state_dict(make_model())
    del sd["layers.1.mixer.gamma_bias"], sd["norm_f.weight"]
    sd["layers.0.mixer.extra.weight"] = torch.zeros(3)
    sd["bogus"] = torch.zeros(1)
    path = tmp_path / "m.pt"
    torch.save({"config": CONFIG.to_dict(), "state_dict": sd}, path)
    message = inspect_fails(path)
    assert str(path) in message
    assert "missing keys" in message and "unexpected keys" in message
    for key in ("layers.1.mixer.gamma_bias", "norm_f.weight", "layers.0.mixer.extra.weight", "bogus"):
        assert key in message


def test_shape_mismatch_names_key_and_both_shapes(tmp_path):
    out = good_directory(tmp_path)
    sd = plain_state_dict(load_checkpoint(out))
    sd["layers.1.mixer.k_proj.weight"] = torch.zeros(32, 32)  # expects (Hkv·d, D) = (16, 32)
    save_file(sd, str(out / "model.safetensors"))
    message = inspect_fails(out)
    assert "layers.1.mixer.k_proj.weight" in message
    assert "(32, 32)" in message and "(16, 32)" in message


@pytest.mark.parametrize("change, expected", [
    ({"d_model": 30}, ["d_model (30)", "n_heads (4)"]),
    ({"n_kv_heads": 3}, ["n_heads (4)", "n_kv_heads (3)"]),
    ({"d_model": 12, "n_kv_heads": None}, ["head width", "3", "even"]),
    ({"gamma_max": 1.0}, ["gamma_max", "(0, 1)", "1.0"]),
    ({"gamma_max": 0.0}, ["gamma_max", "(0, 1)"]),
    ({"gamma_max": -0.5}, ["gamma_max", "-0.5"]),
    ({"n_layers": 0}, ["n_layers", "0"]),
    ({"n_headz": 4}, ["unknown config keys", "n_headz"]),
])
def test_inconsistent_config(tmp_path, change, expected):
    out = good_directory(tmp_path)
    data = {**CONFIG.to_dict(), **change}
    write_config(out / "config.json", data)
    message = inspect_fails(out)
    assert "config" in message
    for text in expected:
        assert text in message, (text, message)


def test_inconsistent_config_names_the_file(tmp_path):
    out = good_directory(tmp_path)
    write_config(out / "config.json", {**CONFIG.to_dict(), "d_model": 30})
    assert str(out / "config.json") in inspect_fails(out)


def test_config_that_is_not_json(tmp_path):
    out = good_directory(tmp_path)
    (out / "config.json").write_text("{not json")
    message = inspect_fails(out)
    assert "config.json" in message and "JSON" in message


def test_non_finite_weights_are_named(tmp_path):
    sd = plain_state_dict(make_model())
    sd["layers.0.W_out.weight"][3, 4] = float("nan")
    sd["embed.weight"][0, 0] = float("inf")
    path = tmp_path / "bad.safetensors"
    save_file(sd, str(path))
    write_config(tmp_path / "config.json", CONFIG.to_dict())
    message = inspect_fails(path)
    assert "non-finite" in message and str(path) in message
    assert "layers.0.W_out.weight" in message and "embed.weight" in message
    assert "layers.0.W_in.weight" not in message


@pytest.mark.parametrize("name, content", [
    ("random.pt", bytes(range(7, 256)) * 40),
    ("notes.safetensors", b"these are not weights\n" * 10),
    ("empty.bin", b""),
])
def test_file_that_is_neither_safetensors_nor_torch(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    write_config(tmp_path / "config.json", CONFIG.to_dict())
    message = inspect_fails(path)
    assert str(path) in message and "not a safetensors or torch checkpoint" in message


def test_corrupt_safetensors_and_torch_files(tmp_path):
    write_config(tmp_path / "config.json", CONFIG.to_dict())
    good = tmp_path / "good.safetensors"
    save_file({k: v.contiguous() for k, v in plain_state_dict(make_model()).items()}, str(good))
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:1000])
    message = inspect_fails(truncated)
    assert str(truncated) in message and "safetensors" in message
    torch.save(plain_state_dict(make_model()), tmp_path / "good.pt")
    broken = tmp_path / "broken.pt"
    broken.write_bytes((tmp_path / "good.pt").read_bytes()[:2000])  # a zip cut short
    message = inspect_fails(broken)
    assert str(broken) in message and "torch" in message


class CustomObject:
    """Any non-tensor class instance: weights_only=True must refuse it."""

    def __init__(self):
        self.payload = [1, 2, 3]


class Opener:
    """Unpickling this creates a file: proof that code ran."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (builtins.open, (self.marker, "w"))


@pytest.mark.parametrize("legacy", [False, True])
@pytest.mark.parametrize("kind", ["custom-class", "code-execution"])
def test_pickled_object_is_refused_without_running_code(tmp_path, legacy, kind):
    marker = tmp_path / "code-ran"
    obj = CustomObject() if kind == "custom-class" else Opener(str(marker))
    sd = plain_state_dict(make_model())
    path = tmp_path / "evil.pt"
    torch.save({"config": CONFIG.to_dict(), "state_dict": sd, "extra": obj}, path,
               _use_new_zipfile_serialization=not legacy)
    message = inspect_fails(path)
    assert str(path) in message and "weights_only" in message
    refused = "CustomObject" if kind == "custom-class" else "open"
    assert refused in message  # names what was refused
    assert "save model.state_dict()" in message and "add_safe_globals" not in message  # advice a CLI user can act on
    assert not marker.exists()


def test_refused_pickle_message_is_one_line(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {}, "extra": CustomObject()}, path)
    result = inspect(path)
    assert result.exit_code == 2
    assert len(result.output.strip().splitlines()) == 1 and "\x1b[" not in result.output


def test_torch_file_holding_something_else(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], path)
    message = inspect_fails(path)
    assert str(path) in message and "state_dict" in message
    path = tmp_path / "cfg.pt"
    torch.save({"config": "not a dict", "state_dict": plain_state_dict(make_model())}, path)
    message = inspect_fails(path)
    assert "config" in message and "dict" in message


def test_api_raises_sessa_export_error(tmp_path):
    with pytest.raises(SessaExportError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")


def test_real_process_exit_code_and_no_traceback(tmp_path):
    """The installed entry point itself: exit 2, one error line on stderr, no traceback."""
    path = tmp_path / "garbage.bin"
    path.write_bytes(b"\x00garbage" * 50)
    env = {**os.environ, "COLUMNS": "200"}
    proc = subprocess.run([sys.executable, "-m", "sessa_export.cli", "inspect", str(path)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stdout + proc.stderr
    assert "not a safetensors or torch checkpoint" in proc.stderr
    assert str(path) in " ".join(proc.stderr.split()) or path.name in proc.stderr
