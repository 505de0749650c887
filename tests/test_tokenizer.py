"""Tokenizers and token ids (issue 14, item 1): a model with its own vocabulary, end to end.

A BPE tokenizer.json is trained here with the `tokenizers` library on a few kilobytes of the bundled
held-out text (a vocabulary under 256, so bytes are no valid ids for it); a small random SessaLM of
that vocabulary is exported with it, run, validated, quantized and compiled. Generated text is
checked against the tokenizer's own decoding of the PyTorch reference's greedy ids (full-sequence
forward, independent of the step path).
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from parity import assert_clean_error, cli
from sessa_export.checkpoint import save_checkpoint
from sessa_export.data import heldout_bytes

PROMPT = "def parse(self, text):\n    return"
NEW = 12


def train_tokenizer(path, vocab_size: int = 200):
    """A byte-level BPE on 8 KiB of the held-out text; its alphabet is the text's own bytes only."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False)
    tokenizer.train_from_iterator([heldout_bytes()[:8192].decode("utf-8")], trainer)
    tokenizer.save(str(path))
    return tokenizer


def greedy_ids(model, prompt_ids: list[int], n: int) -> list[int]:
    """Greedy continuation with the full-sequence forward of the PyTorch reference."""
    ids = torch.tensor([prompt_ids])
    with torch.inference_mode():
        for _ in range(n):
            ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[0, len(prompt_ids):].tolist()


@pytest.fixture(scope="module")
def lm(make_lm, tmp_path_factory):
    """The tokenizer, a model of its vocabulary (checkpoint), and its export made with --tokenizer."""
    root = tmp_path_factory.mktemp("tokenizer")
    tokenizer = train_tokenizer(root / "tokenizer.json")
    vocab = tokenizer.get_vocab_size()
    assert 100 < vocab < 256
    model = make_lm(seed=5, std=0.2, vocab_size=vocab, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_len=512)
    checkpoint = save_checkpoint(model, root / "checkpoint")
    result = cli("export", checkpoint, "--tokenizer", root / "tokenizer.json", "-o", root / "onnx")
    assert result.exit_code == 0, result.output
    return dict(root=root, tokenizer=tokenizer, file=root / "tokenizer.json", model=model, checkpoint=checkpoint,
                onnx=root / "onnx")


def run_stdout(*args) -> str:
    result = cli("run", *args)
    assert result.exit_code == 0, result.output
    assert result.stdout.endswith("\n")
    return result.stdout[:-1]


def test_export_copies_the_tokenizer_and_records_it(lm):
    manifest = json.loads((lm["onnx"] / "sessa_config.json").read_text())
    assert manifest["tokenizer"] == "tokenizer.json"
    data = (lm["onnx"] / "tokenizer.json").read_bytes()
    assert data == lm["file"].read_bytes()
    assert manifest["files"]["tokenizer.json"] == hashlib.sha256(data).hexdigest()


def test_run_uses_the_artifacts_tokenizer(lm):
    tokenizer, model = lm["tokenizer"], lm["model"]
    expected = tokenizer.decode(greedy_ids(model, tokenizer.encode(PROMPT).ids, NEW))
    assert expected  # the greedy ids decode to some text
    assert run_stdout(lm["onnx"], "--prompt", PROMPT, "--max-new-tokens", NEW) == expected
    # the PyTorch runner on the checkpoint, told the tokenizer
    assert run_stdout(lm["checkpoint"], "--tokenizer", lm["file"], "--prompt", PROMPT, "--max-new-tokens", NEW) == expected


