"""Where a model comes from: a checkpoint, a custom module's factory, or what an artifact records.

The commands that load a model (export, compile, validate) go through here, so an artifact's
recorded source and factory are resolved, and its weights hash checked, in one place.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from torch import nn

from .artifact import is_artifact, read_manifest, weights_hash
from .checkpoint import load_checkpoint, read_state_dict
from .errors import SessaExportError
from .runtime import ForwardRunner, TorchRunner
from .tracer import trace


def load_factory_model(spec: str, weights: str | Path | None) -> nn.Module:
    """Build `package.module:factory()` and load weights (safetensors or torch state_dict) into it."""
    module_name, _, factory_name = spec.partition(":")
    if not module_name or not factory_name:
        raise SessaExportError(f"--model must look like package.module:factory, got {spec!r}")
    try:
        factory = getattr(importlib.import_module(module_name), factory_name)
    except (ImportError, AttributeError) as exc:
        raise SessaExportError(f"cannot import {spec}: {exc}") from None
    model = factory()
    if not isinstance(model, nn.Module):
        raise SessaExportError(f"{spec}() returned {type(model).__name__}, not a torch.nn.Module")
    if weights is not None:
        state_dict, _ = read_state_dict(Path(weights))
        try:
            model.load_state_dict(state_dict)
        except RuntimeError as exc:
            raise SessaExportError(f"{weights} does not fit {spec}(): {exc}") from None
    return model.eval()


def load_model(checkpoint: Path | None, config: Path | None = None, model: str | None = None) -> nn.Module:
    """The source model: a SessaLM checkpoint, or `--model package.module:factory` with weights."""
    if model is not None:
        return load_factory_model(model, checkpoint)
    if checkpoint is None:
        raise SessaExportError("give a checkpoint (or --model package.module:factory with weights)")
    return load_checkpoint(checkpoint, config)


def refuse_recorded_factory(artifact: Path, manifest: dict, command: str) -> None:
    """An artifact names code (a custom module's factory) that only the user may choose to import."""
    factory = manifest.get("factory")
    raise SessaExportError(f"{artifact} was exported from the custom module {factory!r}; pass --model {factory} "
                           f"to {command} it (sessa-export imports no code that an artifact names)")


def compile_source(path: Path, model: str | None) -> Path:
    """A checkpoint as given, or the source checkpoint an export records (with `--model` when it
    records a custom module's factory)."""
    if not is_artifact(path):
        return path
    manifest = read_manifest(path)
    if manifest.get("quantization"):
        raise SessaExportError(f"{path} is a quantized export; compile the float checkpoint it came from")
    if not manifest.get("source"):
        raise SessaExportError(f"{path} records no source checkpoint: pass the checkpoint itself")
    checkpoint = Path(manifest["source"])
    if not checkpoint.exists():
        raise SessaExportError(f"{path} was exported from {checkpoint}, which no longer exists: "
                               "pass the checkpoint itself")
    if manifest.get("factory") and model is None:
        refuse_recorded_factory(path, manifest, "compile")
    return checkpoint


def reference_runner(artifact: Path, manifest: dict, checkpoint: Path | None, model: str | None):
    """The PyTorch reference an artifact is validated against, with the same weights as it was made from.

    The checkpoint defaults to what the artifact records; a custom module's factory is imported only
    when the user names it (`model`); its reference is its own forward over each prefix (ForwardRunner).
    """
    source = checkpoint or (Path(manifest["source"]) if manifest.get("source") else None)
    if model is None and manifest.get("factory"):
        refuse_recorded_factory(artifact, manifest, "validate")
    factory = model
    if factory is not None:
        if manifest["input"]["kind"] != "tokens":
            raise SessaExportError(f"{artifact} takes embeddings; validate compares models that take token ids")
        reference = ForwardRunner(load_factory_model(factory, source), manifest["input"].get("vocab_size"))
    elif source is None:
        raise SessaExportError(f"{artifact} records no source checkpoint: pass --checkpoint CKPT")
    else:
        reference = TorchRunner(load_checkpoint(source))
    if manifest.get("weights_sha256") and weights_hash(trace(reference.model)) != manifest["weights_sha256"]:
        raise SessaExportError(f"{source or factory} is not what this export was made from (weights hash differs)")
    return reference


__all__ = ["load_factory_model", "load_model", "compile_source", "reference_runner"]
