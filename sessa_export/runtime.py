"""Runners for the step graph: the PyTorch reference and ONNX Runtime; `open_runner` picks by path.

Every runner has `empty_state(batch)`, `step(input_ids, state) -> (logits, state)` and
`state_arrays(state)`, which names each state tensor `past_key_values.{i}.{field}` for comparison.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from .errors import SessaExportError
from .model import LayerState, SessaLM
from .stepgraph import STATE_FIELDS, past_name

MANIFEST_NAME = "sessa_config.json"  # beside every artifact: what a runner needs besides the model
ARTIFACT_KIND = "an export directory"  # what an export, quantize or compile may replace at -o


class TorchRunner:
    """The PyTorch reference step path, with the state as a list of LayerState."""

    name = "pytorch"

    def __init__(self, model: SessaLM) -> None:
        self.model = model.eval()
        self.config = model.config
        self.max_len = model.config.max_len  # None: no limit

    def empty_state(self, batch: int) -> list[LayerState]:
        return self.model.empty_state(batch)

    @torch.inference_mode()
    def step(self, input_ids: np.ndarray, state: list[LayerState]) -> tuple[np.ndarray, list[LayerState]]:
        logits, state = self.model.step(torch.from_numpy(np.asarray(input_ids, dtype=np.int64)), state)
        return logits.float().numpy(), state

    def state_arrays(self, state: list[LayerState]) -> dict[str, np.ndarray]:
        return {past_name(i, f): getattr(layer, f).float().numpy()
                for i, layer in enumerate(state) for f in STATE_FIELDS}


class ForwardRunner:
    """The reference for a custom module (`--model package.module:factory`): its own forward over
    the whole prefix at every step, returning the new positions' outputs. It has no step state to
    compare, so validation compares the logits only."""

    name = "pytorch-forward"

    def __init__(self, module: torch.nn.Module) -> None:
        self.model = module.eval()

    def empty_state(self, batch: int) -> np.ndarray:
        return np.zeros((batch, 0), dtype=np.int64)

    @torch.inference_mode()
    def step(self, input_ids: np.ndarray, state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        history = np.concatenate([state, np.asarray(input_ids, dtype=np.int64)], axis=1)
        out = self.model(torch.from_numpy(history))
        if isinstance(out, dict):
            out = next(iter(out.values()))
        elif isinstance(out, (tuple, list)):
            out = out[0]
        return out[:, state.shape[1]:].float().numpy(), history

    def state_arrays(self, state: np.ndarray) -> dict[str, np.ndarray]:
        return {}


def available_cores() -> int:
    """CPU cores this process may run on (the affinity mask, not the machine's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def read_manifest(path: Path) -> dict:
    """The artifact directory's sessa_config.json, with a clear error when it is missing or broken."""
    file = path / MANIFEST_NAME
    if not file.is_file():
        raise SessaExportError(f"{path}: no {MANIFEST_NAME}; is this a directory written by "
                               "`sessa-export export` or `sessa-export compile`?")
    try:
        manifest = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SessaExportError(f"{file}: not valid JSON ({exc}); re-run the export") from None
    for key in ("format", "state", "input", "outputs"):
        if key not in manifest:
            raise SessaExportError(f"{file}: missing key {key!r}; re-run the export")
    return manifest


class OrtRunner:
    """ONNX Runtime on an exported directory; the state stays in ORT-owned buffers between steps."""

    name = "onnxruntime"

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        import onnxruntime as ort

        path = Path(path)
        self.manifest = read_manifest(path)
        model_file = path / self.manifest.get("model_file", "model.onnx")
        if not model_file.is_file():
            raise SessaExportError(f"{path}: {model_file.name} is missing; re-run the export")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(model_file), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types for broken models
            raise SessaExportError(f"{model_file}: ONNX Runtime cannot load it ({str(exc).splitlines()[0]}); "
                                   "the file may be truncated: re-run the export") from None
        self._ort = ort
        self.input_name = self.manifest["input"]["name"]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.layout = self.manifest["state"]
        self.dtype = np.float16 if self.manifest.get("dtype") == "float16" else np.float32
        self.max_len = self.manifest.get("max_len")

    def empty_state(self, batch: int) -> dict:
        state = {}
        for layer in self.layout:
            for f in STATE_FIELDS:
                shape = [batch if d == "batch" else 0 if d == "past" else d for d in layer["shapes"][f]]
                state[layer["past"][f]] = self._ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, self.dtype))
        return state

    def step(self, input_ids: np.ndarray, state: dict) -> tuple[np.ndarray, dict]:
        input_ids = np.asarray(input_ids)
        kind = self.manifest["input"]["kind"]
        if kind == "tokens" and (input_ids.ndim != 2 or input_ids.dtype.kind not in "iu"):
            raise SessaExportError(f"{self.input_name} must be integer token ids [batch, sequence], "
                                   f"got {input_ids.dtype} {list(input_ids.shape)}")
        past = self._check_state(input_ids.shape[0], state)
        if self.max_len is not None and past + input_ids.shape[1] > self.max_len:
            raise SessaExportError(f"context of {past + input_ids.shape[1]} positions exceeds the model's "
                                   f"max_len={self.max_len}")
        feed = {self.input_name: self._ort.OrtValue.ortvalue_from_numpy(
            input_ids.astype(np.int64) if kind == "tokens" else input_ids.astype(self.dtype))}
        feed.update(state)
        try:
            results = self.session.run_with_ort_values(self.output_names, feed)
        except Exception as exc:
            raise SessaExportError(f"ONNX Runtime rejected the inputs: {str(exc).splitlines()[0]}") from None
        named = dict(zip(self.output_names, results))
        new_state = {layer["past"][f]: named[layer["present"][f]] for layer in self.layout for f in STATE_FIELDS}
        return named[self.manifest["outputs"][0]].numpy(), new_state

    def _check_state(self, batch: int, state: dict) -> int:
        """P, the positions the state holds; a clear error for a state that does not fit the model."""
        if not isinstance(state, dict):
            raise SessaExportError(f"the state must be a dict of past_key_values.* tensors, got {type(state).__name__}")
        expected = [layer["past"][f] for layer in self.layout for f in STATE_FIELDS]
        missing = [name for name in expected if name not in state]
        unexpected = [name for name in state if name not in expected]
        if missing or unexpected:
            raise SessaExportError("the state does not fit the model: "
                                   + "; ".join(f"{what}: {', '.join(names)}" for what, names in
                                               (("missing", missing), ("unexpected", unexpected)) if names))
        pasts = set()
        for layer in self.layout:
            for f in STATE_FIELDS:
                name, value = layer["past"][f], state[layer["past"][f]]
                shape = list(value.shape()) if callable(getattr(value, "shape", None)) else list(np.shape(value))
                want = layer["shapes"][f]
                if len(shape) != len(want) or any(w != "past" and (batch if w == "batch" else w) != got
                                                  for w, got in zip(want, shape)):
                    raise SessaExportError(f"state tensor {name} has shape {shape}, expected "
                                           f"{[batch if w == 'batch' else w for w in want]} (P = past positions)")
                pasts.add(shape[want.index("past")])
        if len(pasts) > 1:
            raise SessaExportError(f"the state tensors hold different numbers of past positions: {sorted(pasts)}")
        return pasts.pop() if pasts else 0

    def state_arrays(self, state: dict) -> dict[str, np.ndarray]:
        return {name: value.numpy().astype(np.float32) for name, value in state.items()}


