"""examples/embed_cpp: the C++ host program runs the bundled model's CPU library like PyTorch does.

The program is built with g++ against the TVM runtime and tvm-ffi of the Python wheels
(examples/embed_cpp/build.sh), the bundled model is compiled with `sessa-export compile
--target cpu`, and the bytes the program prints for a prompt - a prefill, then greedy decode
with the caches allocated once and written in place - must equal the greedy continuation of the
PyTorch reference (SessaLM.step). The build is module-scoped, the float32 and q8 libraries shared with
tests/test_tvm_quantized.py (conftest.bundled_library).

Where users deploy (each part skips with its reason when a tool is missing):
- x86-64 without AVX-512: the default --cpu x86-64-v3 library holds no AVX-512 instruction (objdump),
  runs under `qemu-x86_64 -cpu Haswell` with PyTorch's text, and an x86-64-v4 build is refused there
  with one line instead of SIGILL (the program asks cpuid, not the host's /proc/cpuinfo).
- AArch64 (Raspberry Pi / Jetson class): the program cross-built with aarch64-linux-gnu-g++ against the
  AArch64 wheels' libtvm_runtime.so and libtvm_ffi.so (examples/embed_cpp/fetch_aarch64_runtime.sh puts
  them in examples/embed_cpp/aarch64-runtime/, or $SESSA_AARCH64_RUNTIME; .ci/run does it: nothing is
  downloaded here), the model compiled with --host aarch64-linux-gnu --cpu generic and cortex-a76, run
  under qemu-aarch64 as a Cortex-A72 and a Neoverse-N1 (dot product): PyTorch's text again, and the
  cortex-a76 build refused on the Cortex-A72. About 25 s more in all (three more compiles).
"""

from __future__ import annotations

import functools
import json
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from parity import BUNDLED_CAPACITY, compile_bundled
from sessa_export.checkpoint import load_checkpoint
from sessa_export.data import BUNDLED_MODEL, encode

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "embed_cpp"
CAPACITY = BUNDLED_CAPACITY
CASES = [  # (prompt, new bytes): a multi-token prefill, and a one-byte prompt (S = 1 from the start)
    ("def main():\n    ", 48),
    ("T", 24),
]
MIN_MARGIN = 1e-3  # the reference's top-1 / top-2 logit gap at every pick: a float-level tie could flip


AARCH64_CXX = "aarch64-linux-gnu-g++"
AARCH64_SYSROOT = "/usr/aarch64-linux-gnu"  # Debian's libc6-arm64-cross: the loader and libc for qemu-aarch64 -L
AARCH64_RUNTIME = Path(os.environ.get("SESSA_AARCH64_RUNTIME", EXAMPLE / "aarch64-runtime"))


def build(out: Path, cxx: str, **env: str) -> Path:
    """examples/embed_cpp/build.sh with the C++ compiler `cxx` (and build.sh's other env settings)."""
    if shutil.which(cxx) is None:
        pytest.skip(f"the C++ example needs a C++ compiler: {cxx} is not on PATH")
    if shutil.which("bash") is None:
        pytest.skip("examples/embed_cpp/build.sh needs bash")
    result = subprocess.run(["bash", str(EXAMPLE / "build.sh"), str(out)], capture_output=True, text=True,
                            env={**os.environ, "PYTHON": sys.executable, "CXX": cxx, **env})
    assert result.returncode == 0, f"build.sh failed:\n{result.stdout}\n{result.stderr}"
    return out


@pytest.fixture(scope="module")
def program(tmp_path_factory) -> Path:
    return build(tmp_path_factory.mktemp("embed_cpp") / "sessa_embed", os.environ.get("CXX", "g++"))


@pytest.fixture(scope="module")
def artifact(bundled_library) -> Path:
    return bundled_library()  # the default --cpu: x86-64-v3 here


@pytest.fixture(scope="module")
def model():
    return load_checkpoint(BUNDLED_MODEL)


@functools.lru_cache(maxsize=None)
def greedy_reference(model, prompt: str, n_new: int) -> tuple[bytes, float]:
    """Greedy continuation with SessaLM.step (prefill, then one token at a time) and the smallest
    top-1 / top-2 logit gap among the picks (cached: several builds are checked against it)."""
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


