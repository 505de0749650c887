"""ONNX Runtime on an export directory, under either state contract (sessa_export/state.py).

- grow: each step returns new state tensors of P + S positions, kept in ORT's buffers;
- inplace: a `CacheState` holds caches of a capacity C, bound as both input and output of one
  IOBinding (once per set of caches; a step rebinds only its input ids, P and a new logits array),
  so ORT writes the new rows in place: no state is allocated, copied or bound again per step. When a step needs
  more than C positions the caches grow to `state.capacity_for` (whole blocks of
  state.CAPACITY_BLOCK positions, at most max_len) and the valid rows are copied once. Rows < P
  are never written, so an earlier CacheState stays valid only until a step runs on it or on a
  later one (two continuations of one state need `state.copy()`).
"""

from __future__ import annotations

import dataclasses
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..artifact import member, read_manifest, state_layout
from ..errors import SessaExportError
from ..state import ATTENTION_MASK, GENAI, GROW, PAST_LENGTH, capacity_for
from .buffer_pool import BufferPool
from .cache_writes import CacheWrites


@dataclass(frozen=True)
class CacheState:
    """The in-place contract's state: caches (numpy arrays and the OrtValues over them) and P."""

    arrays: dict  # past name -> np.ndarray [.., capacity, ..]
    values: dict  # past name -> OrtValue over the same memory
    past: int
    batch: int
    capacity: int
    writes: CacheWrites = dataclasses.field(default_factory=CacheWrites)  # the steps run on these caches
    index: int = 0  # how many of them came before this state

    def copy(self) -> "CacheState":
        """An independent state (copies the buffers): for running two continuations."""
        from onnxruntime import OrtValue

        arrays = {name: array.copy() for name, array in self.arrays.items()}
        values = {name: OrtValue.ortvalue_from_numpy_with_onnx_type(array, self.values[name].element_type())
                  for name, array in arrays.items()}
        return CacheState(arrays, values, self.past, self.batch, self.capacity)


_NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}  # ONNX Runtime's names