def vocab_size(runner) -> int:
    """Token vocabulary of a runner's model (for random inputs)."""
    if isinstance(runner, TorchRunner):
        return runner.config.vocab_size
    size = runner.manifest["input"].get("vocab_size")
    if size is None:
        raise SessaExportError("this model takes embeddings, not tokens: it cannot be fed random token ids")
    return size


def open_runner(path: str | Path, threads: int | None = None):
    """A runner for an exported artifact directory (ONNX or TVM) or, failing that, a checkpoint."""
    from .checkpoint import load_checkpoint

    path = Path(path)
    if not path.exists():
        raise SessaExportError(f"not found: {path}")
    if path.is_dir() and ((path / MANIFEST_NAME).exists() or not (path / "config.json").exists()):
        fmt = read_manifest(path)["format"]  # not a checkpoint directory: a clear error when the manifest is missing
        if fmt == "onnx":
            return OrtRunner(path, threads)
        if fmt == "tvm":
            from .tvm_runtime import TvmRunner

            return TvmRunner(path, threads)
        raise SessaExportError(f"{path}: unknown artifact format {fmt!r}")
    return TorchRunner(load_checkpoint(path))


__all__ = ["TorchRunner", "ForwardRunner", "OrtRunner", "open_runner", "read_manifest"]