def test_run_prompt_ids_and_ids_output(lm):
    tokenizer, model = lm["tokenizer"], lm["model"]
    prompt = [5, 17, 3, 40, 99]
    ids = greedy_ids(model, prompt, NEW)
    given = ",".join(map(str, prompt))
    assert run_stdout(lm["onnx"], "--prompt-ids", given, "--ids", "--max-new-tokens", NEW) == ",".join(map(str, ids))
    assert run_stdout(lm["onnx"], "--prompt-ids", given, "--max-new-tokens", NEW) == tokenizer.decode(ids)
    text_ids = tokenizer.encode(PROMPT).ids
    assert run_stdout(lm["onnx"], "--prompt", PROMPT, "--ids", "--max-new-tokens", NEW) == ",".join(
        map(str, greedy_ids(model, text_ids, NEW)))


@pytest.fixture(scope="module")
def plain(lm):
    """The same model exported without a tokenizer, and its int8 quantization."""
    root = lm["root"]
    assert cli("export", lm["checkpoint"], "-o", root / "plain").exit_code == 0
    result = cli("quantize", root / "plain", "--mode", "int8", "-o", root / "plain-int8")
    assert result.exit_code == 0, result.output
    return dict(onnx=root / "plain", int8=root / "plain-int8")


def test_a_model_without_a_tokenizer_takes_and_prints_ids(lm, plain):
    prompt = [7, 8, 9]
    ids = greedy_ids(lm["model"], prompt, NEW)
    assert run_stdout(plain["onnx"], "--prompt-ids", "7,8,9", "--max-new-tokens", NEW) == ",".join(map(str, ids))
    assert_clean_error(cli("run", plain["onnx"], "--prompt", PROMPT), "no tokenizer", "--tokenizer", "--prompt-ids")
    # told one, it decodes
    assert run_stdout(plain["onnx"], "--tokenizer", lm["file"], "--prompt-ids", "7,8,9",
                      "--max-new-tokens", NEW) == lm["tokenizer"].decode(ids)


def test_validate_fp32_passes_on_tokenized_text(lm):
    result = cli("validate", lm["onnx"], "--prefill", 48, "--decode", 16)
    assert result.exit_code == 0, result.output
    assert "PASS" in result.stdout and "text as token ids" in result.stdout


def heldout_token_ids(lm) -> np.ndarray:
    return np.array(lm["tokenizer"].encode(heldout_bytes().decode("utf-8")).ids, dtype=np.int64)


def quality_ok(result) -> None:
    """validate ran the quality check to its end: a report per token, PASS or FAIL, no traceback."""
    assert result.exit_code in (0, 1), result.output
    assert "Traceback" not in result.output
    assert "top-1 agreement" in result.stdout and "bits/token" in result.stdout, result.stdout
    assert ("PASS" in result.stdout) == (result.exit_code == 0)


def test_quantized_validate_with_text_ids(lm, plain, tmp_path):
    ids = heldout_token_ids(lm)[:6000]
    lines = tmp_path / "ids.txt"
    lines.write_text("\n".join(map(str, ids)) + "\n")
    npy = tmp_path / "ids.npy"
    np.save(npy, ids.astype(np.int32))
    reports = []
    for path in (lines, npy):
        report = tmp_path / f"{path.suffix[1:]}.json"
        result = cli("validate", plain["int8"], "--text-ids", path, "--tokens", 4096, "--json", report)
        quality_ok(result)
        reports.append(json.loads(report.read_text()))
    assert reports[0] == reports[1]  # the same ids from either file form
    assert reports[0]["unit"] == "token" and reports[0]["positions"] == 4096


def test_quantized_validate_of_a_model_without_a_tokenizer_says_what_to_pass(plain):
    """It died of an IndexError reading the text as bytes."""
    assert_clean_error(cli("validate", plain["int8"]), "vocabulary has", "--tokenizer", "--text-ids")


