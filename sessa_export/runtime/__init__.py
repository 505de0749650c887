"""Runners: what runs a step graph artifact, behind one interface (`generate.StepRunner`).

Every runner has `name`, `layout` (the state contract, sessa_export/state.py), `max_len`,
`vocab_size`, `empty_state(batch)`, `step(input_ids, state) -> (logits, state)` and
`state_arrays(state)`, which names each state tensor `past_key_values.{i}.{field}`.

- torch_runner.py: the PyTorch references (`TorchRunner`, `StepGraphRunner`);
- ort_runner.py: ONNX Runtime on an export (`OrtRunner`);
- tvm_runner.py: the TVM runtime on a CPU library (`TvmRunner`).
- cache_writes.py, buffer_pool.py: what the two in-place runners share (which states stay valid; the
  memory of dropped states handed to the next one).

`open_runner` picks one for a path: an ONNX export, a TVM artifact of a target the table in
targets/ says runs here, or a checkpoint.
"""

from __future__ import annotations

from pathlib import Path

from ..artifact import MANIFEST_NAME, read_manifest
from ..config import available_cores
from ..errors import SessaExportError
from .ort_runner import OrtRunner
from .torch_runner import StepGraphRunner, TorchRunner


def vocab_size(runner) -> int:
    """Token vocabulary of a runner's model (for random inputs)."""
    if runner.vocab_size is None:
        raise SessaExportError("this model takes embeddings, not tokens: it cannot be fed random token ids")
    return runner.vocab_size


def open_runner(path: str | Path, threads: int | None = None, mobile: bool = False):
    """A runner for an exported artifact directory (ONNX or TVM; `mobile`: an export's ORT Mobile models,
    to_onnx/mobile.py) or, failing that, a checkpoint."""
    from ..checkpoint import load_checkpoint

    path = Path(path)
    if not path.exists():
        raise SessaExportError(f"not found: {path}")
    if mobile:
        from ..to_onnx.mobile import MobileRunner

        return MobileRunner(path, threads)
    if path.is_dir() and ((path / MANIFEST_NAME).exists() or not (path / "config.json").exists()):
        manifest = read_manifest(path)  # not a checkpoint directory: a clear error when the manifest is missing
        if manifest["format"] == "onnx":
            return OrtRunner(path, threads)
        from .tvm_runner import TvmRunner

        return TvmRunner(path, threads)
    return TorchRunner(load_checkpoint(path))


__all__ = ["TorchRunner", "StepGraphRunner", "OrtRunner", "open_runner", "available_cores", "vocab_size"]
