"""Runners for the step graph: the PyTorch reference, and `open_runner` for artifacts on disk."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .model import LayerState, SessaLM


class TorchRunner:
    """The PyTorch reference step path, with the state as a list of LayerState."""

    name = "pytorch"

    def __init__(self, model: SessaLM) -> None:
        self.model = model.eval()
        self.config = model.config

    def empty_state(self, batch: int) -> list[LayerState]:
        return self.model.empty_state(batch)

    @torch.inference_mode()
    def step(self, input_ids: np.ndarray, state: list[LayerState]) -> tuple[np.ndarray, list[LayerState]]:
        logits, state = self.model.step(torch.from_numpy(np.asarray(input_ids, dtype=np.int64)), state)
        return logits.float().numpy(), state


def open_runner(path: str | Path):
    """A runner for a checkpoint or an exported artifact directory, chosen by what the path holds."""
    from .checkpoint import load_checkpoint

    return TorchRunner(load_checkpoint(path))
