"""The artifact contract: the directory every back end writes and every runner reads.

An artifact is a directory holding the model (ONNX `model.onnx`, or a TVM library) and its
manifest `sessa_config.json`: what a runner needs besides the model file. This module owns the
manifest's schema (versioned), writing an artifact atomically, reading and checking it, the
file hashes, and the quantization record (the same keys for ONNX and TVM artifacts).

Manifest keys (schema version 2; version 1, written before "schema_version" existed, reads the
same): format ("onnx" | "tvm"), tool, tool_version, config, input {name, kind, width,
vocab_size}, outputs, state (`StateLayout.to_manifest()`), max_len, dtype, custom_ops,
weights_sha256, source, factory, files {name: sha256}, quantization (None or the record),
tokenizer (absent, or the file name of the tokenizer.json it carries: `add_tokenizer`),
and each back end's own keys (ONNX: opset, model_file; TVM: target, capacity, library, ...).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from . import __version__
from .errors import SessaExportError
from .state import StateLayout
from .stepgraph import StepGraph

MANIFEST_NAME = "sessa_config.json"
SCHEMA_VERSION = 2
FORMATS = ("onnx", "tvm")
KIND = "an export directory"  # what export, quantize and compile may replace at -o
REQUIRED = ("format", "state", "input", "outputs")
QUANTIZATION_KEYS = ("mode", "bits", "block_size", "keep", "kept_weights", "quantized_weights", "float_weights", "method",
                     "size_bytes", "source_size_bytes", "source_export", "source_sha256")


# -- writing ------------------------------------------------------------------------------------
WRITTEN = ("model.onnx", "model.onnx.data", "model.so", "model.a", "model.tar", "model.cu", "model.metal",
           "model.cl")  # what the writers put beside a manifest (an artifact that records no "files")
WRITER = ".sessa-writer"  # inside a temporary directory: the pid of the process writing it


def check_replaceable(out: Path, marker: str = MANIFEST_NAME, kind: str = KIND, written: tuple = WRITTEN,
                      inputs: tuple = ()) -> None:
    """Refuse `out` unless it is nothing, an empty directory, or `kind` holding `marker` and only the
    files its writer wrote (the manifest's "files", else `written`); refuse an `out` that is, contains
    or lies inside one of `inputs`.

    Writers call it up front to fail before their work; `atomic_directory` calls it again just
    before it replaces `out`, so a file put there meanwhile is never deleted."""
    out = Path(out)
    for given in (Path(p) for p in inputs if p is not None):
        o, i = out.resolve(), given.resolve()
        if o == i or o in i.parents or i in o.parents:
            raise SessaExportError(f"-o {out} is, contains or lies inside the input {given}: "
                                   "choose an output outside it")
    if not out.exists() and not out.is_symlink():
        return
    if not out.is_dir() or out.is_symlink() or (any(out.iterdir()) and not (out / marker).is_file()):
        raise SessaExportError(f"{out} exists and is not {kind} (no {marker}); "
                               "refusing to replace it: choose another -o or remove it first")
    allowed = {marker, *_recorded_files(out / marker, written)}
    foreign = sorted(p.name for p in out.iterdir() if p.name not in allowed or not p.is_file() or p.is_symlink())
    if foreign:
        raise SessaExportError(f"{out} holds {', '.join(foreign[:3])}{' ...' if len(foreign) > 3 else ''}, which "
                               f"sessa-export did not write; refusing to replace it: move them or choose another -o")


def _recorded_files(marker: Path, written: tuple) -> tuple:
    """The files an earlier writer recorded in its manifest, or `written` when it recorded none."""
    try:
        files = json.loads(marker.read_text()).get("files")
    except (OSError, ValueError, AttributeError):
        files = None
    return tuple(files) if isinstance(files, dict) else written


@contextmanager
def atomic_directory(out: str | Path, marker: str = MANIFEST_NAME, kind: str = KIND, written: tuple = WRITTEN,
                     inputs: tuple = ()) -> Iterator[Path]:
    """Yield a temporary directory beside `out`; on success it replaces `out`, on failure it is removed.

    `out` is checked by `check_replaceable` before any work and again just before it is replaced.
    Temporary directories that a killed writer left beside `out` are removed first. An OSError
    (unwritable place, full disk) becomes one line naming `out`.
    """
    out = Path(out)
    check_replaceable(out, marker, kind, written, inputs)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale(out)
        tmp = _temporary(out, "")
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes it 0700: give the result the usual permissions
    except OSError as exc:
        raise _write_error(out, exc) from None
    try:
        yield tmp
        check_replaceable(out, marker, kind, written, inputs)
        (tmp / WRITER).unlink()
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _write_error(out, exc) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def scratch_directory(out: Path) -> Iterator[Path]:
    """A work directory beside `out` for a writer's intermediate files (a compiler's), removed at the end
    and, if the writer is killed, by the next writer of `out`."""
    work = _temporary(Path(out), "work.")
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _temporary(out: Path, kind: str) -> Path:
    """A new hidden directory `.{out.name}.{kind}XXXX` beside `out`, marked with this process's pid."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.{kind}", dir=out.parent))
    (tmp / WRITER).write_text(str(os.getpid()))
    return tmp