def test_quantize_carries_the_tokenizer_and_validate_tokenizes_the_text(lm, tmp_path):
    out = tmp_path / "int8"
    assert cli("quantize", lm["onnx"], "--mode", "int8", "-o", out).exit_code == 0
    manifest = json.loads((out / "sessa_config.json").read_text())
    assert manifest["tokenizer"] == "tokenizer.json" and "tokenizer.json" in manifest["files"]
    result = cli("validate", out, "--tokens", 4096, "--json", tmp_path / "report.json")
    quality_ok(result)
    # the held-out text through the tokenizer: the same report as those ids given as such
    ids = tmp_path / "ids.npy"
    np.save(ids, heldout_token_ids(lm))
    quality_ok(cli("validate", out, "--text-ids", ids, "--tokens", 4096, "--json", tmp_path / "ids.json"))
    assert json.loads((tmp_path / "report.json").read_text()) == json.loads((tmp_path / "ids.json").read_text())


def test_compile_with_a_tokenizer_then_run(lm, tmp_path):
    tokenizer, model = lm["tokenizer"], lm["model"]
    out = tmp_path / "tvm"
    result = cli("compile", lm["checkpoint"], "--tokenizer", lm["file"], "--max-len", 64, "-o", out)
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "sessa_config.json").read_text())
    assert manifest["tokenizer"] == "tokenizer.json"
    assert manifest["files"]["tokenizer.json"] == hashlib.sha256(lm["file"].read_bytes()).hexdigest()
    expected = tokenizer.decode(greedy_ids(model, tokenizer.encode(PROMPT).ids, NEW))
    assert run_stdout(out, "--prompt", PROMPT, "--max-new-tokens", NEW) == expected


# -- one line and exit code 2 for each mistake -----------------------------------------------------------------

def test_a_missing_or_corrupt_tokenizer_is_one_line(lm, tmp_path):
    for args, words in (((tmp_path / "nope.json",), ("nope.json", "no such file")),
                        ((tmp_path,), ("is a directory",))):
        assert_clean_error(cli("export", lm["checkpoint"], "--tokenizer", *args, "-o", tmp_path / "out"), *words)
        assert_clean_error(cli("run", lm["onnx"], "--tokenizer", *args, "--prompt", "x"), *words)
    broken = tmp_path / "broken.json"
    broken.write_text('{"model": ')
    for command in (("export", lm["checkpoint"], "-o", tmp_path / "out"),
                    ("compile", lm["checkpoint"], "-o", tmp_path / "out"),
                    ("run", lm["onnx"], "--prompt", "x"), ("validate", lm["onnx"]), ("bench", lm["onnx"])):
        assert_clean_error(cli(*command, "--tokenizer", broken), "broken.json", "not a tokenizer.json")
    assert not (tmp_path / "out").exists()


def test_a_tokenizer_larger_than_the_vocabulary_is_refused(lm, make_lm, tmp_path):
    vocab = lm["tokenizer"].get_vocab_size()
    small = save_checkpoint(make_lm(seed=6, vocab_size=vocab - 10, d_model=32, n_layers=1, n_heads=2), tmp_path / "c")
    words = (f"has {vocab} tokens", f"vocab_size {vocab - 10}")
    assert_clean_error(cli("export", small, "--tokenizer", lm["file"], "-o", tmp_path / "out"), *words)
    assert_clean_error(cli("compile", small, "--tokenizer", lm["file"], "-o", tmp_path / "out"), *words)
    assert_clean_error(cli("run", small, "--tokenizer", lm["file"], "--prompt", "x"), *words)
    assert not (tmp_path / "out").exists()


