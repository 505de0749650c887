"""Run a `sessa-export compile --target cpu` artifact from Python with the TVM runtime.

`TvmRunner` has the runner interface of sessa_export/runtime (`empty_state`, `step`, `state_arrays`).
Its state is a `TvmState`: the preallocated caches of every layer (capacity C rows each) and
the number P of positions already in them. `step` hands the caches to the compiled `step`
function, which writes rows P..P+S-1 in place, and returns a new TvmState over the *same*
buffers with P + S: nothing is copied. Rows < P are never written, so an earlier state object
stays valid until a step from an earlier state overwrites its rows (runtime/cache_writes.py); a
stale state is refused, and a fork needs `state.copy()`. Steps of one runner are serialised: any
thread may call `step`.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..artifact import member, read_manifest, state_layout
from ..errors import SessaExportError
from ..targets import TARGETS
from . import available_cores
from .buffer_pool import BufferPool
from .cache_writes import CacheWrites


@dataclass(frozen=True)
class TvmState:
    """Caches [key, value, feedback_key, feedback_state] per layer (TVM tensors), P, and the steps run on
    those caches (`writes`, `index`: which of them this state comes after)."""

    caches: tuple
    past: int
    batch: int
    writes: CacheWrites = dataclasses.field(default_factory=CacheWrites)
    index: int = 0

    def copy(self) -> "TvmState":
        """An independent state (copies the buffers): for running two continuations."""
        import tvm

        return TvmState(tuple(tvm.runtime.tensor(c.numpy()) for c in self.caches), self.past, self.batch)


def use_tvm_threads(threads: int) -> int:
    """Run TVM's parallel kernels on `threads` workers; returns how many run (at most the pool's size).

    TVM sizes its thread pool from TVM_NUM_THREADS when the pool starts (default: half the cores, it
    assumes hyperthreads), and a pool started that way on 2 cores pins the calling thread to core 0,
    and so every thread it starts later (a compile's too); config_threadpool can only use fewer
    workers than the pool has. So TVM_NUM_THREADS is set first, even when TVM is loaded already: every
    parallel kernel launch reads it, and without it asks libstdc++ for the core count, which re-reads
    /sys/devices/system/cpu/online each time (about 0.7 ms of a 3.7 ms q4 decode step here)."""
    os.environ.setdefault("TVM_NUM_THREADS", str(max(threads, available_cores())))
    import tvm

    tvm.get_global_func("runtime.config_threadpool")(1, threads)
    return int(tvm.get_global_func("runtime.NumThreads")())


class TvmRunner:
    """A compiled TVM CPU library (model.so) loaded with the TVM runtime and the Relax VM."""

    name = "tvm"

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        path = Path(path)
        self.manifest = manifest = read_manifest(path)
        target = TARGETS.get(manifest.get("target"))
        if target is None or not target.runs_here:
            here = ", ".join(t.name for t in TARGETS.values() if t.runs_here)
            raise SessaExportError(f"{path} was compiled for {manifest.get('target')!r}; the Python TVM runner "
                                   f"runs --target {here} artifacts")
        if manifest.get("host"):
            raise SessaExportError(f"{path} was cross-compiled for {manifest['host']}; run it on that machine")
        library = member(path, manifest, "library", "model.so")
        _check_cpu(library, manifest)
        self.threads = use_tvm_threads(threads or available_cores())
        import tvm
        import tvm_ffi
        from tvm import relax

        try:
            self.library = tvm.runtime.load_module(str(library))
            self.vm = relax.VirtualMachine(self.library, tvm.cpu())
        except Exception as exc:  # TVM raises its own error types for broken or foreign libraries
            raise SessaExportError(f"{library}: the TVM runtime cannot load it "
                                   f"({str(exc).strip().splitlines()[-1]}); re-run `sessa-export compile`") from None
        self._tvm, self._shape = tvm, tvm_ffi.Shape
        self._lock = threading.Lock()
        self._pool = BufferPool()
        self._decode_inputs: dict[tuple, tuple] = {}  # input shape -> (TVM tensor, numpy view of it)
        self._step = self.vm[manifest.get("entry", "step")]
        self.capacity = int(manifest["capacity"])
        self.max_len = self.capacity  # the longest context this library runs (<= the model's max_len)
        self.layout = state_layout(manifest)
        self.input_kind = manifest["input"]["kind"]
        self.input_name = manifest["input"]["name"]
        self.vocab_size = manifest["input"].get("vocab_size")  # the embedding's rows (config is None for custom models)
        self.dtype = np.float32

    def empty_state(self, batch: int) -> TvmState:
        """Caches for `batch` sequences, capacity rows each, uninitialised (only rows < P are read):
        those of a state no longer held when there is one (runtime/buffer_pool.py)."""
        caches, _ = self._pool.take(batch, lambda: tuple(
            self._tvm.runtime.empty(layer.shape(f, batch, self.capacity), self.layout.dtype, self._tvm.cpu())
            for layer, f in self.layout.tensors()))
        state = TvmState(caches, 0, batch)
        self._pool.lend(state.writes, batch, caches)
        return state

    def step(self, input_ids: np.ndarray, state: TvmState) -> tuple[np.ndarray, TvmState]:
        input_ids = np.asarray(input_ids)
        if self.input_kind == "tokens":
            if input_ids.ndim != 2 or input_ids.dtype.kind not in "iu":
                raise SessaExportError(f"{self.input_name} must be integer token ids [batch, sequence], "
                                       f"got {input_ids.dtype} {list(input_ids.shape)}")
            data = np.ascontiguousarray(input_ids, dtype=np.int64)
            vocab = self.vocab_size
            if vocab is not None and data.size and (data.min() < 0 or data.max() >= vocab):
                raise SessaExportError(f"token ids must lie in [0, {vocab}), got {int(data.min())}..{int(data.max())}")
        else:
            data = np.ascontiguousarray(input_ids, dtype=self.dtype)
        batch, new = data.shape[:2]
        if batch != state.batch:
            raise SessaExportError(f"the state holds batch {state.batch}, the input has batch {batch}")
        if new < 1:
            raise SessaExportError("a step needs at least one new position")
        total = state.past + new
        if total > self.capacity:
            raise SessaExportError(f"context of {total} positions exceeds the compiled capacity of {self.capacity}; "
                                   "re-run `sessa-export compile --max-len N` with a larger N")
        with self._lock:  # the Relax VM runs one step at a time
            index = state.writes.begin(state.index, state.past)
            logits = self._step(self._input(data), self._shape([state.past]), *state.caches)
        # a view of the VM's output, which it holds alive: a prefill's logits are [batch, S, vocab] (131 MB
        # at S = 1024, vocab 32000), and a copy into fresh pages cost 15% of a 125M prefill here
        return np.from_dlpack(logits), TvmState(state.caches, total, batch, state.writes, index)

    def _input(self, data: np.ndarray):
        """`data` as a TVM tensor. A decode step's (S = 1) goes into a buffer kept for its shape: a new
        tensor took 0.1 ms of a 3.4 ms 125M q8 step here, its code and data cold after the step's
        sweep over the weights. Called under the lock: the previous step is done with the buffer."""
        if data.shape[1] != 1:
            return self._tvm.runtime.tensor(data)
        held = self._decode_inputs.get(data.shape)
        if held is None:
            tensor = self._tvm.runtime.empty(data.shape, str(data.dtype), self._tvm.cpu())
            held = self._decode_inputs[data.shape] = (tensor, np.from_dlpack(tensor))
        held[1][...] = data
        return held[0]

    def state_arrays(self, state: TvmState) -> dict[str, np.ndarray]:
        """The first P positions of every cache, named past_key_values.{i}.{field}."""
        arrays = {}
        for name, (layer, field), cache in zip(self.layout.names(), self.layout.tensors(), state.caches):
            try:
                array = np.from_dlpack(cache)  # a view: copy the first P rows only
            except (TypeError, BufferError, AttributeError, RuntimeError):  # numpy has no bfloat16 DLPack
                array = cache.numpy()
            rows = np.take(array, range(state.past), axis=self.layout.position_axis(field))
            arrays[name] = np.asarray(rows, dtype=np.float32)  # float16 and ml_dtypes' bfloat16 convert exactly
        return arrays


def _check_cpu(library: Path, manifest: dict) -> None:
    """Refuse a library built for instructions this CPU lacks (it would die of SIGILL mid-step)."""
    from ..targets.cpu import running_cpu_features

    needed, have = manifest.get("cpu_features") or [], set(running_cpu_features())
    missing = [feature for feature in needed if feature not in have]
    if have and missing:
        raise SessaExportError(f"{library} was built for --cpu {manifest.get('cpu')} and needs {', '.join(missing)}, "
                               "which this CPU lacks; re-run `sessa-export compile` with a lower --cpu "
                               "(x86-64-v3, x86-64-v2, x86-64; AArch64: generic)")


__all__ = ["TvmRunner", "TvmState", "use_tvm_threads"]
