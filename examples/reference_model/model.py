"""A small Sessa LM written the way users of the public reference code write one.

An `nn.Embedding`, an `nn.ModuleList` of Sessa layers (n_kv_heads 4, 2 and 1: grouped-query attention
that narrows with depth), a final `nn.LayerNorm` and an `nn.Linear` head with a bias. The layers are
`sessa_export.model.SessaLayer`, whose parameter names are the public reference `SessaLayer`'s: a model
built on the reference class loads the same checkpoint.

    sessa-export export ckpt.pt --model examples/reference_model/model.py:build -o out
"""

from __future__ import annotations

import torch
from torch import nn

from sessa_export.model import SessaLayer

VOCAB = 48  # token ids 0..47 (the reference repository's SymbolSoup task has 48 tokens)
D_MODEL = 64
N_HEADS = 4
KV_HEADS = (4, 2, 1)  # one entry per layer


class ReferenceLM(nn.Module):
    def __init__(self, vocab: int = VOCAB, d_model: int = D_MODEL, n_heads: int = N_HEADS,
                 kv_heads: tuple[int, ...] = KV_HEADS) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.layers = nn.ModuleList(SessaLayer(d_model, n_heads=n_heads, n_kv_heads=kv) for kv in kv_heads)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab, bias=True)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm(x))


def build() -> nn.Module:
    """The factory `--model examples/reference_model/model.py:build` calls (no arguments)."""
    return ReferenceLM()
