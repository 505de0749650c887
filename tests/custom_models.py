"""Models that are not SessaLM, for `sessa-export export --model custom_models:FACTORY`.

- `factory`: token ids -> own embedding (`tokens`) -> pre-norm -> 2 SessaLayer -> output Linear.
- `structural_factory`: a mixer class that is NOT sessa_export's SessaMixer (its own forward, written
  here from the spec with an explicit loop over t) but carries the reference parameter names, so the
  tracer must find it by structure; wrapped in a block with chunk, sigmoid gating and a SiLU MLP.
- `conv_factory`: a causal convolution over time between transposes: must be refused, naming `conv`.
- `position_table_factory`: a learned absolute position table added to the input: must be refused.
- `extra_norm_factory`, `unused_parameter_factory`: reference-style LMs that `convert` cannot make a
  SessaLM (a LayerNorm after the embedding; a module the forward never calls).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sessa_export.model import SessaLayer

VOCAB = 96
WIDTH = 32


class TinyCustomLM(nn.Module):
    def __init__(self, vocab: int = VOCAB, width: int = WIDTH) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab, width)
        self.pre_norm = nn.LayerNorm(width)
        self.blocks = nn.ModuleList([SessaLayer(width, n_heads=2),
                                     SessaLayer(width, n_heads=4, n_kv_heads=2, use_forward_rope=False)])
        self.readout = nn.Linear(width, vocab)

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        x = self.pre_norm(self.tokens(token_ids))
        for block in self.blocks:
            x = block(x)
        return self.readout(x)


def factory() -> nn.Module:
    return TinyCustomLM()


class FeedbackMixer(nn.Module):
    """Same parameters as the reference SessaMixer, an independent forward (spec §1 steps 2-5)."""

    def __init__(self, D: int, n_heads: int, n_kv_heads: int, use_forward_rope: bool = True,
                 gamma_max: float = 0.999) -> None:
        super().__init__()
        self.D, self.n_heads, self.n_kv_heads, self.head_dim = D, n_heads, n_kv_heads, D // n_heads
        self.use_forward_rope, self.gamma_max, self.max_len = use_forward_rope, gamma_max, None
        self.q_proj = nn.Linear(D, D)
        self.k_proj = nn.Linear(D, n_kv_heads * self.head_dim)
        self.v_proj = nn.Linear(D, n_kv_heads * self.head_dim)
        self.out_proj = nn.Linear(D, D, bias=False) if n_heads > 1 else nn.Identity()
        self.proj_fb = nn.Linear(D, 2 * D)
        self.gamma_bias = nn.Parameter(torch.tensor(1.0))
        self.gamma_ctx = nn.Linear(D, 1, bias=False)
        if use_forward_rope:
            inv = 1.0 / 10000.0 ** (torch.arange(0, self.head_dim, 2, dtype=torch.float32) / self.head_dim)
            self.register_buffer("rope_inv_freq", inv, persistent=False)

    def _rope(self, x: torch.Tensor) -> torch.Tensor:  # x [B, T, h, d], interleaved pairs
        theta = torch.arange(x.shape[1], dtype=torch.float32)[:, None] * self.rope_inv_freq[None, :]
        cos, sin = theta.cos()[None, :, None, :], theta.sin()[None, :, None, :]
        out = torch.empty_like(x)
        out[..., 0::2] = x[..., 0::2] * cos - x[..., 1::2] * sin
        out[..., 1::2] = x[..., 0::2] * sin + x[..., 1::2] * cos
        return out

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        B, T, D = a.shape
        H, Hkv, d = self.n_heads, self.n_kv_heads, self.head_dim
        q = self.q_proj(a).reshape(B, T, H, d)
        k = self.k_proj(a).reshape(B, T, Hkv, d)
        v = self.v_proj(a).reshape(B, T, Hkv, d)
        if self.use_forward_rope:
            q, k = self._rope(q), self._rope(k)
        k = k.repeat_interleave(H // Hkv, dim=2)
        v = v.repeat_interleave(H // Hkv, dim=2)
        scores = torch.einsum("bthd,bshd->bhts", q, k) * d ** -0.5
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        weights = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        f = self.out_proj(torch.einsum("bhts,bshd->bthd", weights, v).reshape(B, T, D))
        q_b, k_b = self.proj_fb(a).chunk(2, dim=-1)
        gain = self.gamma_max * torch.tanh(self.gamma_bias + self.gamma_ctx(a))  # [B, T, 1]
        fb_scores = (q_b @ k_b.transpose(1, 2)) * D ** -0.5
        states = [f[:, 0]]
        for t in range(1, T):
            alpha = fb_scores[:, t, :t].softmax(-1)  # strictly earlier positions
            states.append(f[:, t] + gain[:, t] * torch.einsum("bj,bjd->bd", alpha, torch.stack(states, 1)))
        return torch.stack(states, 1)


class GatedBlock(nn.Module):
    def __init__(self, width: int, n_heads: int, n_kv_heads: int, rope: bool) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.inp = nn.Linear(width, 2 * width)
        self.mix = FeedbackMixer(width, n_heads, n_kv_heads, use_forward_rope=rope)
        self.out = nn.Linear(width, width)
        self.ff_in = nn.Linear(width, 2 * width)
        self.ff_out = nn.Linear(2 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, g = self.inp(self.norm(x)).chunk(2, dim=-1)
        x = x + self.out(self.mix(F.gelu(a)) * torch.sigmoid(g))
        return x + self.ff_out(F.silu(self.ff_in(x)))


class StructuralLM(nn.Module):
    def __init__(self, vocab: int = VOCAB, width: int = WIDTH) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, width)
        self.blocks = nn.ModuleList([GatedBlock(width, 4, 2, rope=True), GatedBlock(width, 1, 1, rope=False)])
        self.final = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.emb(ids)
        for block in self.blocks:
            x = block(x)
        return self.head(self.final(x))


def structural_factory() -> nn.Module:
    return StructuralLM()


class TimeConvLM(nn.Module):
    """A causal depthwise convolution over time before the Sessa layer: positions meet outside a mixer."""

    def __init__(self, vocab: int = VOCAB, width: int = WIDTH) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.conv = nn.Conv1d(width, width, kernel_size=4, padding=3, groups=width)
        self.layer = SessaLayer(width, n_heads=2)
        self.head = nn.Linear(width, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        x = self.conv(x.transpose(1, 2))[..., : ids.shape[1]].transpose(1, 2)
        return self.head(self.layer(x))


def conv_factory() -> nn.Module:
    return TimeConvLM()


class PositionTableLM(nn.Module):
    """A learned absolute position table [max_len, D] added to the token embeddings."""

    def __init__(self, vocab: int = VOCAB, width: int = WIDTH, max_len: int = 64) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.position_table = nn.Parameter(torch.zeros(max_len, width))
        self.layer = SessaLayer(width, n_heads=2)
        self.head = nn.Linear(width, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids) + self.position_table[: ids.shape[1]]
        return self.head(self.layer(x))


def position_table_factory() -> nn.Module:
    return PositionTableLM()


class ReferenceStyleLM(nn.Module):
    """Embedding -> SessaLayers -> LayerNorm -> biased head; `pre_norm` and `spare` are what SessaLM lacks."""

    def __init__(self, pre_norm: bool = False, spare: bool = False, vocab: int = VOCAB, width: int = WIDTH) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.pre_norm = nn.LayerNorm(width) if pre_norm else nn.Identity()
        self.layers = nn.ModuleList([SessaLayer(width, n_heads=4, n_kv_heads=2), SessaLayer(width, n_heads=4)])
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab)
        if spare:
            self.spare = nn.Linear(width, width)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.pre_norm(self.embed(ids))
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm(x))


def extra_norm_factory() -> nn.Module:
    return ReferenceStyleLM(pre_norm=True)


def unused_parameter_factory() -> nn.Module:
    return ReferenceStyleLM(spare=True)