def test_token_ids_out_of_range_or_malformed_are_one_line(lm, plain, tmp_path):
    vocab = lm["tokenizer"].get_vocab_size()
    assert_clean_error(cli("run", lm["onnx"], "--prompt-ids", f"1,{vocab}"), "--prompt-ids", f"token id {vocab}",
                       "out of range", f"0..{vocab - 1}")
    assert_clean_error(cli("run", lm["onnx"], "--prompt-ids", "1,-2"), "token id -2", "out of range")
    assert_clean_error(cli("run", lm["onnx"], "--prompt-ids", "1,two"), "--prompt-ids", "'two' is not a token id")
    assert_clean_error(cli("run", lm["onnx"]), "--prompt", "--prompt-ids")
    assert_clean_error(cli("run", lm["onnx"], "--prompt", "x", "--prompt-ids", "1"), "one of them")
    bad = tmp_path / "bad.txt"
    bad.write_text("1\n2\nthree\n")
    assert_clean_error(cli("validate", plain["int8"], "--text-ids", bad), "bad.txt line 3", "'three'")
    high = tmp_path / "high.txt"
    high.write_text(f"1\n{vocab + 5}\n")
    assert_clean_error(cli("validate", plain["int8"], "--text-ids", high), "--text-ids", f"token id {vocab + 5}")
    floats = tmp_path / "floats.npy"
    np.save(floats, np.zeros(10, dtype=np.float32))
    assert_clean_error(cli("validate", plain["int8"], "--text-ids", floats), "floats.npy", "integers")
    assert_clean_error(cli("validate", plain["int8"], "--text-ids", tmp_path / "none.txt"), "none.txt", "no such file")
    assert_clean_error(cli("validate", plain["int8"], "--text-ids", high, "--text", high), "--text or --text-ids")


def test_a_changed_tokenizer_in_an_artifact_is_refused(lm, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(lm["onnx"], copy)
    (copy / "tokenizer.json").write_text((copy / "tokenizer.json").read_text().replace('"merges"', '"merges" '))
    assert_clean_error(cli("run", copy, "--prompt", "x"), "tokenizer.json", "sha256")


def test_quantized_custom_module_of_its_own_vocabulary_is_quality_checked(tmp_path):
    """The issue's route: a --model export of a 96-token module, int8; validate died of an IndexError
    (the reference read the held-out text as bytes). Now one line says what to pass, and --text-ids works."""
    import custom_models
    from conftest import randomize_weights

    module = randomize_weights(custom_models.factory(), seed=3, std=0.2).eval()
    weights = tmp_path / "weights.pt"
    torch.save(module.state_dict(), weights)
    model = ("--model", "custom_models:factory")
    assert cli("export", weights, *model, "-o", tmp_path / "onnx").exit_code == 0
    assert cli("quantize", tmp_path / "onnx", "--mode", "int8", "-o", tmp_path / "int8").exit_code == 0
    assert_clean_error(cli("validate", tmp_path / "int8", *model), f"{custom_models.VOCAB} tokens", "--text-ids")
    ids = tmp_path / "ids.npy"
    np.save(ids, np.random.default_rng(0).integers(0, custom_models.VOCAB, 4096))
    quality_ok(cli("validate", tmp_path / "int8", *model, "--text-ids", ids, "--tokens", 2048, "--window", 64))


def test_bench_times_the_tokens_it_is_given():
    """time_runners feeds `tokens` (repeated to the positions it needs), not random ids."""
    from sessa_export.bench import RAMP_STEPS, time_runners

    class Recorder:
        name, max_len = "recorder", None

        def __init__(self) -> None:
            self.fed = []

        def empty_state(self, batch: int) -> int:
            return 0

        def step(self, ids, state):
            self.fed.append(ids.copy())
            return np.zeros((ids.shape[0], ids.shape[1], 8), dtype=np.float32), state + ids.shape[1]

    runner = Recorder()
    time_runners({"recorder": runner}, 8, context=5, decode_steps=2, batch=2, rounds=1, warmup=0, settle_s=0,
                 tokens=[3, 1, 4])
    for prefill in runner.fed[:3]:  # the two untimed prefills, then the timed one
        assert np.array_equal(prefill, [[3, 1, 4, 3, 1]] * 2)
    # decode continues the text from position 5: the untimed ramp steps, then the 2 timed ones
    assert [int(f[0, 0]) for f in runner.fed[3:]] == [[3, 1, 4][p % 3] for p in range(5, 5 + RAMP_STEPS + 2)]
