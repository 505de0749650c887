"""Shared helpers for the benchmarks: model configs, the machine, and a plain-text table.

Timing itself is `sessa_export.bench.time_runners`, shared with the CLI's `bench`."""

from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Callable, Mapping, Sequence

from pathlib import Path

import numpy as np
import torch

from sessa_export.config import SessaConfig

DECODE_CONTEXT = 1024  # prefill length, and the context decode is timed at
DECODE_STEPS = 32


def config_125m(vocab_size: int = 32000, max_len: int | None = None) -> SessaConfig:
    """A 125M-class Sessa LM: 12 layers of width 768, 12 heads, no MLP, untied head.

    Parameters: 12 x 9·768² (W_in 2, q/k/v 3, out_proj 1, proj_fb 2, W_out 1) + embedding
    and head 2 x 32000·768, about 113M.
    """
    return SessaConfig(vocab_size=vocab_size, d_model=768, n_layers=12, n_heads=12, n_kv_heads=None,
                       max_len=max_len, mlp_ratio=0.0, tie_embeddings=False).validate()


def config_1b(vocab_size: int = 32000, max_len: int | None = None) -> SessaConfig:
    """A 1B-class Sessa LM (issue 12): 24 layers of width 2048, 16 heads, no MLP, untied head; about
    24 x 9·2048² + 2 x 32000·2048 = 1.04B parameters."""
    return SessaConfig(vocab_size=vocab_size, d_model=2048, n_layers=24, n_heads=16, n_kv_heads=None,
                       max_len=max_len, mlp_ratio=0.0, tie_embeddings=False).validate()


CONFIGS = {"125m": config_125m, "1b": config_1b}


def set_threads(threads: int | None) -> int:
    """torch intra-op threads: all available cores by default. Returns the number set."""
    from sessa_export.runtime import available_cores

    threads = threads or available_cores()
    torch.set_num_threads(threads)
    return threads


def call_seconds(fn: Callable[[], object], repeat: int) -> list[float]:
    """Wall time of each of `repeat` calls of `fn`, in seconds, after one untimed call (warm-up)."""
    fn()
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return samples


def median_ms(fn: Callable[[], object], repeat: int) -> float:
    """Median of `call_seconds(fn, repeat)`, in milliseconds."""
    return 1e3 * statistics.median(call_seconds(fn, repeat))


def median_ms_in_turns(fns: Mapping[object, Callable[[], object]], repeat: int) -> dict[object, float]:
    """Median ms of each of `fns`, called in turns `repeat` times after one untimed turn: load from
    elsewhere hits them all alike, so their ratios are fair."""
    times = {key: [] for key in fns}
    for turn in range(repeat + 1):
        for key, fn in fns.items():
            start = time.perf_counter()
            fn()
            if turn:
                times[key].append(time.perf_counter() - start)
    return {key: 1e3 * statistics.median(t) for key, t in times.items()}


