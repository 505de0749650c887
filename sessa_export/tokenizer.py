"""Text <-> token ids for a model: byte-level, or a Hugging Face `tokenizer.json`.

Byte-level (a text's UTF-8 bytes are its ids) is the default for a model of exactly 256 tokens
that has no tokenizer. Any other vocabulary needs a `tokenizer.json`, read with the `tokenizers`
library (the format most trained models ship), or token ids given as such (`--prompt-ids 1,2,3`,
`--text-ids FILE`). An artifact carries its tokenizer: `export` and `compile` copy it in as
`tokenizer.json` and the manifest names it under "tokenizer" (its sha256 is in "files", checked
before the file is read), so `run OUT --prompt ...` uses it without being told.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from .errors import SessaExportError

TOKENIZER_FILE = "tokenizer.json"  # its name inside an artifact
MANIFEST_KEY = "tokenizer"  # the manifest key naming it
BYTE_VOCAB = 256


class Tokenizer:
    """Encodes text to token ids and decodes ids to text: byte-level (`hf` None) or a tokenizers.Tokenizer.

    `source` names where it came from, for messages. Prompts are encoded with the tokenizer's special
    tokens (`add_special_tokens`, the library's default) and decoded without them (`skip_special_tokens`).
    """

    def __init__(self, source: str, vocab_size: int, hf=None) -> None:
        self.source, self.vocab_size, self.hf = source, vocab_size, hf

    @property
    def byte_level(self) -> bool:
        return self.hf is None

    def encode(self, text: str, option: str = "--prompt") -> list[int]:
        """The ids of `text`; refuses text that is not valid UTF-8 (bytes a shell passed through as surrogates)."""
        try:
            data = text.encode("utf-8")
        except UnicodeEncodeError:
            raise SessaExportError(f"{option} is not valid UTF-8 text") from None
        return list(data) if self.hf is None else list(self.hf.encode(text).ids)

    def decode(self, ids: Iterable[int]) -> str:
        """The text of `ids`; bytes that are not valid UTF-8 (a cut multi-byte character) become U+FFFD."""
        ids = [int(i) for i in ids]
        if self.hf is None:
            return bytes(ids).decode("utf-8", errors="replace")
        return self.hf.decode(ids)

    def streamer(self) -> Callable[[int], bytes]:
        """A function of each new id that returns the bytes to write now, for output streamed token by token
        (byte-level: the byte itself; a tokenizer: its text once the tokens make whole characters)."""
        if self.hf is None:
            return lambda token: bytes([token])
        from tokenizers.decoders import DecodeStream

        stream = DecodeStream(skip_special_tokens=True)
        return lambda token: (stream.step(self.hf, int(token)) or "").encode("utf-8")

    def check_fits(self, vocab_size: int, model: str) -> None:
        """Refuse a tokenizer with more tokens than the model's vocabulary (it would give ids the model lacks)."""
        if self.vocab_size > vocab_size:
            raise SessaExportError(f"{self.source}: the tokenizer has {self.vocab_size} tokens, more than the "
                                   f"vocab_size {vocab_size} of {model}: pass the tokenizer the model was trained with")


BYTES = Tokenizer("byte-level", BYTE_VOCAB)


def load_tokenizer(path: str | Path, option: str = "--tokenizer") -> Tokenizer:
    """Read a Hugging Face tokenizer.json; a missing or unreadable file is one line naming it."""
    path = Path(path)
    where = f"{option} {path}".strip()
    if not path.is_file():
        raise SessaExportError(f"{where}: {'is a directory' if path.is_dir() else 'no such file'}; "
                               "pass a Hugging Face tokenizer.json")
    from tokenizers import Tokenizer as HfTokenizer

    try:
        hf = HfTokenizer.from_file(str(path))
    except Exception as exc:  # the library raises a bare Exception with serde's message
        raise SessaExportError(f"{where}: not a tokenizer.json the tokenizers library reads "
                               f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    return Tokenizer(where, hf.get_vocab_size(with_added_tokens=True), hf)


def recorded_tokenizer(artifact: Path, manifest: dict) -> Path | None:
    """The tokenizer file an artifact carries (manifest "tokenizer"), checked against the sha256 its
    "files" record holds before anything reads it; None when it carries none."""
    from .artifact import MANIFEST_NAME, files_sha256, member

    if manifest.get(MANIFEST_KEY) is None:
        return None
    file = member(artifact, manifest, MANIFEST_KEY, TOKENIZER_FILE, verify=False)
    recorded = (manifest.get("files") or {}).get(file.name) if isinstance(manifest.get("files"), dict) else None
    if recorded is None or files_sha256([file]) != recorded:
        raise SessaExportError(f"{file}: its bytes differ from the sha256 {MANIFEST_NAME} records (or it records "
                               "none); re-run the export")
    return file


def tokenizer_for(path: str | Path, vocab_size: int | None, model: str, option: str = "--tokenizer") -> Tokenizer:
    """Load a tokenizer.json for a model of `vocab_size` tokens; refuse it for a model that takes embeddings
    or whose vocabulary it does not fit."""
    if vocab_size is None:
        raise SessaExportError(f"{option} {path}: {model} takes embeddings, not token ids; it has no tokenizer")
    tokenizer = load_tokenizer(path, option)
    tokenizer.check_fits(vocab_size, model)
    return tokenizer


def model_tokenizer(given: Tokenizer | None, vocab_size: int, model: str, artifact: Path | None = None,
                    manifest: dict | None = None) -> Tokenizer | None:
    """The tokenizer for a model of `vocab_size` tokens: `given` (--tokenizer), else the one the artifact
    carries, else byte-level for a 256-token vocabulary, else None (the model takes token ids only)."""
    if given is not None:
        given.check_fits(vocab_size, model)
        return given
    recorded = recorded_tokenizer(artifact, manifest) if artifact is not None and manifest else None
    if recorded is not None:
        return tokenizer_for(recorded, vocab_size, model, option="")
    return BYTES if vocab_size == BYTE_VOCAB else None


def needs_tokenizer(model: str, vocab_size: int, ids_option: str) -> SessaExportError:
    """The error for text given to a model that has no tokenizer and is not byte-level."""
    return SessaExportError(f"{model} has a vocabulary of {vocab_size} tokens and no tokenizer, so text cannot be "
                            f"turned into its token ids: pass --tokenizer tokenizer.json, or {ids_option}")


# -- token ids given as such ---------------------------------------------------------------------
def parse_ids(text: str, option: str = "--prompt-ids") -> list[int]:
    """Comma-separated token ids ("1,2,3") as a list; anything else is refused naming the option."""
    parts = [part.strip() for part in text.split(",")]
    ids = []
    for part in parts:
        try:
            ids.append(int(part))
        except ValueError:
            raise SessaExportError(f"{option}: {part!r} is not a token id; give integers separated by commas, "
                                   "e.g. 1,2,3") from None
    return ids


def read_ids(path: Path, option: str = "--text-ids") -> np.ndarray:
    """Token ids [N] from a file: one integer per line (blank lines skipped), or a .npy of integers."""
    path = Path(path)
    if not path.is_file():
        raise SessaExportError(f"{option} {path}: no such file")
    if path.suffix == ".npy":
        try:
            array = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise SessaExportError(f"{option} {path}: not a .npy file NumPy reads ({exc})") from None
        if array.ndim != 1 or array.dtype.kind not in "iu":
            raise SessaExportError(f"{option} {path}: holds a {array.dtype} array of shape {list(array.shape)}; "
                                   "it must be one row of integers (shape [N])")
        return array.astype(np.int64)
    ids = []
    try:
        lines = path.read_text().splitlines()
    except UnicodeDecodeError:
        raise SessaExportError(f"{option} {path}: not a text file of token ids (one per line) nor a .npy") from None
    for number, line in enumerate(lines, 1):
        if line.strip():
            try:
                ids.append(int(line))
            except ValueError:
                raise SessaExportError(f"{option} {path} line {number}: {line.strip()[:40]!r} is not a token id; "
                                       "the file holds one integer per line") from None
    return np.array(ids, dtype=np.int64)


def check_ids(ids: Iterable[int] | np.ndarray, vocab_size: int, where: str, model: str) -> np.ndarray:
    """Token ids as int64, refused when empty or when one lies outside the model's vocabulary 0..vocab_size-1."""
    array = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids, dtype=np.int64)
    if array.size == 0:
        raise SessaExportError(f"{where} holds no token ids")
    bad = array[(array < 0) | (array >= vocab_size)]
    if bad.size:
        raise SessaExportError(f"{where}: token id {int(bad[0])} is out of range for {model}, whose vocabulary "
                               f"has {vocab_size} tokens (ids 0..{vocab_size - 1})")
    return array


__all__ = ["TOKENIZER_FILE", "MANIFEST_KEY", "BYTE_VOCAB", "Tokenizer", "BYTES", "load_tokenizer", "recorded_tokenizer",
           "tokenizer_for", "model_tokenizer", "needs_tokenizer", "parse_ids", "read_ids", "check_ids"]
