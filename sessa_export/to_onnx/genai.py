"""`export --genai`: an export folder ONNX Runtime GenAI (`onnxruntime_genai.Model`) loads as it is.

The model is the in-place step graph under the "genai" state contract (sessa_export/state.py):
GenAI sees a decoder of 2·L KV layers (each Sessa layer's key / value, then its feedback_key /
feedback_state as one more layer of one head of width d_model), reads every layer's heads and
width from the input shapes, and with `past_present_share_buffer` binds one buffer of
`search.max_length` positions as both past and present of each: the step writes its rows in
place. Beside it go `genai_config.json` and a `tokenizer.json`: the export's own (--tokenizer) or,
for a byte-level model, one whose every id is its byte (the GPT-2 byte-to-unicode alphabet, a
ByteLevel pre-tokenizer and decoder, no merges); a model with neither takes token ids only.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import SessaExportError
from ..state import ATTENTION_MASK, StateLayout
from ..stepgraph import StepGraph

CONFIG_FILE = "genai_config.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
MANIFEST_KEYS = ("genai_config", "genai_tokenizer_config")  # the manifest keys naming the files written here
TOKENIZER_CONFIG = {"tokenizer_class": "GPT2Tokenizer", "add_bos_token": False, "add_prefix_space": False,
                    "clean_up_tokenization_spaces": False}
DEFAULT_MAX_LENGTH = 4096  # GenAI preallocates every buffer at this length when the model sets no max_len


def genai_config(graph: StepGraph, layout: StateLayout, model_file: str, max_length: int) -> dict:
    """The genai_config.json of an export of `graph` under the genai contract `layout`."""
    first = layout.layers[0]
    return {
        "model": {
            "type": "decoder",
            "vocab_size": graph.vocab_size,
            "context_length": max_length,
            "bos_token_id": 0, "pad_token_id": 0,
            "eos_token_id": [],  # a Sessa LM here has no end token: generation runs to max_length
            "decoder": {
                "filename": model_file,
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "head_size": first.head_dim, "hidden_size": first.d_model,
                "num_attention_heads": first.n_heads, "num_key_value_heads": first.n_kv_heads,
                "num_hidden_layers": 2 * len(layout),  # the feedback fields are KV layers L..2L-1
                "inputs": {"input_ids": graph.input_name, "attention_mask": ATTENTION_MASK,
                           "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": next(iter(graph.outputs)), "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
            },
        },
        "search": {"max_length": max_length, "min_length": 0, "do_sample": False, "num_beams": 1,
                   "num_return_sequences": 1, "past_present_share_buffer": True, "top_k": 1, "top_p": 1.0,
                   "temperature": 1.0, "repetition_penalty": 1.0},
    }


def byte_level_tokenizer(path: Path) -> None:
    """Write a tokenizer.json whose ids are bytes: each byte its own token, decoded back to the bytes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()  # the 256 characters GPT-2's byte-level BPE maps bytes to
    byte_of = {chr(point): byte for byte, point in enumerate(_gpt2_byte_chars())}
    if sorted(byte_of) != sorted(alphabet):
        raise SessaExportError("the tokenizers library's byte-level alphabet is not GPT-2's; cannot write a "
                               "byte-level tokenizer.json: pass --tokenizer")
    tokenizer = Tokenizer(models.BPE(vocab=byte_of, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.save(str(path))


def _gpt2_byte_chars() -> list[int]:
    """The code point GPT-2's byte-level alphabet gives each byte 0..255, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = [], 0
    for byte in range(256):
        if byte in printable:
            chars.append(byte)
        else:
            chars.append(256 + extra)
            extra += 1
    return chars


def write_genai_files(directory: Path, graph: StepGraph, layout: StateLayout, model_file: str,
                      tokenizer_file: str | None) -> dict:
    """genai_config.json in `directory`, a byte-level tokenizer.json for a 256-token model without one, and
    tokenizer_config.json beside a tokenizer (without any, GenAI takes token ids: `append_tokens`); the
    manifest keys that name them."""
    if graph.input_kind != "tokens" or graph.vocab_size is None:
        raise SessaExportError("--genai needs a model that takes token ids (GenAI feeds input_ids)")
    max_length = graph.max_len or DEFAULT_MAX_LENGTH
    (directory / CONFIG_FILE).write_text(json.dumps(genai_config(graph, layout, model_file, max_length), indent=2)
                                         + "\n")
    keys = {MANIFEST_KEYS[0]: CONFIG_FILE}
    if tokenizer_file is None and graph.vocab_size == 256:
        from ..tokenizer import MANIFEST_KEY, TOKENIZER_FILE

        byte_level_tokenizer(directory / TOKENIZER_FILE)
        keys[MANIFEST_KEY] = tokenizer_file = TOKENIZER_FILE
    if tokenizer_file is not None:  # onnxruntime-extensions, GenAI's tokenizer, reads the class from here
        (directory / TOKENIZER_CONFIG_FILE).write_text(json.dumps(TOKENIZER_CONFIG, indent=2) + "\n")
        keys[MANIFEST_KEYS[1]] = TOKENIZER_CONFIG_FILE
    return keys


__all__ = ["CONFIG_FILE", "MANIFEST_KEYS", "genai_config", "byte_level_tokenizer", "write_genai_files"]