def tvm_linear(weight: np.ndarray, rows: int, packed: bool = True, cpu_name: str | None = None) -> Callable:
    """x [1, rows, in] (a TVM tensor) -> x @ W^T for W = `weight` [out, in] (torch's layout), built the
    way the TVM compiler emits a CPU linear layer for compile --cpu `cpu_name` (None: the default): W in
    panels (targets/cpu.py's layout and CpuMatmul rule), or with `packed=False` W^T as [in, out] through
    Relax's matmul (what GPUs get)."""
    import tvm
    from tvm import relax

    from sessa_export.targets import cpu
    from sessa_export.ops.tvm_matmul import pack_weight
    from sessa_export.to_tvm import CompileTarget

    outputs, inputs = weight.shape
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([1, rows, inputs], "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            if packed:
                y = cpu.emit_linear(bb, x, relax.const(pack_weight(weight, 32)), None, [1, rows, outputs])
            else:
                y = bb.emit(relax.op.matmul(x, relax.const(np.ascontiguousarray(weight.T))))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    target = CompileTarget("cpu", cpu=cpu_name).tvm_target()
    executable = tvm.compile(bb.get(), target=target, relax_pipeline=cpu.pipeline(target))
    return relax.VirtualMachine(executable, tvm.cpu())["main"]


def tvm_quantized_linear(weight: np.ndarray, rows: int, mode: str, cpu_name: str | None = None) -> Callable:
    """x [1, rows, in] (a TVM tensor) -> y [1, rows, out / P, P]: x @ W^T with W = `weight` [out, in]
    stored as compile --quantization `mode` stores it, through the prefill kernel the TVM compiler
    emits for compile --cpu `cpu_name` (targets/cpu.py's `quantized_matmul_kernel` and rules)."""
    import tvm
    from tvm.s_tir import dlight as dl

    from sessa_export.ops import tvm_dequant_matmul as dq
    from sessa_export.targets import cpu
    from sessa_export.to_tvm import CompileTarget

    outputs, inputs = weight.shape
    target = CompileTarget("cpu", cpu=cpu_name).tvm_target()
    q, scales = (tvm.runtime.tensor(a) for a in dq.quantize(weight, mode, cpu.weight_panel(outputs), QUANT_GROUP))
    _, func = cpu.quantized_matmul_kernel(inputs, outputs, mode, False, QUANT_GROUP, False, target)
    with target:
        mod = dl.ApplyDefaultSchedule(*cpu.schedule_rules())(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}))
    kernel = tvm.compile(mod, target=target)["main"]
    y = tvm.runtime.tensor(np.zeros((1, rows, outputs // cpu.weight_panel(outputs), cpu.weight_panel(outputs)), np.float32))
    return lambda x: kernel(x, q, scales, y)


QUANT_GROUP = 32  # inputs per 16-bit scale in the decode bound's accounting of q8/q4, int8/int4 weights


def weight_bytes(model: torch.nn.Module, bits: int | None = None) -> int:
    """Bytes of every weight but the embedding table (the LM head included; a tied table once) at its
    precision: float32, or with `bits` each linear weight at `bits` per value plus a 16-bit scale per
    QUANT_GROUP inputs (biases, norms and narrow layers stay float32)."""
    embed = getattr(model, "embed", None)
    tied = embed is not None and any(m.weight is embed.weight for m in model.modules() if isinstance(m, torch.nn.Linear))
    quantized = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear)
                 and m.in_features % QUANT_GROUP == 0 and m.out_features >= 16} if bits else set()
    total = 0
    for p in model.parameters():  # each tensor once
        if embed is not None and p is embed.weight and not tied:
            continue
        total += p.numel() * (bits / 8 + 2 / QUANT_GROUP) if id(p) in quantized else p.numel() * 4
    return int(total)


def read_bandwidth(threads: int, gigabytes: float = 1.0, repeat: int = 5) -> tuple[float, float]:
    """Bytes/s of numpy float32 sums over a `gigabytes` array (best of `repeat`): one thread over
    the whole array, and `threads` threads each summing its own slice (numpy releases the GIL)."""
    from concurrent.futures import ThreadPoolExecutor

    array = np.ones(int(gigabytes * 2**30) // 4, dtype=np.float32)
    single = array.nbytes / min(call_seconds(array.sum, repeat))
    slices = np.array_split(array, threads)
    with ThreadPoolExecutor(threads) as pool:
        parallel = array.nbytes / min(call_seconds(lambda: list(pool.map(np.sum, slices)), repeat))
    return single, parallel


def op_times(path: Path, context: int, threads: int, vocab: int, steps: int = 8,
             by_node: bool = False) -> dict[str, float]:
    """ms/token by op type over `steps` decode steps after a prefill of `context`, from ONNX Runtime's
    profiler: one OrtRunner on the export at `path` (either state contract) with the profiler on.
    `by_node`: by op type and node name with its numbers dropped, so each layer's instance of a node
    (inside the cache functions' `If` branches too) adds to one row."""
    import collections
    import json
    import os
    import re

    import onnxruntime as ort

    from sessa_export.runtime import OrtRunner

    options = ort.SessionOptions()
    options.enable_profiling = True
    options.profile_file_prefix = str(path / "profile")
    runner = OrtRunner(path, threads, options)
    ids = np.random.default_rng(0).integers(0, vocab, (1, context + steps + 1))
    _, state = runner.step(ids[:, :context], runner.empty_state(1))
    for t in range(context, context + steps + 1):
        _, state = runner.step(ids[:, t:t + 1], state)
    trace_file = runner.session.end_profiling()
    events = json.loads(Path(trace_file).read_text())
    os.remove(trace_file)
    runs = [e for e in events if e.get("name") == "model_run"][-steps:]
    by_op = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["ts"] >= runs[0]["ts"] and e["name"].endswith("_kernel_time"):
            node = re.sub(r"\d+", "#", e["name"][:-len("_kernel_time")])
            by_op[f"{e['args']['op_name']} {node}" if by_node else e["args"]["op_name"]] += e["dur"] / 1e3 / steps
    by_op["(whole step)"] = sum(e["dur"] for e in runs) / 1e3 / steps
    return dict(by_op)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_description() -> str:
    from sessa_export.runtime import available_cores

    return (f"{cpu_model()}, {available_cores()} cores available ({os.cpu_count()} on the machine), "
            f"torch {torch.__version__} with {torch.get_num_threads()} threads, Python {platform.python_version()}")


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]], title: str | None = None) -> str:
    """A monospaced table; numbers right-aligned, text left-aligned."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    numeric = [all(_is_number(row[i]) for row in rows) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if num else c.ljust(w) for c, w, num in zip(row, widths, numeric)).rstrip()

    out = [title] if title else []
    out += [line(cells[0]), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in cells[1:]]
    return "\n".join(out)


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]], title: str | None = None) -> None:
    print(format_table(headers, rows, title), flush=True)


def _is_number(value: object) -> bool:
    if isinstance(value, (int, float)):
        return True
    try:
        float(str(value).replace(",", ""))
        return True
    except ValueError:
        return False
