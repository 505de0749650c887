"""The whole pipeline on the bundled tiny model: ONNX and TVM CPU, validated and generating.

`run_demo` exports to ONNX and compiles with TVM for this CPU, validates both against PyTorch
step by step, generates through each and reports tokens/s beside the PyTorch reference.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from .artifact import check_replaceable
from .bench import SETTLE_S
from .checkpoint import load_checkpoint
from .data import BUNDLED_MODEL, heldout_bytes
from .generate import Generation, Sampling, generate
from .runtime import OrtRunner, TorchRunner
from .runtime.tvm_runner import TvmRunner
from .to_onnx import export_onnx
from .to_tvm import CompileTarget, compile_graph
from .tracer import trace
from .validate import FP32, cases, render, run_case

CAPACITY = 1024  # positions the demo's TVM build holds
PREFILL, DECODE = 384, 64  # validation: a prefill past the ONNX forward attention's 256-row blocks


def artifacts(out: Path) -> dict[str, Path]:
    """Where the demo writes: OUT/onnx and OUT/tvm-cpu."""
    return {"onnx": out / "onnx", "tvm": out / "tvm-cpu"}


def run_demo(out: Path, prompt: str, prompt_ids: np.ndarray, max_new_tokens: int, sampling: Sampling,
             console, track: Callable[[Iterable, str], Iterable], stream: Callable[[np.ndarray], None]) -> bool:
    """Export, compile, validate and generate; True when both validations pass."""
    for artifact in artifacts(out).values():
        check_replaceable(artifact)  # both, before either is written
    fresh = [path for path in artifacts(out).values() if not path.exists()]
    try:
        return _run(out, prompt, prompt_ids, max_new_tokens, sampling, console, track, stream)
    except BaseException:  # an error or an interrupt late in the demo: remove what this run created
        for path in fresh:
            shutil.rmtree(path, ignore_errors=True)
        raise


def _run(out: Path, prompt: str, prompt_ids: np.ndarray, max_new_tokens: int, sampling: Sampling,
         console, track: Callable[[Iterable, str], Iterable], stream: Callable[[np.ndarray], None]) -> bool:
    model = load_checkpoint(BUNDLED_MODEL)
    console.print(f"[bold]model[/bold] {BUNDLED_MODEL} ({model.num_parameters():,} parameters)")
    graph = trace(model)
    paths = artifacts(out)
    with console.status("exporting to ONNX") as status:
        export_onnx(graph, paths["onnx"], source=str(BUNDLED_MODEL))
        status.update("compiling with TVM for this CPU")
        compile_graph(graph, paths["tvm"], CompileTarget("cpu"), CAPACITY, source=str(BUNDLED_MODEL))
    reference = TorchRunner(model)
    ok, figures = True, {}
    for runner, path in ((OrtRunner(paths["onnx"]), paths["onnx"]), (TvmRunner(paths["tvm"]), paths["tvm"])):
        console.rule(f"[bold]{runner.name}[/bold]: {path}")
        demo_cases = cases(model.config.vocab_size, PREFILL, DECODE, heldout_bytes(), 0, CAPACITY)
        reports = [run_case(name, reference, runner, ids, steps, FP32)
                   for name, ids, steps in track(demo_cases, "validating")]
        render(reports, FP32, console)
        ok = ok and all(r.ok for r in reports)
        sys.stdout.write(prompt)
        time.sleep(SETTLE_S)  # the thread pools that just ran go idle first: fair speed figures
        figures[runner.name] = generate(runner, prompt_ids, max_new_tokens, sampling, on_tokens=stream)
        sys.stdout.write("\n")
    time.sleep(SETTLE_S)
    figures[reference.name] = generate(reference, prompt_ids, max_new_tokens, sampling)
    console.rule("[bold]speed[/bold] (sampling the same tokens on each)")
    for name, result in figures.items():
        console.print(speed_line(name, result))
    return ok


def speed_line(name: str, result: Generation) -> str:
    return (f"{name:12} prefill {result.prompt_tokens} tokens {result.prefill_s * 1e3:6.1f} ms, "
            f"decode {result.decode_tokens_per_s:6.0f} tokens/s")
