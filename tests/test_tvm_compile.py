"""The TVM back end (sessa_export.to_tvm, tvm_runtime, `sessa-export compile`) against PyTorch.

CPU: the compiled library, run through TvmRunner, matches the PyTorch reference (SessaLM.step) at the
ONNX export's tolerance - max abs error <= 1e-4 on the logits and on every state tensor - for the same
cases: a 256-token prefill then 256 decode steps (batch 2), and a prefill in uneven chunks checked
against the full-sequence forward, on H = 1, GQA with an MLP and tied embeddings, and RoPE off.
GPU targets are built here (no GPU needed) and their libraries inspected: CUDA device code for the
asked arch, Metal objects for arm64 with the FeedbackAttention kernels in the shader source; the
AArch64 cross build is an AArch64 ELF. Bad input exits 2 with one line and leaves nothing behind.

TVM builds are slow on a small machine: every build is module-scoped and shared.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import struct
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import randomize_weights
from parity import (ATOL, CONFIGS, PARITY_CHECKS, assert_clean_error, cli,
                    max_abs, models_per_config)
from sessa_export.checkpoint import save_checkpoint
from sessa_export.errors import SessaExportError
from sessa_export.runtime import TorchRunner, open_runner
from sessa_export.tracer import trace
from sessa_export.to_tvm import CompileTarget, build_module, compile_graph
from sessa_export.state import FIXED
from sessa_export.runtime.tvm_runner import TvmRunner

CAPACITY = 640  # room for the longest parity check (600 tokens)


pytestmark = pytest.mark.usefixtures("one_tvm_thread")


@pytest.fixture(scope="module")
def cpu_builds(make_lm, tmp_path_factory):
    """One CPU library per config (capacity CAPACITY), shared by the parity tests."""
    root = tmp_path_factory.mktemp("tvm_cpu")
    return {name: (model, compile_graph(trace(model), root / name, CompileTarget("cpu"), max_len=CAPACITY))
            for name, model in models_per_config(make_lm).items()}


@pytest.mark.parametrize("check", PARITY_CHECKS.values(), ids=PARITY_CHECKS.keys())
@pytest.mark.parametrize("name", CONFIGS)
def test_parity(cpu_builds, name, check):
    model, out = cpu_builds[name]
    check(model, TvmRunner(out, threads=1))


def test_manifest_and_library(cpu_builds):
    _, out = cpu_builds["GQA-mlp-tied"]
    manifest = json.loads((out / "sessa_config.json").read_text())
    assert manifest["format"] == "tvm" and manifest["target"] == "cpu" and manifest["capacity"] == CAPACITY
    assert manifest["library"] == "model.so" and manifest["entry"] == "step"
    assert set(manifest["files"]) == {"model.so"}
    import hashlib

    assert manifest["files"]["model.so"] == hashlib.sha256((out / "model.so").read_bytes()).hexdigest()
    assert len(manifest["calling_convention"]["arguments"]) == 2 + 4 * len(manifest["state"])
    # the caches' contract: a capacity fixed at compile time, on the "capacity" axis of every state tensor
    assert manifest["state_contract"]["kind"] == FIXED and manifest["state_contract"]["capacity"] == CAPACITY
    assert all("capacity" in axes and "past" not in axes for layer in manifest["state"] for axes in layer["shapes"].values())
    runner = open_runner(out)
    assert isinstance(runner, TvmRunner) and runner.layout.contract == FIXED and runner.layout.capacity == CAPACITY


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2, reason="needs 2 cores")
def test_a_runner_leaves_the_process_on_all_its_cores(cpu_builds):
    """TVM's thread pool, started without TVM_NUM_THREADS on 2 cores, pins the thread that starts it to
    core 0 (and every thread started after it, a compile's parallel builds too): TvmRunner, and
    use_tvm_threads with it, set TVM_NUM_THREADS first. A fresh process without it set, and one thread."""
    _, out = cpu_builds["GQA-mlp-tied"]
    code = ("import os\nfrom sessa_export.runtime.tvm_runner import TvmRunner\n"
            "os.sched_setaffinity(0, range(os.cpu_count()))\n"  # not the mask of this process, which may be pinned
            f"before = os.sched_getaffinity(0)\nrunner = TvmRunner({str(out)!r}, threads=1)\n"
            "assert runner.threads == 1, runner.threads\n"
            "assert os.sched_getaffinity(0) == before, (before, os.sched_getaffinity(0))\n")
    env = {k: v for k, v in os.environ.items() if k != "TVM_NUM_THREADS"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_a_built_kernel_is_reused_for_its_target_and_only_for_an_equal_kernel(monkeypatch, tmp_path):
    """lower builds a CPU library's kernels one LLVM module each, kept for the process (kernel_cache): the
    next library for the same target takes a kernel built before, another target or another kernel of
    the same name and hash is built anew, and a kept kernel's object file is written once."""
    import tvm
    import tvm_ffi
    from tvm import te

    from sessa_export.targets import kernel_cache

    monkeypatch.setattr(kernel_cache, "_built", type(kernel_cache._built)())
    monkeypatch.setattr(kernel_cache, "_by_handle", {})

    def kernel(name: str, c: float):
        a = te.placeholder((8,), name="a")
        b = te.compute((8,), lambda i: a[i] + c, name="b")
        return tvm.ir.GlobalVar(name), te.create_prim_func([a, b]).with_attr("global_symbol", name)

    def adds(library, name: str) -> float:
        x, y = tvm.runtime.tensor(np.zeros(8, "float32")), tvm.runtime.tensor(np.zeros(8, "float32"))
        library.get_function(name, query_imports=True)(x, y)
        return float(y.numpy()[0])

    v3, v4 = CompileTarget(cpu="x86-64-v3").tvm_target(), CompileTarget(cpu="x86-64-v4").tvm_target()
    first = kernel_cache.build_kernels([kernel("one", 1.0), kernel("two", 2.0)], v3, 2)
    again = kernel_cache.build_kernels([kernel("one", 1.0), kernel("three", 3.0)], v3, 2)
    assert again.imports[0].same_as(first.imports[0]) and not again.imports[1].same_as(first.imports[1])
    assert (adds(again, "one"), adds(again, "three")) == (1.0, 3.0)
    assert not kernel_cache.build_kernels([kernel("one", 1.0)], v4, 2).imports[0].same_as(first.imports[0])
    monkeypatch.setattr(tvm_ffi, "structural_hash", lambda func: 0)  # every kernel named "one" now collides
    kernel_cache.build_kernels([kernel("one", 1.0)], v3, 2)
    collided = kernel_cache.build_kernels([kernel("one", 5.0)], v3, 2)
    assert adds(collided, "one") == 5.0
    kept = collided.imports[0]
    kernel_cache.write_object(kept, tmp_path / "a.o")
    monkeypatch.setattr(type(kept), "write_to_file", lambda *a: pytest.fail("a kept object was emitted again"))
    kernel_cache.write_object(kept, tmp_path / "b.o")
    assert (tmp_path / "a.o").read_bytes() == (tmp_path / "b.o").read_bytes()


def test_step_writes_the_caller_caches_in_place(cpu_builds):
    """Decode never copies the state: step hands back the same buffers, writes rows P..P+S-1 only."""
    model, out = cpu_builds["GQA-mlp-tied"]
    runner = TvmRunner(out, threads=1)
    state = runner.empty_state(1)
    for cache in state.caches:  # NaN everywhere: a row the step did not write stays NaN
        cache.copyfrom(np.full(cache.shape, np.nan, dtype=np.float32))
    ids = np.random.default_rng(4).integers(0, model.config.vocab_size, (1, 12))
    _, after = runner.step(ids[:, :10], state)
    _, after = runner.step(ids[:, 10:11], after)
    assert after.past == 11 and all(a is b for a, b in zip(after.caches, state.caches))
    for index, cache in enumerate(after.caches):
        array = cache.numpy()
        rows = np.moveaxis(array, 2 if array.ndim == 4 else 1, 0)
        assert np.isfinite(rows[:11]).all(), f"cache {index}: a written row holds NaN"
        assert np.isnan(rows[11:]).all(), f"cache {index}: the step wrote past position P + S"
    ref = TorchRunner(model)
    ref_logits, _ = ref.step(ids[:, :11], ref.empty_state(1))
    got_logits, _ = runner.step(ids[:, 11:12], after)  # continues from the in-place state
    _, ref_state = ref.step(ids[:, :11], ref.empty_state(1))
    want, _ = ref.step(ids[:, 11:12], ref_state)
    assert max_abs(got_logits, want) <= ATOL


def test_context_past_capacity_is_refused(cpu_builds):
    model, out = cpu_builds["H1"]
    runner = TvmRunner(out, threads=1)
    state = runner.empty_state(1)
    ids = np.zeros((1, CAPACITY), dtype=np.int64)
    _, state = runner.step(ids, state)  # exactly the capacity: fine
    with pytest.raises(SessaExportError, match=f"exceeds the compiled capacity of {CAPACITY}"):
        runner.step(ids[:, :1], state)
    # The library checks it too (a C++ host calling `step` directly cannot write out of bounds).
    import tvm_ffi

    with pytest.raises(Exception, match="capacity"):
        runner._step(runner._tvm.runtime.tensor(ids[:, :2]), tvm_ffi.Shape([CAPACITY - 1]), *state.caches)


def test_a_runner_thread_count_is_its_own(cpu_builds):
    """TvmRunner(threads=None) uses the available cores whatever an earlier runner asked for, and no
    runner rewrites TVM_NUM_THREADS once TVM is loaded."""
    _, out = cpu_builds["H1"]
    before = os.environ.get("TVM_NUM_THREADS")
    default = TvmRunner(out).threads
    assert TvmRunner(out, threads=1).threads == 1
    assert TvmRunner(out).threads == default, "the default thread count followed an earlier runner's"
    assert os.environ.get("TVM_NUM_THREADS") == before
    TvmRunner(out, threads=1)  # back to this module's one TVM thread


# -- the CLI ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def byte_build(make_lm, tmp_path_factory):
    """A byte-level model: its checkpoint, its ONNX export, and a TVM build of the export directory."""
    root = tmp_path_factory.mktemp("tvm_cli")
    model = make_lm(seed=31, std=0.2, vocab_size=256, n_heads=4, n_kv_heads=2)
    checkpoint = save_checkpoint(model, root / "checkpoint")
    assert cli("export", checkpoint, "-o", root / "onnx").exit_code == 0
    result = cli("compile", root / "onnx", "--target", "cpu", "--max-len", 160, "-o", root / "tvm")
    assert result.exit_code == 0, result.output
    return model, checkpoint, root / "tvm"


def test_compile_an_export_directory_then_validate_and_run(byte_build):
    model, checkpoint, out = byte_build
    manifest = json.loads((out / "sessa_config.json").read_text())
    assert manifest["source"] == str(checkpoint.resolve()) and manifest["capacity"] == 160
    result = cli("validate", out, "--prefill", 64, "--decode", 32)
    assert result.exit_code == 0, result.output
    assert "PASS" in result.output
    result = cli("run", out, "--prompt", "def f(x):", "--max-new-tokens", 8)
    assert result.exit_code == 0, result.output
    # greedy TVM continuation == greedy PyTorch continuation (full-sequence forward)
    ids = list(b"def f(x):")
    for _ in range(8):
        with torch.inference_mode():
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert result.stdout_bytes.rstrip(b"\n").endswith(bytes(ids[9:])), (result.stdout_bytes, bytes(ids[9:]))


def test_a_truncated_or_changed_library_is_refused_before_it_loads(byte_build, tmp_path):
    """The manifest's sha256 of model.so is checked before the TVM runtime maps it: a truncated
    library (which crashed `run` with SIGBUS) is one clean line, for every command that loads it."""
    _, checkpoint, out = byte_build
    for change in (lambda data: data[: len(data) // 2], lambda data: data[:-1] + bytes([data[-1] ^ 1])):
        broken = tmp_path / "broken"
        shutil.rmtree(broken, ignore_errors=True)
        shutil.copytree(out, broken)
        (broken / "model.so").write_bytes(change((out / "model.so").read_bytes()))
        for args in (("run", broken, "--prompt", "x"), ("bench", broken), ("validate", broken)):
            assert_clean_error(cli(*args), "model.so", "sha256")


def _registers(library: Path) -> dict[str, int]:
    """How many instructions of `library` name an xmm, ymm or zmm register (objdump)."""
    text = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(library)], capture_output=True, text=True,
                          check=True).stdout
    return {reg: len(re.findall(rf"%{reg}\d", text)) for reg in ("xmm", "ymm", "zmm")}


@pytest.mark.skipif(shutil.which("objdump") is None or platform.machine() != "x86_64", reason="needs objdump, x86-64")
def test_x86_builds_hold_only_their_level_s_instructions(byte_build, cross_model, tmp_path):
    """The default --cpu x86-64-v3 library has AVX2 and no AVX-512 (it runs on every x86-64 chip since
    Haswell and Zen 1); --cpu x86-64 has SSE2 only; the manifest records what each needs."""
    _, _, out = byte_build
    manifest = json.loads((out / "sessa_config.json").read_text())
    assert manifest["cpu"] == "x86-64-v3" and {"avx2", "fma"} <= set(manifest["cpu_features"])
    assert not {"avx512f", "avx512bw"} & set(manifest["cpu_features"])
    default = _registers(out / "model.so")
    assert default["zmm"] == 0 and default["ymm"] > 0, default
    baseline = compile_graph(trace(cross_model), tmp_path / "x86-64", CompileTarget("cpu", cpu="x86-64"), max_len=64)
    assert json.loads((baseline / "sessa_config.json").read_text())["cpu_features"] == []
    assert _registers(baseline / "model.so")["ymm"] == 0


def test_a_library_for_features_this_cpu_lacks_is_refused(byte_build, tmp_path):
    _, _, out = byte_build
    broken = tmp_path / "future"
    shutil.copytree(out, broken)
    manifest = json.loads((broken / "sessa_config.json").read_text())
    manifest.update(cpu="x86-64-v9", cpu_features=[*manifest["cpu_features"], "avx1024_made_up"])
    (broken / "sessa_config.json").write_text(json.dumps(manifest))
    assert_clean_error(cli("run", broken, "--prompt", "x"), "--cpu x86-64-v9", "avx1024_made_up", "lower --cpu")


def test_cpu_choices_are_checked_before_any_work():
    with pytest.raises(SessaExportError, match="unknown --cpu 'x86-64-v9'.*x86-64-v4"):
        CompileTarget("cpu", cpu="x86-64-v9")
    with pytest.raises(SessaExportError, match="--cpu is for --target cpu, not cuda"):
        CompileTarget("cuda", cpu="x86-64")
    with pytest.raises(SessaExportError, match="unknown --cpu 'native' for aarch64-linux-gnu"):
        CompileTarget("cpu", host="aarch64-linux-gnu", cpu="native")
    assert CompileTarget("cpu", host="aarch64-linux-gnu", cpu="neoverse-v1").tvm_target().attrs["feature.has_sve"]


def test_compile_of_a_custom_export_needs_its_factory_named(tmp_path):
    import custom_models

    weights = tmp_path / "custom.pt"
    torch.save(randomize_weights(custom_models.factory(), seed=21, std=0.2).state_dict(), weights)
    assert cli("export", weights, "--model", "custom_models:factory", "-o", tmp_path / "onnx").exit_code == 0
    result = cli("compile", tmp_path / "onnx", "-o", tmp_path / "tvm")
    assert_clean_error(result, "custom_models:factory", "--model")
    assert not (tmp_path / "tvm").exists()


def test_run_past_capacity_is_a_clean_error(byte_build):
    _, _, out = byte_build
    result = cli("run", out, "--prompt", "x" * 150, "--max-new-tokens", 20)
    assert_clean_error(result, "160")


def test_custom_model_compiled_by_the_cli(tmp_path):
    import custom_models

    module = randomize_weights(custom_models.factory(), seed=21, std=0.2).eval()
    weights = tmp_path / "custom.pt"
    torch.save(module.state_dict(), weights)
    result = cli("compile", weights, "--model", "custom_models:factory", "--max-len", 64, "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    runner = TvmRunner(tmp_path / "out", threads=1)
    ids = np.random.default_rng(5).integers(0, custom_models.VOCAB, (2, 40))
    state, pieces = runner.empty_state(2), []
    for start, stop in [(0, 25), (25, 26), (26, 33)] + [(t, t + 1) for t in range(33, 40)]:
        logits, state = runner.step(ids[:, start:stop], state)
        pieces.append(logits)
    with torch.inference_mode():
        want = module(torch.from_numpy(ids)).numpy()
    assert max_abs(np.concatenate(pieces, axis=1), want) <= ATOL
    # no model config in a custom model's manifest: ids are still checked against its embedding's rows
    with pytest.raises(SessaExportError, match=rf"token ids must lie in \[0, {custom_models.VOCAB}\)"):
        runner.step(np.full((2, 1), custom_models.VOCAB), state)


# -- bad input ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_checkpoint(make_lm, tmp_path_factory):
    return save_checkpoint(make_lm(seed=3, max_len=64), tmp_path_factory.mktemp("tvm_bad") / "ckpt")


@pytest.mark.parametrize("args, names", [
    (["--target", "vulkan"], ["vulkan", "cpu, cuda, metal"]),
    (["--target", "cuda", "--arch", "sm_42"], ["sm_42", "sm_80"]),
    (["--target", "cpu", "--arch", "sm_80"], ["--arch", "cuda"]),
    (["--target", "metal", "--host", "aarch64-linux-gnu"], ["aarch64-linux-gnu", "arm64-apple-ios"]),
    (["--target", "cuda", "--host", "aarch64-linux-gnu"], ["--host", "cuda"]),
    (["--host", "riscv64-linux-gnu"], ["riscv64-linux-gnu", "aarch64-linux-gnu"]),
    (["--max-len", "65"], ["65", "max_len=64"]),
])
def test_bad_target_arch_host_or_capacity(small_checkpoint, tmp_path, args, names):
    parent = tmp_path / "outputs"
    parent.mkdir()
    assert_clean_error(cli("compile", small_checkpoint, *args, "-o", parent / "out"), *names)
    assert list(parent.iterdir()) == [], "a refused compile must leave nothing behind"


def test_compile_never_replaces_a_directory_that_is_not_an_export(small_checkpoint, tmp_path):
    out = tmp_path / "notes"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert_clean_error(cli("compile", small_checkpoint, "-o", out), str(out), "not an export directory")
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"


def test_refused_model_leaves_nothing(tmp_path):
    import custom_models

    module = randomize_weights(custom_models.conv_factory(), seed=23, std=0.2).eval()
    weights = tmp_path / "conv.pt"
    torch.save(module.state_dict(), weights)
    parent = tmp_path / "outputs"
    parent.mkdir()
    result = cli("compile", weights, "--model", "custom_models:conv_factory", "-o", parent / "out")
    assert_clean_error(result, "`conv`", "Conv1d")
    assert list(parent.iterdir()) == []


# -- cross targets: built here, inspected ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def cross_model(make_lm):
    return make_lm(seed=7, std=0.2, n_heads=4, n_kv_heads=2, mlp_ratio=1.0)


def test_every_cpu_prefill_function_is_scheduled_to_run_in_parallel(cross_model):
    """The CPU rules leave no TIR function of a prefill (layer norms, GELU, the splits of fused
    linears, the gain: every function over batch x seq_len rows) to TVM's unscheduled loop nest,
    which runs on one core; a decode step's row-wise functions, one row per batch row, stay serial."""
    import tvm
    from sessa_export.targets import cpu

    tvm_target = CompileTarget("cpu").tvm_target()
    with tvm_target:
        mod = tvm.transform.Sequential(cpu.scheduling_passes(tvm_target))(build_module(trace(cross_model), CAPACITY))
    funcs = {gv.name_hint: (f, f.script()) for gv, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc)}
    prefill = {name: (f, text) for name, (f, text) in funcs.items() if "seq_len" in text}
    decode_norms = [text for name, (f, text) in funcs.items() if name.startswith("layer_norm") and name not in prefill]
    assert any(name.startswith("layer_norm") for name in prefill) and any("gelu" in name for name in prefill)
    unscheduled = [name for name, (f, _) in prefill.items() if not (f.attrs and f.attrs.get("tirx.is_scheduled"))]
    serial = [name for name, (_, text) in prefill.items() if "T.parallel" not in text]
    assert not unscheduled and not serial, f"unscheduled: {unscheduled}; no parallel loop: {serial}"
    assert decode_norms and not any("T.parallel" in text for text in decode_norms)


@pytest.mark.parametrize("name", ["cuda", "metal", "opencl"])
def test_gpu_host_code_is_for_any_cpu_of_its_triple(name):
    """A GPU library's host code must run on every CPU of its architecture: no -mcpu=native, and
    the compiler's target is the one targets/<name>.py builds."""
    from sessa_export.targets import TARGETS, cpu

    target = CompileTarget(name)
    tvm_target = target.tvm_target()
    host = dict(tvm_target.host.attrs)
    assert "mcpu" not in host, f"{name} host code is for {host['mcpu']} CPUs only"
    assert cpu.host_cpu() not in str(tvm_target)
    assert str(target.host_target()) == str(tvm_target.host)
    built = TARGETS[name].implementation().tvm_target(target.arch, target.host)
    assert str(tvm_target) == str(built)
    if name == "cuda":
        assert host["mtriple"] == cpu.host_triple()


@pytest.mark.skipif(shutil.which("aarch64-linux-gnu-g++") is None, reason="needs g++-aarch64-linux-gnu")
def test_aarch64_cross_compile_is_an_aarch64_elf(cross_model, tmp_path):
    out = compile_graph(trace(cross_model), tmp_path / "arm", CompileTarget("cpu", host="aarch64-linux-gnu"),
                        max_len=64)
    header = (out / "model.so").read_bytes()[:20]
    assert header[:4] == b"\x7fELF" and header[4] == 2  # 64-bit
    assert struct.unpack_from("<H", header, 18)[0] == 183  # e_machine EM_AARCH64
    manifest = json.loads((out / "sessa_config.json").read_text())
    assert manifest["host"] == "aarch64-linux-gnu" and manifest["triple"] == "aarch64-linux-gnu"
    with pytest.raises(SessaExportError, match="aarch64"):
        TvmRunner(out)


def _blob_section(library: Path) -> str:
    """The ELF section holding the library's import blob (weights, VM bytecode), by objdump."""
    table = subprocess.run(["objdump", "-t", str(library)], capture_output=True, text=True, check=True).stdout
    return next(line.split()[-3] for line in table.splitlines() if line.endswith("__tvm_ffi__library_bin"))


@pytest.mark.skipif(platform.machine() != "x86_64" or shutil.which("objdump") is None, reason="x86-64 ELF, objdump")
def test_x86_weights_lie_in_the_large_data_section(cpu_builds):
    """Past .data and .bss, so a library of several GiB of weights (a 1B-class float32 model) links."""
    _, out = cpu_builds["GQA-mlp-tied"]
    assert _blob_section(out / "model.so") == ".lrodata"


@pytest.mark.skipif(shutil.which("aarch64-linux-gnu-g++") is None, reason="needs g++-aarch64-linux-gnu")
def test_an_aarch64_library_past_its_reach_is_refused(cross_model, tmp_path, monkeypatch):
    from sessa_export.targets import packaging

    monkeypatch.setattr(packaging, "NEAR_BLOB_LIMIT", 1 << 10)
    out = tmp_path / "arm"
    with pytest.raises(SessaExportError, match=r"GiB library, past the .* GiB an AArch64 .* --quantization"):
        compile_graph(trace(cross_model), out, CompileTarget("cpu", host="aarch64-linux-gnu"), max_len=64)
    assert not out.exists()


@pytest.mark.skipif(shutil.which("aarch64-linux-gnu-g++") is None, reason="needs g++-aarch64-linux-gnu")
def test_opencl_library_is_an_aarch64_elf_with_the_kernels(cross_model, tmp_path):
    """--target opencl, added through targets/'s table alone: an AArch64 ELF library whose import
    blob carries the OpenCL C source of both attentions, and that source beside it as model.cl."""
    out = compile_graph(trace(cross_model), tmp_path / "opencl", CompileTarget("opencl"), max_len=64)
    library = (out / "model.so").read_bytes()
    assert library[:4] == b"\x7fELF" and library[4] == 2  # 64-bit
    assert struct.unpack_from("<H", library, 18)[0] == 183  # e_machine EM_AARCH64
    source = (out / "model.cl").read_text()
    assert "__kernel" in source and "feedback_attention" in source and "forward_attention" in source
    assert b"__kernel" in library and b"feedback_attention_prefill" in library
    manifest = json.loads((out / "sessa_config.json").read_text())
    assert (manifest["target"], manifest["host"], manifest["library"]) == ("opencl", "aarch64-linux-gnu", "model.so")
    assert set(manifest["files"]) == {"model.so", "model.cl"}
    with pytest.raises(SessaExportError, match="opencl"):
        TvmRunner(out)


def _fatbins(data: bytes) -> list[bytes]:
    """Fat binaries embedded in `data` (magic 0xBA55ED50, u16 version, u16 header size, u64 body size)."""
    found, at = [], data.find(b"\x50\xed\x55\xba")
    while at >= 0:
        header_size, body_size = struct.unpack_from("<HQ", data, at + 6)
        found.append(data[at:at + header_size + body_size])
        at = data.find(b"\x50\xed\x55\xba", at + 4)
    return found


def _fatbin_entries(fatbin: bytes) -> list[tuple[int, int, bytes]]:
    """(kind, sm arch, payload) of each entry: kind 1 is PTX, kind 2 an ELF cubin."""
    header_size, body_size = struct.unpack_from("<HQ", fatbin, 6)
    entries, at = [], header_size
    while at < header_size + body_size:
        kind, _, entry_header, size = struct.unpack_from("<HHIQ", fatbin, at)
        arch = struct.unpack_from("<I", fatbin, at + 28)[0]
        entries.append((kind, arch, fatbin[at + entry_header:at + entry_header + size]))
        at += entry_header + size
    return entries


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
def test_cuda_library_holds_device_code_for_the_arch(cross_model, tmp_path):
    out = compile_graph(trace(cross_model), tmp_path / "cuda", CompileTarget("cuda", arch="sm_90"), max_len=64)
    fatbins = _fatbins((out / "model.so").read_bytes())
    assert len(fatbins) == 1, "expected one fatbin in model.so"
    entries = _fatbin_entries(fatbins[0])
    cubins = [payload for kind, arch, payload in entries if kind == 2 and arch == 90]
    assert cubins, f"no sm_90 cubin in the fatbin: {[(k, a) for k, a, _ in entries]}"
    assert cubins[0][:4] == b"\x7fELF" and struct.unpack_from("<H", cubins[0], 18)[0] == 190  # EM_CUDA
    assert any(kind == 1 and arch == 90 for kind, arch, _ in entries), "no compute_90 PTX for newer GPUs"
    source = (out / "model.cu").read_text()
    assert "feedback_attention" in source and "forward_attention" in source
    manifest = json.loads((out / "sessa_config.json").read_text())
    assert manifest["target"] == "cuda" and manifest["arch"] == "sm_90"
    # the CUDA module in the library's import blob carries the fatbin (format "fatbin"), not source to JIT
    library = (out / "model.so").read_bytes()
    assert b"\x04\0\0\0\0\0\0\0cuda" in library and struct.pack("<Q", 6) + b"fatbin" in library


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
def test_cuda_parity_on_a_gpu(cross_model, tmp_path):
    import tvm

    if not tvm.cuda(0).exist:
        pytest.skip("no CUDA GPU")
    from tvm import relax
    import tvm_ffi

    out = compile_graph(trace(cross_model), tmp_path / "cuda", CompileTarget("cuda", arch=_local_arch()), max_len=64)
    manifest = json.loads((out / "sessa_config.json").read_text())
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(out / "model.so")), tvm.cuda(0))
    dev = tvm.cuda(0)
    caches = []
    for layer in manifest["state"]:
        for f in ("key", "value", "feedback_key", "feedback_state"):
            shape = [2 if d == "batch" else 64 if d == "capacity" else d for d in layer["shapes"][f]]
            caches.append(tvm.runtime.empty(shape, "float32", dev))
    ids = np.random.default_rng(6).integers(0, cross_model.config.vocab_size, (2, 40))
    ref = TorchRunner(cross_model)
    state, pos = ref.empty_state(2), 0
    for size in (20, 1, 1, 7, 11):
        want, state = ref.step(ids[:, pos:pos + size], state)
        got = vm["step"](tvm.runtime.tensor(ids[:, pos:pos + size], dev), tvm_ffi.Shape([pos]), *caches).numpy()
        assert max_abs(got, want) <= ATOL
        pos += size