def run(program: Path, artifact: Path, *args, emulator: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """The program on `artifact` (under `emulator`, a qemu-user command line, if given)."""
    return subprocess.run([*emulator, str(program), str(artifact), *map(str, args)], capture_output=True,
                          timeout=120, env={**os.environ, "TVM_NUM_THREADS": "1"})


def own_lines(stderr: bytes) -> list[str]:
    """The program's stderr lines without qemu's own warnings (features its TCG lacks)."""
    return [line for line in stderr.decode(errors="replace").splitlines() if line and not line.startswith("qemu-")]


def assert_greedy_matches(program: Path, artifact: Path, model, prompt: str, n_new: int, emulator=()) -> None:
    expected, margin = greedy_reference(model, prompt, n_new)
    assert margin > MIN_MARGIN, f"near-tie in the reference (gap {margin:.2e}): pick another prompt"
    result = run(program, artifact, prompt, n_new, emulator=emulator)
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    assert result.stdout == expected, (f"C++ printed {result.stdout!r}\nPyTorch greedy  {expected!r}\n"
                                       f"stderr: {result.stderr.decode(errors='replace')}")
    assert b"decode" in result.stderr and f"capacity {CAPACITY}".encode() in result.stderr


def assert_refused_for(result: subprocess.CompletedProcess, cpu: str, *missing: str) -> None:
    """Exit 1 with one line naming the build's --cpu and the missing features, before any output (no SIGILL)."""
    lines = own_lines(result.stderr)
    assert result.returncode == 1 and result.stdout == b"", (result.returncode, lines)
    assert len(lines) == 1 and lines[0].startswith("error: model.so was built for --cpu " + cpu), lines
    assert all(name in lines[0] for name in missing) and "lower --cpu" in lines[0], lines


@pytest.mark.parametrize("prompt,n_new", CASES)
def test_greedy_matches_pytorch(program, artifact, model, prompt, n_new):
    assert_greedy_matches(program, artifact, model, prompt, n_new)


def test_a_float16_state_library_runs_as_in_python(program, tmp_path):
    """compile --state-dtype float16: the program allocates float16 caches (from the manifest) and prints
    the bytes the Python runner's greedy decode of the same library gives."""
    from sessa_export.generate import Sampling, generate
    from sessa_export.runtime.tvm_runner import TvmRunner

    artifact = compile_bundled(tmp_path / "tiny16", "--state-dtype", "float16")
    prompt, n_new = CASES[0]
    expected = generate(TvmRunner(artifact, threads=1), np.array([encode(prompt)]), n_new, Sampling()).tokens[0]
    result = run(program, artifact, prompt, n_new)
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    assert result.stdout == bytes(int(t) for t in expected)


def test_capacity_is_checked(program, artifact):
    full = run(program, artifact, "x" * 100, CAPACITY - 100 + 1)  # 100 + n - 1 = CAPACITY positions: fits
    assert full.returncode == 0 and len(full.stdout) == CAPACITY - 100 + 1, full.stderr
    result = run(program, artifact, "x" * 100, CAPACITY - 100 + 2)  # one position too many
    assert result.returncode == 1 and result.stdout == b""
    assert f"exceed the compiled capacity {CAPACITY}".encode() in result.stderr, result.stderr


def test_usage(program):
    result = subprocess.run([str(program)], capture_output=True)
    assert result.returncode == 2 and b"usage:" in result.stderr and b"--cpu-features" in result.stderr


def test_a_library_for_features_this_cpu_lacks_is_refused(program, artifact, tmp_path):
    """The program checks the manifest's cpu_features against the CPU before loading model.so."""
    if not features_of(program):
        pytest.skip(f"the program checks x86-64 and AArch64 CPUs, not {platform.machine()}")
    broken = tmp_path / "future"
    shutil.copytree(artifact, broken)
    manifest = json.loads((broken / "sessa_config.json").read_text())
    manifest["cpu_features"] = [*manifest["cpu_features"], "avx1024_made_up"]
    (broken / "sessa_config.json").write_text(json.dumps(manifest))
    assert_refused_for(run(program, broken, "x", 4), manifest["cpu"], "avx1024_made_up")


def features_of(program: Path, emulator: tuple[str, ...] = ()) -> set[str]:
    """What `sessa_embed --cpu-features` finds on the CPU it runs on."""
    result = subprocess.run([*emulator, str(program), "--cpu-features"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return set(result.stdout.split())


def test_the_program_sees_the_cpu_features_the_python_runner_sees(program):
    """One rule for both checks: on a real machine cpuid / the hwcaps (the program) and /proc/cpuinfo
    (sessa_export's runner) give the same features of every --cpu level."""
    from sessa_export.targets.cpu import CPUS, running_cpu_features

    known = {feature for levels in CPUS.values() for features in levels.values() for feature in features}
    python_view = known & set(running_cpu_features())
    if not python_view:
        pytest.skip("no /proc/cpuinfo features of a known architecture on this machine")
    assert features_of(program) == python_view


# -- x86-64 without AVX-512 -----------------------------------------------------------------------

X86_ONLY = pytest.mark.skipif(platform.machine() != "x86_64", reason="x86-64 builds of model.so (this is not x86-64)")
# AVX-512 state: zmm registers, xmm/ymm 16-31 (EVEX only), the k mask registers.
AVX512_REGISTERS = re.compile(r"%(zmm\d+|[xy]mm(1[6-9]|2\d|3[01])|k[0-7])\b")


def avx512_instructions(library: Path) -> int:
    """How many of `library`'s instructions use an AVX-512 register (objdump -d)."""
    if shutil.which("objdump") is None:
        pytest.skip("needs objdump (binutils)")
    text = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(library)], capture_output=True, text=True,
                          check=True).stdout
    return sum(1 for line in text.splitlines() if AVX512_REGISTERS.search(line))


@pytest.fixture(scope="module")
def avx512_artifact(tmp_path_factory) -> Path:
    return compile_bundled(tmp_path_factory.mktemp("embed_cpp_v4") / "tiny", "--cpu", "x86-64-v4")


def qemu_x86(cpu: str) -> tuple[str, ...]:
    if shutil.which("qemu-x86_64") is None:
        pytest.skip("needs qemu-x86_64 (apt-get install qemu-user)")
    return ("qemu-x86_64", "-cpu", cpu)


@X86_ONLY
def test_the_portable_build_holds_no_avx512_instruction(artifact, avx512_artifact):
    """The default --cpu x86-64-v3 library holds no instruction on an AVX-512 register; the count is the
    one an x86-64-v4 build shows thousands of (the check can fail)."""
    assert json.loads((artifact / "sessa_config.json").read_text())["cpu"] == "x86-64-v3"
    assert avx512_instructions(artifact / "model.so") == 0
    assert avx512_instructions(avx512_artifact / "model.so") > 100


@X86_ONLY
def test_the_portable_build_runs_on_haswell(program, artifact, model):
    """Under qemu-x86_64 -cpu Haswell (AVX2, no AVX-512): PyTorch's greedy text."""
    emulator = qemu_x86("Haswell")
    assert {"avx2", "fma"} <= features_of(program, emulator) and "avx512f" not in features_of(program, emulator)
    assert_greedy_matches(program, artifact, model, *CASES[0], emulator=emulator)


@X86_ONLY
def test_an_avx512_build_is_refused_on_haswell(program, avx512_artifact):
    """One line naming what is missing, instead of SIGILL: the program asks cpuid, which qemu emulates
    (/proc/cpuinfo under qemu-user is the host's, which has AVX-512 here)."""
    assert_refused_for(run(program, avx512_artifact, "x", 4, emulator=qemu_x86("Haswell")), "x86-64-v4",
                       "avx512f", "avx512vl")


# -- AArch64 (Raspberry Pi 4/5, Jetson class) under qemu-aarch64 -----------------------------------


@pytest.fixture(scope="module")
def aarch64_program(tmp_path_factory) -> Path:
    import importlib.metadata as metadata

    if shutil.which("qemu-aarch64") is None:
        pytest.skip("needs qemu-aarch64 (apt-get install qemu-user)")
    if not Path(AARCH64_SYSROOT, "lib", "ld-linux-aarch64.so.1").is_file():
        pytest.skip(f"needs the AArch64 libc in {AARCH64_SYSROOT} (apt-get install g++-aarch64-linux-gnu)")
    wanted = f"apache-tvm=={metadata.version('apache-tvm')} apache-tvm-ffi=={metadata.version('apache-tvm-ffi')}"
    versions = AARCH64_RUNTIME / "VERSIONS"
    if not versions.is_file() or versions.read_text().strip() != wanted:
        pytest.skip(f"needs the AArch64 TVM runtime of {wanted} in {AARCH64_RUNTIME}: "
                    "run examples/embed_cpp/fetch_aarch64_runtime.sh (.ci/run does)")
    return build(tmp_path_factory.mktemp("embed_cpp_aarch64") / "sessa_embed", AARCH64_CXX,
                 TVM_LIBS=str(AARCH64_RUNTIME))


@pytest.fixture(scope="module")
def aarch64_artifacts(tmp_path_factory, aarch64_program) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("embed_cpp_aarch64_model")
    return {cpu: compile_bundled(folder / cpu, "--host", "aarch64-linux-gnu", "--cpu", cpu)
            for cpu in ("generic", "cortex-a76")}


def qemu_aarch64(cpu: str) -> tuple[str, ...]:
    return ("qemu-aarch64", "-L", AARCH64_SYSROOT, "-cpu", cpu)


@pytest.mark.parametrize("build_cpu,emulated,prompt,n_new", [("generic", "cortex-a72", *case) for case in CASES]
                         + [("cortex-a76", "neoverse-n1", *CASES[0])])
def test_aarch64_greedy_matches_pytorch(aarch64_program, aarch64_artifacts, model, build_cpu, emulated,
                                        prompt, n_new):
    """A Raspberry Pi 4 class core (Cortex-A72: NEON) runs the generic build, a Neoverse-N1 (NEON + dot
    product, like Cortex-A76 / Pi 5 / Jetson Orin) the cortex-a76 one: PyTorch's greedy text both."""
    assert_greedy_matches(aarch64_program, aarch64_artifacts[build_cpu], model, prompt, n_new,
                          emulator=qemu_aarch64(emulated))


def test_aarch64_dot_product_build_is_refused_on_cortex_a72(aarch64_program, aarch64_artifacts):
    emulator = qemu_aarch64("cortex-a72")
    assert features_of(aarch64_program, emulator) == {"asimd"}  # the hwcaps qemu gives the guest, not the host's
    assert_refused_for(run(aarch64_program, aarch64_artifacts["cortex-a76"], "x", 4, emulator=emulator),
                       "cortex-a76", "asimddp")


TENSOR_TYPES = {"float32": (2, 32), "float16": (2, 16), "bfloat16": (4, 16), "int64": (0, 64), "int32": (0, 32),
                "int8": (0, 8), "uint8": (1, 8)}  # numpy dtype -> DLPack type code, bits


def kernel_calls(artifact: Path, prompt: str, wanted) -> dict[str, tuple[bytes, bytes]]:
    """The first call of every kernel whose name `wanted` accepts, in a prefill of `prompt` and one
    decode step through the Python runner: {name: (its arguments as tests/kernel_call.cpp reads them,
    the bytes of its tensors after the call)}."""
    import struct

    import tvm

    from sessa_export.runtime.tvm_runner import TvmRunner

    runner, calls, pending = TvmRunner(artifact, threads=1), {}, {}

    def instrument(func, name, before, ret, *args):
        if name in calls or not wanted(name):
            return 0
        if not before:
            calls[name] = (pending.pop(name), b"".join(a.numpy().tobytes() for a in args if not isinstance(a, int)))
            return 0
        blob = [struct.pack("<I", len(args))]
        for a in args:
            if isinstance(a, int):
                blob.append(struct.pack("<Bq", 1, a))
            else:
                assert isinstance(a, tvm.runtime.Tensor), (name, type(a))
                array = a.numpy()
                blob.append(struct.pack("<BBBI", 0, *TENSOR_TYPES[str(array.dtype)], array.ndim)
                            + struct.pack(f"<{array.ndim}q", *array.shape) + array.tobytes())
        pending[name] = b"".join(blob)
        return 0

    runner.vm.set_instrument(instrument)
    logits, state = runner.step(np.asarray([encode(prompt)], dtype=np.int64), runner.empty_state(1))
    runner.step(np.argmax(logits[:, -1:], axis=-1), state)
    return calls


def test_aarch64_q8_kernels_compute_as_on_x86(aarch64_program, bundled_library, tmp_path):  # (the program's fixture: the skips)
    """compile --quantization q8 for cortex-a76 puts the int8 matmuls, decode and prefill, on sdot
    (tests/test_quant_kernels.py checks the object code). Under qemu as a Neoverse-N1, each of its quantized matmul kernels and its
    FeedbackAttention prefill, called on the arguments the x86-64 q8 build's kernel got in a prefill and
    a decode step, writes the bytes the x86-64 kernel wrote: the int8 products are summed exactly in
    int32 and scaled once per group, and the prefill's sums run in one order on every CPU.

    Not the whole greedy text: LayerNorm, the gate's tanh and the attention kernels' results differ
    between the two builds in the last bit (LLVM forms multiply-adds differently for each), and a q8
    model turns such a bit now and then into another int8 activation, so the two texts can part (they
    did after 46 bytes of this prompt once the FeedbackAttention prefill changed its summation order)."""
    kinds = ("int_matmul_decode", "int_matmul_prefill", "feedback_attention_prefill")
    x86 = bundled_library("--quantization", "q8")
    arm = compile_bundled(tmp_path / "arm", "--quantization", "q8", "--host", "aarch64-linux-gnu", "--cpu", "cortex-a76")
    caller = build(tmp_path / "kernel_call", AARCH64_CXX, TVM_LIBS=str(AARCH64_RUNTIME),
                   SOURCE=str(Path(__file__).with_name("kernel_call.cpp")))
    calls = kernel_calls(x86, CASES[0][0], lambda name: name.startswith(kinds))
    assert all(any(name.startswith(kind) for name in calls) for kind in kinds), list(calls)
    triples = []
    for index, (name, (arguments, _)) in enumerate(calls.items()):
        (tmp_path / f"args{index}.bin").write_bytes(arguments)
        triples += [name, str(tmp_path / f"args{index}.bin"), str(tmp_path / f"out{index}.bin")]
    done = subprocess.run([*qemu_aarch64("neoverse-n1"), str(caller), str(arm / "model.so"), *triples],
                          capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    for index, (name, (_, expected)) in enumerate(calls.items()):
        assert (tmp_path / f"out{index}.bin").read_bytes() == expected, f"{name}: the AArch64 kernel wrote other bytes"
