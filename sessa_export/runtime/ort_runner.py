"""ONNX Runtime on an export directory: the state contract's growing tensors, kept in ORT's buffers."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..artifact import member, read_manifest, state_layout
from ..errors import SessaExportError


class OrtRunner:
    """ONNX Runtime on an exported directory; the state stays in ORT-owned buffers between steps."""

    name = "onnxruntime"

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        import onnxruntime as ort

        path = Path(path)
        self.manifest = read_manifest(path)
        model_file = member(path, self.manifest, "model_file", "model.onnx")
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
        self.input_kind = self.manifest["input"]["kind"]
        self.vocab_size = self.manifest["input"].get("vocab_size")
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.layout = state_layout(self.manifest)
        self.present_of = self.layout.present_of()
        self.dtype = np.float16 if self.manifest.get("dtype") == "float16" else np.float32
        self.max_len = self.manifest.get("max_len")

    def empty_state(self, batch: int) -> dict:
        return {name: self._ort.OrtValue.ortvalue_from_numpy(array)
                for name, array in self.layout.zeros(batch, 0, self.dtype).items()}

    def step(self, input_ids: np.ndarray, state: dict) -> tuple[np.ndarray, dict]:
        input_ids = np.asarray(input_ids)
        if self.input_kind == "tokens" and (input_ids.ndim != 2 or input_ids.dtype.kind not in "iu"):
            raise SessaExportError(f"{self.input_name} must be integer token ids [batch, sequence], "
                                   f"got {input_ids.dtype} {list(input_ids.shape)}")
        if not isinstance(state, dict):
            raise SessaExportError(f"the state must be a dict of past_key_values.* tensors, got {type(state).__name__}")
        shapes = {name: value.shape() if callable(getattr(value, "shape", None)) else np.shape(value)
                  for name, value in state.items()}
        past = self.layout.positions_held(input_ids.shape[0], shapes)
        if self.max_len is not None and past + input_ids.shape[1] > self.max_len:
            raise SessaExportError(f"context of {past + input_ids.shape[1]} positions exceeds the model's "
                                   f"max_len={self.max_len}")
        feed = {self.input_name: self._ort.OrtValue.ortvalue_from_numpy(
            input_ids.astype(np.int64) if self.input_kind == "tokens" else input_ids.astype(self.dtype))}
        feed.update(state)
        try:
            results = self.session.run_with_ort_values(self.output_names, feed)
        except Exception as exc:
            raise SessaExportError(f"ONNX Runtime rejected the inputs: {str(exc).splitlines()[0]}") from None
        named = dict(zip(self.output_names, results))
        new_state = {past_name: named[present] for present, past_name in self.present_of.items()}
        return named[self.manifest["outputs"][0]].numpy(), new_state

    def state_arrays(self, state: dict) -> dict[str, np.ndarray]:
        return {name: value.numpy().astype(np.float32) for name, value in state.items()}
