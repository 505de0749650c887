"""Byte-level text data for the bundled tiny model: the Python standard library's own sources.

Corpus: every `.py` file under the running interpreter's stdlib directory
(`sysconfig.get_paths()["stdlib"]`), top level and subpackages, minus test suites,
idlelib, installed packages and generated or table-like modules (see `EXCLUDED_DIRS`,
`EXCLUDED_FILES`). It needs no download and is real, varied Python.

Split rule (deterministic, independent of Python version and file system order): a file
is held out when the first 4 bytes of SHA-256 of its POSIX path relative to the stdlib
directory, read as a big-endian integer, are divisible by `HELDOUT_MODULUS` (about 1 file
in 10); every other file is training data. Because the stdlib differs between Python
versions, the evaluation bytes are not recomputed at test time: `build_heldout()` writes a
fixed selection of held-out files to `assets/heldout.txt`, which ships with the package.

Every file enters a byte stream as `FILE_HEADER` (naming its path) followed by its bytes,
ending in a newline, in both the training stream and the held-out file.
"""

from __future__ import annotations

import hashlib
import sysconfig
from pathlib import Path
from typing import Iterable

PACKAGE_DIR: Path = Path(__file__).resolve().parent
ASSETS_DIR: Path = PACKAGE_DIR / "assets"
BUNDLED_MODEL: Path = ASSETS_DIR / "tiny"
HELDOUT_PATH: Path = ASSETS_DIR / "heldout.txt"

VOCAB_SIZE = 256
HELDOUT_MODULUS = 10
FILE_HEADER = "# ==== {path} ====\n"
# The held-out asset: held-out files in hash order, each at most HELDOUT_MAX_FILE bytes,
# appended while the total is below HELDOUT_TARGET (so it ends between 96 and ~121 KiB).
HELDOUT_TARGET = 96 * 1024
HELDOUT_MAX_FILE = 24 * 1024

EXCLUDED_DIRS = frozenset({
    "test", "tests", "idle_test", "idlelib", "site-packages", "dist-packages", "__pycache__",
    "lib-dynload", "ensurepip", "pydoc_data", "encodings",
})
EXCLUDED_FILE_PREFIXES = ("_sysconfigdata",)


def stdlib_dir() -> Path:
    """The running interpreter's stdlib directory, where the corpus comes from."""
    return Path(sysconfig.get_paths()["stdlib"]).resolve()


def _path_hash(rel: str) -> bytes:
    """SHA-256 of a relative POSIX path: the stable key for splitting and ordering files."""
    return hashlib.sha256(rel.encode("utf-8")).digest()


def is_heldout(rel: str) -> bool:
    """Whether the file at stdlib-relative POSIX path `rel` belongs to the held-out split."""
    return int.from_bytes(_path_hash(rel)[:4], "big") % HELDOUT_MODULUS == 0


def _excluded(rel: Path) -> bool:
    """Test suites, IDLE, installed packages, build config, codec tables and generated data."""
    parts = rel.parts
    if any(p in EXCLUDED_DIRS or p.startswith("config-") for p in parts[:-1]):
        return True
    return parts[-1].startswith(EXCLUDED_FILE_PREFIXES)


def corpus_files(root: Path | None = None) -> list[str]:
    """All corpus files as sorted stdlib-relative POSIX paths, so every listing is reproducible."""
    root = stdlib_dir() if root is None else Path(root)
    files = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if path.is_file() and not _excluded(rel):
            files.append(rel.as_posix())
    return sorted(files)


def training_files(root: Path | None = None) -> list[str]:
    """The training split: corpus files (relative POSIX paths, sorted) that are not held out."""
    return [rel for rel in corpus_files(root) if not is_heldout(rel)]


def heldout_files(root: Path | None = None) -> list[str]:
    """The held-out split in hash order, the order `build_heldout` draws from."""
    return sorted((rel for rel in corpus_files(root) if is_heldout(rel)), key=_path_hash)


def file_record(rel: str, root: Path | None = None) -> bytes:
    """One file as it appears in a stream: header line naming it, then its bytes ending in a newline."""
    root = stdlib_dir() if root is None else Path(root)
    body = (root / rel).read_bytes()
    if not body.endswith(b"\n"):
        body += b"\n"
    return FILE_HEADER.format(path=rel).encode("utf-8") + body


def concat_files(files: Iterable[str], root: Path | None = None) -> bytes:
    """The byte stream of several files, each as `file_record` writes it."""
    return b"".join(file_record(rel, root) for rel in files)


def training_bytes(root: Path | None = None) -> bytes:
    """The whole training split as one byte stream, for sampling training windows."""
    return concat_files(training_files(root), root)


def build_heldout(path: Path | None = HELDOUT_PATH, root: Path | None = None) -> bytes:
    """Select held-out files (hash order, each <= HELDOUT_MAX_FILE) up to HELDOUT_TARGET bytes; write them to `path`."""
    root = stdlib_dir() if root is None else Path(root)
    chosen: list[bytes] = []
    total = 0
    for rel in heldout_files(root):
        if total >= HELDOUT_TARGET:
            break
        record = file_record(rel, root)
        if len(record) > HELDOUT_MAX_FILE:
            continue
        chosen.append(record)
        total += len(record)
    data = b"".join(chosen)
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return data


def heldout_bytes() -> bytes:
    """The shipped held-out evaluation bytes (same on every Python version)."""
    return HELDOUT_PATH.read_bytes()


def encode(text: str | bytes) -> list[int]:
    """Token ids of a text for a byte-level model: its UTF-8 bytes, vocab 256."""
    data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    return list(data)


def decode(ids: Iterable[int]) -> str:
    """Text of byte token ids; invalid UTF-8 (e.g. a cut multi-byte char) becomes U+FFFD."""
    return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


__all__ = [
    "BUNDLED_MODEL", "HELDOUT_PATH", "VOCAB_SIZE", "FILE_HEADER", "stdlib_dir", "is_heldout",
    "corpus_files", "training_files", "heldout_files", "file_record", "concat_files",
    "training_bytes", "build_heldout", "heldout_bytes", "encode", "decode",
]