class OrtRunner:
    """ONNX Runtime on an exported directory; the state stays in ORT-owned buffers between steps."""

    name = "onnxruntime"

    def __init__(self, path: str | Path, threads: int | None = None, options=None) -> None:
        """`options`: an onnxruntime.SessionOptions to start from (a profiler, say)."""
        import onnxruntime as ort

        path = Path(path)
        self.manifest = read_manifest(path)
        model_file = member(path, self.manifest, "model_file", "model.onnx")
        options = options or ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(model_file), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types for broken models
            raise SessaExportError(f"{model_file}: ONNX Runtime cannot load it ({str(exc).splitlines()[0]}); "
                                   "the file may be truncated: re-run the export") from None
        self._ort = ort
        self.input_name = self.manifest["input"]["name"]
        self.input_kind = self.manifest["input"]["kind"]
        self.vocab_size = self.manifest["input"].get("vocab_size")
        self.output_names = [o.name for o in self.session.get_outputs()]
        logits = self.session.get_outputs()[0]
        width, dtype = logits.shape[-1], _NUMPY_TYPES.get(logits.type)
        # what step() allocates the logits as: (last dim, dtype); a width the graph leaves open is learnt
        self._logits = (width, dtype) if isinstance(width, int) and dtype else None
        self.layout = state_layout(self.manifest)
        self.present_of = self.layout.present_of()
        self.present_name = {past: present for present, past in self.present_of.items()}
        self.graph_input = {name: self.layout.graph_name(layer.layer, field)  # genai names them as KV layers
                            for name, (layer, field) in zip(self.layout.names(), self.layout.tensors())}
        self.dtype = np.float16 if self.manifest.get("dtype") == "float16" else np.float32
        self.precision = self.layout.precision  # the state's (state.STATE_DTYPES)
        self.max_len = self.manifest.get("max_len")
        self.inplace = self.layout.contract != GROW
        self._pool = BufferPool()
        self._bindings = weakref.WeakKeyDictionary()  # a set of caches' CacheWrites -> (its OrtValues, IOBinding)

    def empty_state(self, batch: int) -> dict | CacheState:
        if self.inplace:
            return self._caches(batch, capacity_for(1, self.max_len))
        return {name: self._value(array) for name, array in self.layout.zeros(batch, 0).items()}

    def _value(self, array: np.ndarray):
        """An OrtValue over `array`'s memory, typed as the state's dtype (bfloat16 from its uint16 bits)."""
        return self._ort.OrtValue.ortvalue_from_numpy_with_onnx_type(array, self.precision.onnx_type)

    def _caches(self, batch: int, capacity: int, state: CacheState | None = None) -> CacheState:
        """Zeroed caches of `capacity`, holding the valid rows of `state` if given: those of a state no
        longer held when there is one (runtime/buffer_pool.py), cleared, since the graph reads every row."""
        arrays, reused = self._pool.take((batch, capacity), lambda: self.layout.zeros(batch, capacity))
        if reused:
            for array in arrays.values():
                array.fill(0)
        if state is not None:
            for (layer, field), (name, array) in zip(self.layout.tensors(), arrays.items()):
                rows = [slice(None)] * array.ndim
                rows[self.layout.position_axis(field)] = slice(0, state.past)
                array[tuple(rows)] = state.arrays[name][tuple(rows)]
        values = {name: self._value(array) for name, array in arrays.items()}
        caches = CacheState(arrays, values, 0 if state is None else state.past, batch, capacity)
        self._pool.lend(caches.writes, (batch, capacity), arrays)
        return caches

    def step(self, input_ids: np.ndarray, state: dict) -> tuple[np.ndarray, dict]:
        input_ids = np.asarray(input_ids)
        if self.input_kind == "tokens" and (input_ids.ndim != 2 or input_ids.dtype.kind not in "iu"):
            raise SessaExportError(f"{self.input_name} must be integer token ids [batch, sequence], "
                                   f"got {input_ids.dtype} {list(input_ids.shape)}")
        if self.inplace:
            return self._step_in_place(input_ids, state)
        if not isinstance(state, dict):
            raise SessaExportError(f"the state must be a dict of past_key_values.* tensors, got {type(state).__name__}")
        shapes = {name: value.shape() if callable(getattr(value, "shape", None)) else np.shape(value)
                  for name, value in state.items()}
        past = self.layout.positions_held(input_ids.shape[0], shapes)
        if self.max_len is not None and past + input_ids.shape[1] > self.max_len:
            raise SessaExportError(f"context of {past + input_ids.shape[1]} positions exceeds the model's "
                                   f"max_len={self.max_len}")
        feed = {self.input_name: self._ort.OrtValue.ortvalue_from_numpy(self._feed(input_ids))}
        feed.update(state)
        try:
            results = self.session.run_with_ort_values(self.output_names, feed)
        except Exception as exc:
            raise SessaExportError(f"ONNX Runtime rejected the inputs: {str(exc).splitlines()[0]}") from None
        named = dict(zip(self.output_names, results))
        new_state = {past_name: named[present] for present, past_name in self.present_of.items()}
        return named[self.manifest["outputs"][0]].numpy(), new_state

    def _feed(self, input_ids: np.ndarray) -> np.ndarray:
        return input_ids.astype(np.int64) if self.input_kind == "tokens" else input_ids.astype(self.dtype)

    def _step_in_place(self, input_ids: np.ndarray, state: CacheState) -> tuple[np.ndarray, CacheState]:
        """One step with the caches bound as input and output: ORT writes rows P..P+S-1 in place."""
        if not isinstance(state, CacheState):
            raise SessaExportError(f"{self.manifest.get('model_file', 'model.onnx')} keeps its state in place: "
                                   f"pass the CacheState of empty_state() or step(), not {type(state).__name__}")
        if input_ids.shape[0] != state.batch:
            raise SessaExportError(f"the state holds batch {state.batch}, the input has batch {input_ids.shape[0]}")
        if input_ids.shape[1] < 1:
            raise SessaExportError("a step needs at least one new position")
        if not 0 <= state.past <= state.capacity:
            raise SessaExportError(f"the state's caches do not hold its capacity {state.capacity} and past {state.past}")
        binding = self._binding(state)  # checks the caches on their first step
        total = state.past + input_ids.shape[1]
        with state.writes.lock:
            index = state.writes.begin(state.index, state.past)
            if total > state.capacity:  # new caches, holding the valid rows: their own writes
                state = self._caches(state.batch, capacity_for(total, self.max_len), state)
                index = state.writes.begin(0, state.past)
                binding = self._binding(state)
            logits = self._run_bound(input_ids, state, binding)
        return logits, CacheState(state.arrays, state.values, total, state.batch, state.capacity, state.writes, index)

    def _binding(self, state: CacheState):
        """The IOBinding of this set of caches: each cache bound as its input and its present output.
        Made on the set's first step, after checking that the caches hold the state's capacity; its
        steps run one at a time (`CacheWrites.lock`)."""
        values, binding = self._bindings.get(state.writes, (None, None))
        if values is not state.values:
            shapes = {name: array.shape for name, array in state.arrays.items()}
            if self.layout.positions_held(state.batch, shapes) != state.capacity:
                raise SessaExportError(f"the state's caches do not hold its capacity {state.capacity} "
                                       f"and past {state.past}")
            binding = self.session.io_binding()
            for name, value in state.values.items():
                binding.bind_ortvalue_input(self.graph_input[name], value)
                binding.bind_ortvalue_output(self.present_name[name], value)
            self._bindings[state.writes] = (state.values, binding)
        return binding

    def _run_bound(self, input_ids: np.ndarray, state: CacheState, binding) -> np.ndarray:
        """One session run over the caches' `binding`, with this step's input ids and length; the logits."""
        binding.bind_cpu_input(self.input_name, np.ascontiguousarray(self._feed(input_ids)))
        if self.layout.contract == GENAI:
            binding.bind_cpu_input(ATTENTION_MASK, np.ones((state.batch, state.past + input_ids.shape[1]), np.int64))
        else:
            binding.bind_cpu_input(PAST_LENGTH, np.array(state.past, dtype=np.int64))
        # the logits go into a new array of this step's shape: IOBinding.get_outputs() would wrap every
        # bound cache as well (0.1 ms of a 5 ms 125M int4 step here)
        name, logits = self.manifest["outputs"][0], None
        if self._logits is None:
            binding.bind_output(name)
        else:
            logits = np.empty((*input_ids.shape[:2], self._logits[0]), self._logits[1])
            binding.bind_ortvalue_output(name, self._ort.OrtValue.ortvalue_from_numpy(logits))
        try:
            self.session.run_with_iobinding(binding)
        except Exception as exc:
            raise SessaExportError(f"ONNX Runtime rejected the inputs: {str(exc).splitlines()[0]}") from None
        if logits is None:
            logits = binding.get_outputs()[-1].numpy()
            self._logits = logits.shape[-1], logits.dtype
        return logits

    def state_arrays(self, state: dict | CacheState) -> dict[str, np.ndarray]:
        if isinstance(state, CacheState):
            rows = {name: np.take(array, range(state.past), axis=self.layout.position_axis(field)).reshape(
                        layer.shape(field, state.batch, state.past))  # genai's head axis of 1 dropped
                    for (layer, field), (name, array) in zip(self.layout.tensors(), state.arrays.items())}
            return {name: self.precision.to_float32(array) for name, array in rows.items()}
        return {name: self.precision.to_float32(value.numpy()) for name, value in state.items()}
