"""Checkpoints: load a SessaLM from a directory, a safetensors file or a torch file; save one atomically.

Accepted forms:
- a directory with `config.json` and `model.safetensors` (what `save_checkpoint` writes);
- a `.safetensors` file, with `--config FILE` or a `config.json` beside it;
- a torch file (`.pt`/`.bin`) holding `{"config": ..., "state_dict": ...}`, or a bare state_dict with `--config`.
Torch files load with `weights_only=True`: a checkpoint never runs code.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .artifact import atomic_directory, check_replaceable
from .config import SessaConfig
from .errors import SessaExportError
from .model import SessaLM

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CHECKPOINT_KIND = "a checkpoint directory"
# Derived buffers the reference code may store: accepted, never required.
OPTIONAL_SUFFIXES = ("mixer.rope_inv_freq", "mixer.causal_mask_f_full", "mixer.causal_mask_fb_full")


def _is_safetensors(path: Path) -> bool:
    with path.open("rb") as fh:
        head = fh.read(9)
    return len(head) == 9 and int.from_bytes(head[:8], "little") < 100_000_000 and head[8:9] == b"{"


def _is_torch(path: Path) -> bool:
    with path.open("rb") as fh:
        head = fh.read(4)
    return head[:2] == b"PK" or head[:1] == b"\x80"  # zip archive or legacy pickle


def read_state_dict(path: Path) -> tuple[dict[str, torch.Tensor], dict | None]:
    """Tensors and, for torch files that carry one, the config dict."""
    if not path.is_file():
        raise SessaExportError(f"checkpoint not found: {path}")
    if _is_safetensors(path):
        try:
            return load_file(str(path)), None
        except (SafetensorError, OSError, ValueError) as exc:
            raise SessaExportError(f"{path}: cannot read safetensors file ({exc})") from None
    if _is_torch(path):
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many types for corrupt or unsafe files
            reason = str(exc).strip().splitlines()[-1] if "Unsupported global" not in str(exc) else next(
                line for line in str(exc).splitlines() if "Unsupported global" in line)
            advice = re.sub(r"\.? *Please use .*$", "", _plain(reason))  # torch's allow-list advice is for code
            raise SessaExportError(f"{path}: refused by torch.load(weights_only=True), which never runs "
                                   f"code from a checkpoint: {advice}; save model.state_dict() (or safetensors) "
                                   "and pass --config or --model") from None
        if isinstance(obj, dict) and "state_dict" in obj:
            config = obj.get("config")
            if config is not None and not isinstance(config, dict):
                raise SessaExportError(f"{path}: 'config' must be a dict, got {type(config).__name__}")
            obj = obj["state_dict"]
        else:
            config = None
        if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise SessaExportError(f"{path}: expected a state_dict of tensors or "
                                   "{'config': ..., 'state_dict': ...}")
        return dict(obj), config
    raise SessaExportError(f"{path}: not a safetensors or torch checkpoint")


def _plain(text: str) -> str:
    """Drop terminal escape codes and surrounding space from a library's message."""
    return re.sub(r"\x1b\[[0-9;]*m", "", text).strip()


def resolve_config(path: Path, config_path: str | Path | None, embedded: dict | None) -> SessaConfig:
    """The config from --config, the checkpoint itself, or a config.json beside it, in that order."""
    if config_path is not None:
        return SessaConfig.load(config_path)
    if embedded is not None:
        return SessaConfig.from_dict(embedded, source=f"{path} (embedded config)")
    beside = path.parent / CONFIG_NAME
    if beside.is_file():
        return SessaConfig.load(beside)
    raise SessaExportError(f"{path} holds no config: pass --config FILE with the model's config.json")


