"""Where a model comes from: a checkpoint, a custom module's factory, or what an artifact records.

The commands that load a model (export, compile, validate) go through here, so an artifact's
recorded source and factory are resolved, and its weights hash checked, in one place.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

from torch import nn

from .artifact import is_artifact, read_manifest, weights_hash
from .checkpoint import load_checkpoint, read_state_dict
from .errors import SessaExportError
from .runtime import StepGraphRunner, TorchRunner
from .tracer import trace


def import_factory(spec: str) -> Callable[[], object]:
    """The factory `spec` names: `path/to/file.py:factory` (imported from that file) or
    `package.module:factory` (imported from the current directory or sys.path); no PYTHONPATH needed.

    Only called with a spec the user gave on the command line, never one an artifact records.
    """
    target, _, name = spec.rpartition(":")
    if not target or not name.isidentifier():
        raise SessaExportError(f"--model must look like path/to/file.py:factory or package.module:factory, "
                               f"got {spec!r}")
    if target.endswith(".py") or "/" in target or os.sep in target:
        path = Path(target).expanduser()
        if not path.is_file():
            raise SessaExportError(f"--model {spec}: no such file {path}")
        module_name = f"sessa_user_model_{hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]}"
        module = sys.modules.get(module_name)
        if module is None:
            loader = importlib.util.spec_from_file_location(module_name, path)
            module = importlib.util.module_from_spec(loader)
            sys.modules[module_name] = module
            with _on_sys_path(path.resolve().parent):  # the file's own imports of its neighbours
                try:
                    loader.loader.exec_module(module)
                except Exception as exc:  # the user's code may raise anything
                    del sys.modules[module_name]
                    raise SessaExportError(f"--model {spec}: importing {path} failed: "
                                           f"{type(exc).__name__}: {exc}") from None
        where = str(path)
    else:
        with _on_sys_path(Path.cwd()):
            try:
                module = importlib.import_module(target)
            except ImportError as exc:
                raise SessaExportError(f"cannot import {spec}: {exc}") from None
            except Exception as exc:  # the user's code may raise anything
                raise SessaExportError(f"--model {spec}: importing {target} failed: "
                                       f"{type(exc).__name__}: {exc}") from None
        where = target
    factory = getattr(module, name, None)
    if not callable(factory):
        defined = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_")
                         and getattr(v, "__module__", None) == module.__name__)
        raise SessaExportError(f"--model {spec}: {where} defines no factory {name!r}"
                               + (f"; it defines {', '.join(defined)}" if defined else ""))
    return factory


@contextmanager
def _on_sys_path(directory: Path):
    """`directory` first on sys.path for the duration of an import."""
    entry = str(directory)
    sys.path.insert(0, entry)
    try:
        yield
    finally:
        sys.path.remove(entry)


def load_factory_model(spec: str, weights: str | Path | None) -> nn.Module:
    """Build the module of `--model spec` and load weights (safetensors or torch state_dict) into it."""
    factory = import_factory(spec)
    try:
        model = factory()
    except Exception as exc:  # the user's code may raise anything
        raise SessaExportError(f"--model {spec}: {spec.rpartition(':')[2]}() raised "
                               f"{type(exc).__name__}: {exc}") from None
    if not isinstance(model, nn.Module):
        raise SessaExportError(f"--model {spec}: {spec.rpartition(':')[2]}() returned {type(model).__name__}, "
                               "not a torch.nn.Module")
    if weights is not None:
        state_dict, _ = read_state_dict(Path(weights))
        try:
            model.load_state_dict(state_dict)
        except RuntimeError as exc:
            raise SessaExportError(f"{weights} does not fit {spec}(): {' '.join(str(exc).split())}") from None
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
    when the user names it (`model`); its reference is its step graph run step by step with the
    reference mixers (StepGraphRunner), checked once against the module's own forward.
    """
    source = checkpoint or (Path(manifest["source"]) if manifest.get("source") else None)
    if model is None and manifest.get("factory"):
        refuse_recorded_factory(artifact, manifest, "validate")
    if model is not None:
        if manifest["input"]["kind"] != "tokens":
            raise SessaExportError(f"{artifact} takes embeddings; validate compares models that take token ids")
        module = load_factory_model(model, source)
        graph = trace(module)
        reference = StepGraphRunner(module, graph)
    elif source is None:
        raise SessaExportError(f"{artifact} records no source checkpoint: pass --checkpoint CKPT")
    else:
        reference = TorchRunner(load_checkpoint(source))
        graph = trace(reference.model)
    if manifest.get("weights_sha256") and weights_hash(graph) != manifest["weights_sha256"]:
        raise SessaExportError(f"{source or model} is not what this export was made from (weights hash differs)")
    if model is not None:
        reference.check_against_forward(f"--model {model}")
    return reference


__all__ = ["import_factory", "load_factory_model", "load_model", "compile_source", "reference_runner"]
