"""examples/embed_cpp: the C++ host program runs the bundled model's CPU library like PyTorch does.

The program is built with g++ against the TVM runtime and tvm-ffi of the Python wheels
(examples/embed_cpp/build.sh), the bundled model is compiled with `sessa-export compile
--target cpu`, and the bytes the program prints for a prompt - a prefill, then greedy decode
with the caches allocated once and written in place - must equal the greedy continuation of the
PyTorch reference (SessaLM.step). Build and compile are module-scoped (about 10 s together).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from sessa_export.checkpoint import load_checkpoint
from sessa_export.cli import app
from sessa_export.data import BUNDLED_MODEL, encode

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "embed_cpp"
CAPACITY = 128
CASES = [  # (prompt, new bytes): a multi-token prefill, and a one-byte prompt (S = 1 from the start)
    ("def main():\n    ", 48),
    ("T", 24),
]
MIN_MARGIN = 1e-3  # the reference's top-1 / top-2 logit gap at every pick: a float-level tie could flip


@pytest.fixture(scope="module")
def program(tmp_path_factory) -> Path:
    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        pytest.skip(f"the C++ example needs a C++ compiler: {cxx} is not on PATH")
    if shutil.which("bash") is None:
        pytest.skip("examples/embed_cpp/build.sh needs bash")
    out = tmp_path_factory.mktemp("embed_cpp") / "sessa_embed"
    result = subprocess.run(["bash", str(EXAMPLE / "build.sh"), str(out)], capture_output=True, text=True,
                            env={**os.environ, "PYTHON": sys.executable, "CXX": cxx})
    assert result.returncode == 0, f"build.sh failed:\n{result.stdout}\n{result.stderr}"
    return out


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("embed_cpp_model") / "tiny"
    result = CliRunner().invoke(app, ["compile", str(BUNDLED_MODEL), "--target", "cpu", "-o", str(out),
                                      "--max-len", str(CAPACITY)])
    assert result.exit_code == 0, f"compile failed: {result.output}\n{result.exception!r}"
    return out


@pytest.fixture(scope="module")
def model():
    return load_checkpoint(BUNDLED_MODEL)


def greedy_reference(model, prompt: str, n_new: int) -> tuple[bytes, float]:
    """Greedy continuation with SessaLM.step (prefill, then one token at a time) and the smallest
    top-1 / top-2 logit gap among the picks."""
    ids = torch.tensor([encode(prompt)], dtype=torch.int64)
    out, margin = [], float("inf")
    with torch.no_grad():
        logits, state = model.step(ids, model.empty_state(1))
        for i in range(n_new):
            last = logits[0, -1].double().numpy()
            token = int(np.argmax(last))
            top2 = np.sort(last)[-2:]
            margin = min(margin, float(top2[1] - top2[0]))
            out.append(token)
            if i + 1 < n_new:
                logits, state = model.step(torch.tensor([[token]]), state)
    return bytes(out), margin


def run(program: Path, artifact: Path, *args) -> subprocess.CompletedProcess:
    return subprocess.run([str(program), str(artifact), *map(str, args)], capture_output=True, timeout=120,
                          env={**os.environ, "TVM_NUM_THREADS": "1"})


@pytest.mark.parametrize("prompt,n_new", CASES)
def test_greedy_matches_pytorch(program, artifact, model, prompt, n_new):
    expected, margin = greedy_reference(model, prompt, n_new)
    assert margin > MIN_MARGIN, f"near-tie in the reference (gap {margin:.2e}): pick another prompt"
    result = run(program, artifact, prompt, n_new)
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    assert result.stdout == expected, (f"C++ printed {result.stdout!r}\nPyTorch greedy  {expected!r}\n"
                                       f"stderr: {result.stderr.decode(errors='replace')}")
    assert b"decode" in result.stderr and b"capacity 128" in result.stderr


def test_capacity_is_checked(program, artifact):
    full = run(program, artifact, "x" * 100, CAPACITY - 100 + 1)  # 100 + n - 1 = 128 positions: fits
    assert full.returncode == 0 and len(full.stdout) == CAPACITY - 100 + 1, full.stderr
    result = run(program, artifact, "x" * 100, CAPACITY - 100 + 2)  # 129 positions: one too many
    assert result.returncode == 1 and result.stdout == b""
    assert b"exceed the compiled capacity 128" in result.stderr, result.stderr


def test_usage(program):
    result = subprocess.run([str(program)], capture_output=True)
    assert result.returncode == 2 and b"usage:" in result.stderr


def test_a_library_for_features_this_cpu_lacks_is_refused(program, artifact, tmp_path):
    """The program checks the manifest's cpu_features against /proc/cpuinfo before loading model.so."""
    import json

    if not Path("/proc/cpuinfo").is_file():
        pytest.skip("the check reads /proc/cpuinfo (Linux)")
    broken = tmp_path / "future"
    shutil.copytree(artifact, broken)
    manifest = json.loads((broken / "sessa_config.json").read_text())
    manifest["cpu_features"] = [*manifest["cpu_features"], "avx1024_made_up"]
    (broken / "sessa_config.json").write_text(json.dumps(manifest))
    result = run(program, broken, "x", 4)
    assert result.returncode == 1 and result.stdout == b""
    assert b"avx1024_made_up" in result.stderr and b"lower --cpu" in result.stderr, result.stderr
