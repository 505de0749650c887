"""The PyTorch references a runner is compared with: the explicit-state step path, and a custom
module's own forward."""

from __future__ import annotations

import numpy as np
import torch

from ..model import LayerState, SessaLM
from ..state import FIELDS, StateLayout, past_name


class TorchRunner:
    """The PyTorch reference step path, with the state as a list of LayerState."""

    name = "pytorch"

    def __init__(self, model: SessaLM) -> None:
        self.model = model.eval()
        self.config = model.config
        self.max_len = model.config.max_len  # None: no limit
        self.layout = StateLayout.from_mixers([layer.mixer for layer in model.layers])
        self.vocab_size = model.config.vocab_size

    def empty_state(self, batch: int) -> list[LayerState]:
        return self.model.empty_state(batch)

    @torch.inference_mode()
    def step(self, input_ids: np.ndarray, state: list[LayerState]) -> tuple[np.ndarray, list[LayerState]]:
        logits, state = self.model.step(torch.from_numpy(np.asarray(input_ids, dtype=np.int64)), state)
        return logits.float().numpy(), state

    def state_arrays(self, state: list[LayerState]) -> dict[str, np.ndarray]:
        return {past_name(i, f): getattr(layer, f).float().numpy() for i, layer in enumerate(state) for f in FIELDS}


class ForwardRunner:
    """The reference for a custom module (`--model package.module:factory`): its own forward over
    the whole prefix at every step, returning the new positions' outputs. It has no step state to
    compare, so validation compares the logits only."""

    name = "pytorch-forward"
    max_len = None
    layout = StateLayout(())

    def __init__(self, module: torch.nn.Module, vocab_size: int | None = None) -> None:
        self.model = module.eval()
        self.vocab_size = vocab_size

    def empty_state(self, batch: int) -> np.ndarray:
        return np.zeros((batch, 0), dtype=np.int64)

    @torch.inference_mode()
    def step(self, input_ids: np.ndarray, state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        history = np.concatenate([state, np.asarray(input_ids, dtype=np.int64)], axis=1)
        out = self.model(torch.from_numpy(history))
        if isinstance(out, dict):
            out = next(iter(out.values()))
        elif isinstance(out, (tuple, list)):
            out = out[0]
        return out[:, state.shape[1]:].float().numpy(), history

    def state_arrays(self, state: np.ndarray) -> dict[str, np.ndarray]:
        return {}
