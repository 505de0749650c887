"""`-o` never destroys a user's files (issue 13's kinds 2 and 3): an output that is, contains or lies
inside an input is refused; an earlier artifact is replaced only when it holds nothing but what its
writer wrote, checked again just before the replacement; a writer killed mid-way leaves a hidden
temporary directory that the next writer of the same output removes."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from parity import assert_clean_error, cli
from sessa_export.artifact import WRITER, atomic_directory, check_replaceable, remove_stale
from sessa_export.checkpoint import save_checkpoint
from sessa_export.errors import SessaExportError


@pytest.fixture()
def checkpoint(make_lm, tmp_path) -> Path:
    return save_checkpoint(make_lm(seed=4, vocab_size=64, d_model=32, n_layers=1, n_heads=2), tmp_path / "ckpt")


def test_an_output_over_an_input_is_refused(checkpoint, tmp_path):
    host = tmp_path / "host"
    assert cli("export", checkpoint, "-o", host).exit_code == 0
    inside = host / "ckpt"  # an old export that now holds the source checkpoint
    shutil.copytree(checkpoint, inside)
    snapshot = sorted(p.name for p in host.iterdir())
    assert_clean_error(cli("export", inside, "-o", host), "is, contains or lies inside the input")
    assert sorted(p.name for p in host.iterdir()) == snapshot and (inside / "model.safetensors").is_file()
    assert_clean_error(cli("export", checkpoint, "-o", checkpoint / "out"), "lies inside the input")
    export = tmp_path / "export"
    assert cli("export", checkpoint, "-o", export).exit_code == 0
    assert_clean_error(cli("quantize", export, "--mode", "int8", "-o", export), "input")
    assert_clean_error(cli("compile", export, "-o", export, "--max-len", "16"), "input")
    assert (export / "model.onnx").is_file()


def test_an_artifact_holding_a_users_file_is_never_replaced(checkpoint, tmp_path):
    out = tmp_path / "out"
    assert cli("export", checkpoint, "-o", out).exit_code == 0
    (out / "notes.txt").write_text("mine")
    assert_clean_error(cli("export", checkpoint, "-o", out), "notes.txt", "did not write")
    assert (out / "notes.txt").read_text() == "mine"


def test_a_file_put_into_the_output_while_writing_is_kept(checkpoint, tmp_path):
    out = tmp_path / "out"
    assert cli("export", checkpoint, "-o", out).exit_code == 0
    with pytest.raises(SessaExportError, match="late.txt"):
        with atomic_directory(out) as tmp:
            (tmp / "model.onnx").write_text("new")
            (out / "late.txt").write_text("mine")  # the user, while the writer works
    assert (out / "late.txt").read_text() == "mine" and (out / "model.onnx").stat().st_size > 3
    assert not list(tmp_path.glob(".out.*")), "the temporary directory is removed"


def test_stale_temporary_directories_of_dead_writers_are_removed(tmp_path):
    out = tmp_path / "out"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale, live, foreign = tmp_path / ".out.abc", tmp_path / ".out.def", tmp_path / ".out.ghi"
    for path, pid in ((stale, dead.pid), (live, os.getpid())):
        path.mkdir()
        (path / WRITER).write_text(str(pid))
    foreign.mkdir()  # no writer mark: not ours
    remove_stale(out)
    assert not stale.exists() and live.exists() and foreign.exists()
    check_replaceable(out)


SLOW_POINTS = {  # a patch that makes each writer wait inside its temporary directory
    "export": ("sessa_export.to_onnx", "check_model"),
    "quantize": ("sessa_export.to_onnx.quantize", "check_model"),
    "compile": ("sessa_export.targets.cpu", "package"),
}
STAND_INS = {  # work before the slow point that the cleanup does not depend on: a no-op in the writers
    "compile": ("sessa_export.to_tvm", "lower"),  # the kernels' code generation (the package stand-in needs none)
}


@pytest.mark.parametrize("command", list(SLOW_POINTS))
def test_a_killed_writer_leaves_nothing_the_next_run_keeps(checkpoint, tmp_path, command):
    export = tmp_path / "export"
    assert cli("export", checkpoint, "-o", export).exit_code == 0
    args = {"export": [str(checkpoint)], "quantize": [str(export), "--mode", "int8"],
            "compile": [str(checkpoint), "--max-len", "16"]}[command]
    module, name = SLOW_POINTS[command]

    def writer(out: Path) -> subprocess.Popen:
        """The command writing `out`, waiting inside its temporary directory once it prints "writing"."""
        code = ("import importlib, signal, time\n"
                "signal.signal(signal.SIGINT, signal.default_int_handler)\n"  # a shell's background job inherits it ignored
                f"m = importlib.import_module({module!r})\n"
                "def slow(*a, **k):\n"
                "    print('writing', flush=True); time.sleep(60)\n"
                f"setattr(m, {name!r}, slow)\n"
                + (f"setattr(importlib.import_module({STAND_INS[command][0]!r}), {STAND_INS[command][1]!r}, "
                   "lambda *a, **k: None)\n" if command in STAND_INS else "")
                + "from sessa_export.cli import app\n"
                + f"app([{command!r}, *{args!r}, '-o', {str(out)!r}])\n")
        return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)

    # the two writers run side by side (each is mostly imports), on outputs of their own
    killed, interrupted = tmp_path / "out", tmp_path / "interrupted"
    procs = {signal.SIGKILL: writer(killed), signal.SIGINT: writer(interrupted)}
    for sig, proc in procs.items():
        assert proc.stdout.readline().strip() == "writing"  # inside the temporary directory now
        proc.send_signal(sig)
    for proc in procs.values():
        proc.wait(timeout=30)
    time.sleep(0.1)
    assert not killed.exists() and not interrupted.exists()
    assert list(tmp_path.glob(".interrupted.*")) == []  # a clean interrupt removes its own directories
    # SIGKILL cannot be caught: its directories stay until the next writer of the same output
    assert list(tmp_path.glob(".out.*")), "the killed writer's directory is gone: did it run?"
    assert cli(command, *args, "-o", killed).exit_code == 0
    assert list(tmp_path.glob(".out.*")) == [] and (killed / "sessa_config.json").is_file()