def _local_arch() -> str:
    import tvm

    return "sm_" + tvm.cuda(0).compute_version.replace(".", "")


MACHO_MAGIC_64 = 0xFEEDFACF
CPU_TYPE_ARM64 = 0x0100000C


def _archive_members(path: Path) -> dict[str, bytes]:
    """Members of a `model.a` (ar, GNU or BSD names) or `model.tar`."""
    if path.suffix == ".tar":
        with tarfile.open(path) as archive:
            return {m.name: archive.extractfile(m).read() for m in archive.getmembers() if m.isfile()}
    data, members, at = path.read_bytes(), {}, 8
    assert data[:8] == b"!<arch>\n"
    while at + 60 <= len(data):
        name, size = data[at:at + 16].decode().strip(), int(data[at + 48:at + 58].decode().strip())
        body = data[at + 60:at + 60 + size]
        if name.startswith("#1/"):  # BSD long name: the name is the first bytes of the body
            length = int(name[3:])
            name, body = body[:length].rstrip(b"\0").decode(), body[length:]
        members[name] = body
        at += 60 + size + (size % 2)
    return members


def test_metal_archive_holds_arm64_macho_objects_and_the_kernels(cross_model, tmp_path):
    out = compile_graph(trace(cross_model), tmp_path / "metal", CompileTarget("metal"), max_len=64)
    manifest = json.loads((out / "sessa_config.json").read_text())
    library = out / manifest["library"]
    objects = {name: body for name, body in _archive_members(library).items() if name.endswith(".o")}
    assert objects, f"no objects in {library.name}"
    for name, body in objects.items():
        magic, cputype = struct.unpack_from("<II", body, 0)
        assert magic == MACHO_MAGIC_64, f"{name}: not a 64-bit Mach-O object"
        assert cputype == CPU_TYPE_ARM64, f"{name}: cputype {cputype:#x} is not ARM64"
    shader = (out / "model.metal").read_text()
    assert "kernel void" in shader and "feedback_attention" in shader and "forward_attention" in shader
    # the shader source travels inside the library too (TVM compiles it when the library is loaded)
    assert any(b"feedback_attention" in body and b"kernel void" in body for body in objects.values())
