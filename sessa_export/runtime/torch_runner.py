"""The PyTorch references a runner is compared with: SessaLM's explicit-state step path, and a custom
module's step graph run step by step in torch with the reference mixers."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import SessaExportError
from ..model import LayerState, SessaLM
from ..ops.positionwise import split_sizes
from ..state import FIELDS, StateLayout, past_name
from ..stepgraph import StepGraph
from ..validate import FP32


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


# The step graph's position-wise ops in torch (names of ops/registry.py's OPS). The modules the
# tracer kept (embedding, linear, layer_norm) are the source model's own, called as they are.
_TORCH_OPS = {
    "gelu": lambda node, x: F.gelu(x, approximate=node.attrs.get("approximate", "none")),
    "relu": lambda node, x: F.relu(x), "silu": lambda node, x: F.silu(x),
    "tanh": lambda node, x: torch.tanh(x), "sigmoid": lambda node, x: torch.sigmoid(x),
    "identity": lambda node, x: x,
    "add": lambda node, x, y: x + y, "sub": lambda node, x, y: x - y,
    "mul": lambda node, x, y: x * y, "div": lambda node, x, y: x / y,
    "split": lambda node, x: x.split(split_sizes(node, x.shape[-1]), dim=-1),
    "getitem": lambda node, parts: parts[node.attrs["index"]],
}


class StepGraphRunner:
    """The reference for a custom module (`--model`): its traced step graph run step by step in torch,
    each Sessa mixer by the reference `SessaMixer.step`, so the state is compared as for a SessaLM.

    Built once against the module's own full forward (`check_against_forward`): the tracer's reading
    of the module is checked by code that is not the step graph's.
    """

    name = "pytorch-steps"

    def __init__(self, module: torch.nn.Module, graph: StepGraph) -> None:
        self.model = module.eval()
        self.graph = graph
        self.layout = graph.state
        self.max_len = graph.max_len
        self.vocab_size = graph.vocab_size

    def empty_state(self, batch: int) -> list[LayerState]:
        return [mixer.empty_state(batch) for mixer in self.graph.mixers]

    @torch.inference_mode()
    def step(self, input_ids: np.ndarray, state: list[LayerState]) -> tuple[np.ndarray, list[LayerState]]:
        values: dict[str, object] = {self.graph.input_name: torch.from_numpy(np.asarray(input_ids, dtype=np.int64))}
        new_state = list(state)
        for node in self.graph.nodes:
            args = [values[i] if isinstance(i, str) else i for i in node.inputs]
            if node.op == "mixer":
                index = node.attrs["index"]
                values[node.output], new_state[index] = node.module.step(args[0], state[index])
            elif node.op in ("embedding", "linear", "layer_norm"):
                values[node.output] = node.module(args[0])
            else:
                values[node.output] = _TORCH_OPS[node.op](node, *args)
        first = values[next(iter(self.graph.outputs.values()))]
        return first.float().numpy(), new_state

    def state_arrays(self, state: list[LayerState]) -> dict[str, np.ndarray]:
        return {past_name(i, f): getattr(layer, f).float().numpy() for i, layer in enumerate(state) for f in FIELDS}

    @torch.inference_mode()
    def check_against_forward(self, what: str, length: int = 48, seed: int = 0) -> float:
        """Prefill + decode steps of random tokens against the module's forward over the whole sequence;
        refuse (SessaExportError) when they differ beyond the fp32 tolerance. Returns the max abs error."""
        length = min(length, self.max_len or length)
        ids = np.random.default_rng(seed).integers(0, self.vocab_size, (1, length))
        out = self.model(torch.from_numpy(ids))
        if isinstance(out, dict):
            out = next(iter(out.values()))
        elif isinstance(out, (tuple, list)):
            out = out[0]
        expected = out.float().numpy()
        state, pieces, prefill = self.empty_state(1), [], length // 2
        for start, stop in [(0, prefill)] + [(t, t + 1) for t in range(prefill, length)]:
            logits, state = self.step(ids[:, start:stop], state)
            pieces.append(logits)
        error = float(np.max(np.abs(np.concatenate(pieces, axis=1) - expected)))
        scale = float(np.max(np.abs(expected)))
        if not FP32.allows(error, scale):
            raise SessaExportError(f"{what}: its step graph run step by step differs from its own forward by "
                                   f"{error:.3g} (max |logits| {scale:.3g}): the module computes something the "
                                   "tracer did not see (Python control flow on values, in-place updates?)")
        return error