def check_state_dict(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> dict:
    """Refuse missing, unexpected, misshapen or non-finite weights, naming every key at fault."""
    expected = model.state_dict()
    tied = getattr(getattr(model, "config", None), "tie_embeddings", False)
    optional = {"lm_head.weight"} if tied else set()
    missing = [k for k in expected if k not in state_dict and k not in optional]
    unexpected = [k for k in state_dict if k not in expected and not k.endswith(OPTIONAL_SUFFIXES)]
    problems = []
    for key, value in state_dict.items():
        if key.endswith("mixer.rope_inv_freq"):
            mixer = model.get_submodule(key.rsplit(".", 1)[0]) if key.startswith("layers.") else None
            if mixer is None or not mixer.use_forward_rope:
                unexpected.append(f"{key} (the config has use_forward_rope false)")
            elif tuple(value.shape) != tuple(mixer.rope_inv_freq.shape):
                problems.append(f"shape mismatch for {key}: checkpoint has {tuple(value.shape)}, "
                                f"config expects {tuple(mixer.rope_inv_freq.shape)}")
    if missing:
        problems.insert(0, f"missing keys: {', '.join(missing)}")
    if unexpected:
        problems.insert(1 if missing else 0, f"unexpected keys: {', '.join(unexpected)}")
    for key, value in state_dict.items():
        if key in expected and tuple(value.shape) != tuple(expected[key].shape):
            problems.append(f"shape mismatch for {key}: checkpoint has {tuple(value.shape)}, "
                            f"config expects {tuple(expected[key].shape)}")
    if problems:
        raise SessaExportError(f"{source}: checkpoint does not match its config; " + "; ".join(problems))
    not_float = [f"{k} ({str(v.dtype).removeprefix('torch.')})" for k, v in state_dict.items()
                 if k in expected and v.dtype not in FLOAT_DTYPES]
    if not_float:
        raise SessaExportError(f"{source}: weights must be float16, bfloat16, float32 or float64; "
                               f"{', '.join(not_float[:4])}{' ...' if len(not_float) > 4 else ''} are not: "
                               "save the trained floating-point weights")
    # non-finite as float32, the precision every back end computes in (a float64 1e39 is inf there)
    bad = [k for k, v in state_dict.items() if v.is_floating_point() and not torch.isfinite(v.float()).all()]
    if bad:
        raise SessaExportError(f"{source}: non-finite values (NaN or inf, as float32) in {', '.join(bad)}")
    if tied and "lm_head.weight" in state_dict:
        state_dict = {k: v for k, v in state_dict.items() if k != "lm_head.weight"}
    return state_dict


def load_checkpoint(path: str | Path, config_path: str | Path | None = None) -> SessaLM:
    """A SessaLM in eval mode from any accepted checkpoint form."""
    path = Path(path)
    if path.is_dir():
        weights = path / WEIGHTS_NAME
        if not weights.is_file():
            raise SessaExportError(f"{path}: directory has no {WEIGHTS_NAME}")
        config = SessaConfig.load(config_path or path / CONFIG_NAME)
        state_dict, _ = read_state_dict(weights)
        source = str(weights)
    else:
        state_dict, embedded = read_state_dict(path)
        config = resolve_config(path, config_path, embedded)
        source = str(path)
    model = SessaLM(config)
    state_dict = check_state_dict(model, state_dict, source)
    model.load_state_dict(state_dict, strict=not config.tie_embeddings)
    return model.eval()


def check_checkpoint_out(out: str | Path, inputs: tuple = ()) -> None:
    """Refuse an `out` that save_checkpoint may not replace (before any work is done)."""
    check_replaceable(Path(out), CONFIG_NAME, CHECKPOINT_KIND, (CONFIG_NAME, WEIGHTS_NAME), inputs)


def save_checkpoint(model: SessaLM, out: str | Path, inputs: tuple = ()) -> Path:
    """Write `config.json` + `model.safetensors` (tied LM head stored once); `out` may not be, hold or lie
    inside one of `inputs`."""
    state_dict = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        state_dict.pop("lm_head.weight")
    with atomic_directory(out, CONFIG_NAME, CHECKPOINT_KIND, (CONFIG_NAME, WEIGHTS_NAME), inputs) as tmp:
        (tmp / CONFIG_NAME).write_text(json.dumps(model.config.to_dict(), indent=2) + "\n")
        save_file(state_dict, str(tmp / WEIGHTS_NAME))
    return Path(out)