def remove_stale(out: Path) -> None:
    """Remove the temporary directories beside `out` whose writer process is gone (killed mid-write)."""
    for tmp in out.parent.glob(f".{out.name}.*"):
        try:
            pid = int((tmp / WRITER).read_text())
        except (OSError, ValueError):
            continue  # not ours, or being created right now
        if not _alive(pid):
            shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _write_error(out: Path, exc: OSError) -> SessaExportError:
    return SessaExportError(f"cannot write {out}: {exc.strerror or exc}"
                            f"{f' ({exc.filename})' if exc.filename else ''}; nothing was written")


def files_sha256(paths: list[Path]) -> str:
    """One sha256 over the files' bytes in order, read in 1 MiB blocks (one file: its own sha256)."""
    digest = hashlib.sha256()
    for path in paths:
        with path.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def weights_hash(graph: StepGraph) -> str:
    """sha256 over every weight the graph uses, in graph order: ties an artifact to its checkpoint."""
    digest = hashlib.sha256()
    for node in graph.nodes:
        if node.module is not None:
            for name, tensor in node.module.state_dict().items():
                digest.update(f"{node.path}.{name}".encode())
                digest.update(tensor.detach().float().contiguous().numpy().tobytes())
    return digest.hexdigest()


def new_manifest(graph: StepGraph, fmt: str, layout: StateLayout | None = None, **fields) -> dict:
    """The keys every artifact has, from the step graph and its state `layout` (default: the graph's,
    growing), plus the back end's `fields`."""
    layout = layout or graph.state
    return {
        "schema_version": SCHEMA_VERSION,
        "format": fmt,
        "tool": "sessa-export", "tool_version": __version__,
        "config": graph.config.to_dict() if graph.config else None,
        "input": {"name": graph.input_name, "kind": graph.input_kind, "width": graph.input_width,
                  "vocab_size": graph.vocab_size},
        "outputs": list(graph.outputs),
        "state": layout.to_manifest(),
        "state_contract": layout.contract_manifest(),
        "max_len": graph.max_len,
        "dtype": "float32",
        "custom_ops": ["ai.sessa.FeedbackAttention"],
        "weights_sha256": weights_hash(graph),
        "quantization": None,
        **fields,
    }


def write_manifest(directory: Path, manifest: dict) -> dict:
    """Record the sha256 of every file in `directory` and write the manifest beside them."""
    files = {p.name: files_sha256([p]) for p in sorted(directory.iterdir())
             if p.is_file() and p.name not in (MANIFEST_NAME, WRITER)}
    manifest = {**manifest, "files": files}
    (directory / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def add_tokenizer(directory: Path, manifest: dict, tokenizer: str | Path | None) -> dict:
    """Copy a tokenizer.json into the artifact being written and name it in the manifest ("tokenizer");
    `write_manifest` then records its sha256 with the other files. None: the manifest names none."""
    from .tokenizer import MANIFEST_KEY, TOKENIZER_FILE, tokenizer_for

    manifest = {k: v for k, v in manifest.items() if k != MANIFEST_KEY}  # a copied manifest's is not this one's
    if tokenizer is None:
        return manifest
    tokenizer_for(tokenizer, manifest["input"].get("vocab_size"), "the model")
    shutil.copyfile(tokenizer, directory / TOKENIZER_FILE)
    return {**manifest, MANIFEST_KEY: TOKENIZER_FILE}


def quantization_record(**fields) -> dict:
    """The manifest's "quantization" object: exactly QUANTIZATION_KEYS, whatever the back end."""
    if set(fields) != set(QUANTIZATION_KEYS):
        raise ValueError(f"quantization record keys {sorted(fields)} != {sorted(QUANTIZATION_KEYS)}")
    return {key: fields[key] for key in QUANTIZATION_KEYS}


# -- reading ------------------------------------------------------------------------------------
def is_artifact(path: Path) -> bool:
    return path.is_dir() and (path / MANIFEST_NAME).is_file()


def read_manifest(path: Path) -> dict:
    """The artifact directory's manifest, checked: a clear error when it is missing, broken or newer."""
    path = Path(path)
    file = path / MANIFEST_NAME
    if not file.is_file():
        raise SessaExportError(f"{path}: no {MANIFEST_NAME}; is this a directory written by "
                               "`sessa-export export` or `sessa-export compile`?")
    try:
        manifest = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SessaExportError(f"{file}: not valid JSON ({exc}); re-run the export") from None
    if not isinstance(manifest, dict):
        raise SessaExportError(f"{file}: not a JSON object; re-run the export")
    for key in REQUIRED:
        if key not in manifest:
            raise SessaExportError(f"{file}: missing key {key!r}; re-run the export")
    version = manifest.get("schema_version", 1)
    if type(version) is not int or version > SCHEMA_VERSION:
        raise SessaExportError(f"{file}: schema_version {version!r} is newer than this sessa-export reads "
                               f"({SCHEMA_VERSION}); upgrade sessa-export")
    if manifest["format"] not in FORMATS:
        raise SessaExportError(f"{path}: unknown artifact format {manifest['format']!r}")
    for key in ("max_len", "capacity"):
        value = manifest.get(key)
        if value is not None and (type(value) is not int or value < 1):
            raise SessaExportError(f"{file}: {key!r} must be a positive integer, got {value!r}; re-run the export")
    if manifest["format"] == "tvm" and "capacity" not in manifest:
        raise SessaExportError(f"{file}: a TVM artifact needs its \"capacity\"; re-run `sessa-export compile`")
    quant = manifest.get("quantization")
    if quant is not None and not isinstance(quant, dict):
        raise SessaExportError(f"{file}: \"quantization\" must be an object, got {type(quant).__name__}; "
                               "re-run the quantization")
    return manifest


def state_layout(manifest: dict) -> StateLayout:
    """The manifest's state contract (a contract written before it recorded the state's dtype: the model's)."""
    return StateLayout.from_manifest(manifest["state"], manifest.get("state_contract"),
                                     dtype=manifest.get("dtype", "float32"))


def member(path: Path, manifest: dict, key: str, default: str, verify: bool = True) -> Path:
    """A file the manifest names (`model_file`, `library`), inside the artifact directory only, and
    (`verify`) every recorded file checked against its sha256 (`verify_files`) before anything loads it."""
    name = manifest.get(key, default)
    if not isinstance(name, str) or not name or Path(name).name != name or name in (".", ".."):
        raise SessaExportError(f"{path / MANIFEST_NAME}: {key!r} must name a file inside {path}, got {name!r}")
    file = path / name
    if not file.is_file():
        raise SessaExportError(f"{path}: {name} is missing; re-run the export")
    if verify:
        verify_files(path, manifest)
    return file


def verify_files(path: Path, manifest: dict) -> None:
    """Every file the manifest records (`files`: name -> sha256) is there, inside `path`, with those bytes:
    a truncated or replaced library is refused instead of crashing the process that loads it."""
    files = manifest.get("files", {})
    if not isinstance(files, dict):
        raise SessaExportError(f"{path / MANIFEST_NAME}: \"files\" must be an object; re-run the export")
    for name, digest in files.items():
        file = path / name
        if Path(name).name != name or not file.is_file():
            raise SessaExportError(f"{path}: {name!r}, recorded in {MANIFEST_NAME}, is missing; re-run the export")
        if files_sha256([file]) != digest:
            raise SessaExportError(f"{file}: its bytes differ from the sha256 {MANIFEST_NAME} records (truncated or "
                                   "changed since it was written); re-run the export")


__all__ = ["MANIFEST_NAME", "SCHEMA_VERSION", "KIND", "atomic_directory", "scratch_directory", "check_replaceable", "files_sha256",
           "weights_hash", "new_manifest", "write_manifest", "add_tokenizer", "quantization_record", "read_manifest",
           "state_layout", "member", "verify_files", "is_artifact"]
