"""Sessa in PyTorch, exact to `sessa-spec.md`: the reference layer and its explicit-state step.

Each layer runs two ways with the same math:
- `forward(x)`: the whole sequence; the feedback recurrence is a unit lower triangular solve.
- `step(x, state)`: S new positions given the `LayerState` of the P earlier ones
  (S = 1 is decode, S > 1 chunked prefill). A pure function: the state comes back new.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import SessaConfig
from .errors import SessaExportError

ROPE_BASE = 10000.0


class LayerState(NamedTuple):
    """What one layer keeps for every earlier position (spec §2)."""

    key: Tensor  # [B, Hkv, P, d] forward keys after RoPE
    value: Tensor  # [B, Hkv, P, d] forward values
    feedback_key: Tensor  # [B, P, D] k_b
    feedback_state: Tensor  # [B, P, D] s

    @property
    def past(self) -> int:
        return self.feedback_key.shape[1]


def rope_inv_freq(head_dim: int) -> Tensor:
    """inv_freq_i = 10000^(-2i/d) in float32, as the reference computes it."""
    return 1.0 / (ROPE_BASE ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))


def apply_rope(x: Tensor, positions: Tensor, inv_freq: Tensor) -> Tensor:
    """Rotate the interleaved pairs (x[2i], x[2i+1]) of x [B, T, H, d] by t * inv_freq_i."""
    theta = (positions.to(torch.float32)[:, None] * inv_freq[None, :]).to(x.dtype)  # [T, d/2]
    cos, sin = theta.cos()[None, :, None, :], theta.sin()[None, :, None, :]
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2)


def feedback_attention(
    query: Tensor,
    key: Tensor,
    forward: Tensor,
    gain: Tensor,
    past_key: Tensor,
    past_state: Tensor,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """The op ai.sessa.FeedbackAttention (spec §4): s of S new positions given P earlier keys and states.

    s_t = f_t + γ_t · Σ_{j<t} softmax_j(q_b,t · k_b,j · scale) s_j, solved as
    (I − diag(γ)·A) s = f + γ·(A_past @ past_state), with float32 accumulation.
    Returns (state [B,S,D], present_key [B,P+S,D], present_state [B,P+S,D]).
    """
    past, new = past_key.shape[1], query.shape[1]
    present_key = torch.cat((past_key, key), dim=1)
    scores = torch.matmul(query.float(), present_key.float().transpose(1, 2)) * scale  # [B, S, P+S]
    t = torch.arange(past, past + new, device=query.device)
    j = torch.arange(past + new, device=query.device)
    earlier = j[None, :] < t[:, None]  # strictly causal: the diagonal is excluded
    # Row t = 0 has no earlier key: fill with a finite minimum so the softmax stays finite, then zero it.
    scores = scores.masked_fill(~earlier, torch.finfo(torch.float32).min)
    alpha = torch.softmax(scores, dim=-1) * earlier
    gain32 = gain.float()
    rhs = forward.float() + gain32 * torch.matmul(alpha[..., :past], past_state.float())
    if new == 1:
        state32 = rhs  # a 1x1 unit triangular system is its right-hand side
    else:
        eye = torch.eye(new, device=query.device, dtype=torch.float32)
        system = eye - gain32 * alpha[..., past:]
        state32 = torch.linalg.solve_triangular(system, rhs, upper=False, unitriangular=True)
    state = state32.to(forward.dtype)
    return state, present_key, torch.cat((past_state, state), dim=1)


class SessaMixer(nn.Module):
    """Forward attention f and the feedback recurrence s, on the activated input ā [B, T, D]."""

    def __init__(
        self,
        D: int,
        n_heads: int = 1,
        n_kv_heads: int | None = None,
        max_len: int | None = None,
        use_flash: bool = False,
        use_forward_rope: bool = True,
        gamma_max: float = 0.999,
    ) -> None:
        super().__init__()
        n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        SessaConfig(d_model=D, n_heads=n_heads, n_kv_heads=n_kv_heads, max_len=max_len,
                    gamma_max=gamma_max, use_forward_rope=use_forward_rope).validate()
        self.D, self.n_heads, self.n_kv_heads = D, n_heads, n_kv_heads
        self.head_dim = D // n_heads
        self.max_len = max_len
        self.use_flash = use_flash  # selects a CUDA kernel in the reference; never changes the math
        self.use_forward_rope = use_forward_rope
        self.gamma_max = gamma_max
        kv_width = n_kv_heads * self.head_dim
        self.q_proj = nn.Linear(D, D)
        self.k_proj = nn.Linear(D, kv_width)
        self.v_proj = nn.Linear(D, kv_width)
        self.out_proj = nn.Linear(D, D, bias=False) if n_heads > 1 else nn.Identity()
        self.proj_fb = nn.Linear(D, 2 * D)
        self.gamma_bias = nn.Parameter(torch.tensor(1.0))
        self.gamma_ctx = nn.Linear(D, 1, bias=False)
        if use_forward_rope:
            self.register_buffer("rope_inv_freq", rope_inv_freq(self.head_dim), persistent=False)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
        # The reference stores derived buffers: accept them, never require them.
        for name in ("causal_mask_f_full", "causal_mask_fb_full"):
            state_dict.pop(prefix + name, None)
        inv_freq = state_dict.get(prefix + "rope_inv_freq")
        if inv_freq is not None and self.use_forward_rope:
            state_dict.pop(prefix + "rope_inv_freq")
            if tuple(inv_freq.shape) != tuple(self.rope_inv_freq.shape):
                error_msgs.append(f"size mismatch for {prefix}rope_inv_freq: checkpoint has "
                                  f"{tuple(inv_freq.shape)}, model has {tuple(self.rope_inv_freq.shape)}")
            else:
                self.rope_inv_freq.copy_(inv_freq)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def empty_state(self, batch: int, dtype: torch.dtype | None = None,
                    device: torch.device | None = None) -> LayerState:
        """The state of P = 0 positions."""
        dtype = dtype or self.q_proj.weight.dtype
        device = device or self.q_proj.weight.device
        kv = torch.zeros(batch, self.n_kv_heads, 0, self.head_dim, dtype=dtype, device=device)
        fb = torch.zeros(batch, 0, self.D, dtype=dtype, device=device)
        return LayerState(kv, kv, fb, fb)

    def gain(self, a: Tensor) -> Tensor:
        """γ_t = gamma_max · tanh(gamma_bias + gamma_ctx(ā_t)), shape [B, T, 1]."""
        return self.gamma_max * torch.tanh(self.gamma_bias + self.gamma_ctx(a))

    def forward_attention(self, a: Tensor, state: LayerState) -> tuple[Tensor, Tensor, Tensor]:
        """Causal multi-head (GQA) attention with RoPE over past and new positions: (f, key, value)."""
        B, S, _ = a.shape
        past = state.past
        q = self.q_proj(a).view(B, S, self.n_heads, self.head_dim)
        k = self.k_proj(a).view(B, S, self.n_kv_heads, self.head_dim)
        v = self.v_proj(a).view(B, S, self.n_kv_heads, self.head_dim)
        if self.use_forward_rope:
            positions = torch.arange(past, past + S, device=a.device)
            q = apply_rope(q, positions, self.rope_inv_freq)
            k = apply_rope(k, positions, self.rope_inv_freq)
        key = torch.cat((state.key, k.transpose(1, 2)), dim=2)
        value = torch.cat((state.value, v.transpose(1, 2)), dim=2)
        groups = self.n_heads // self.n_kv_heads
        k_all = key.repeat_interleave(groups, dim=1) if groups > 1 else key
        v_all = value.repeat_interleave(groups, dim=1) if groups > 1 else value
        visible = torch.arange(past + S, device=a.device)[None, :] <= torch.arange(past, past + S, device=a.device)[:, None]
        heads = F.scaled_dot_product_attention(q.transpose(1, 2), k_all, v_all, attn_mask=visible)
        f = self.out_proj(heads.transpose(1, 2).reshape(B, S, self.D))
        return f, key, value

    def step(self, a: Tensor, state: LayerState) -> tuple[Tensor, LayerState]:
        """s of S new positions and the state of all P + S (spec §2)."""
        if self.max_len is not None and state.past + a.shape[1] > self.max_len:
            raise SessaExportError(
                f"context of {state.past + a.shape[1]} positions exceeds max_len={self.max_len}")
        f, key, value = self.forward_attention(a, state)
        q_b, k_b = self.proj_fb(a).split(self.D, dim=-1)
        s, feedback_key, feedback_state = feedback_attention(
            q_b, k_b, f, self.gain(a), state.feedback_key, state.feedback_state, self.D ** -0.5)
        return s, LayerState(key, value, feedback_key, feedback_state)

    def forward(self, a: Tensor) -> Tensor:
        """s for a whole sequence ā [B, T, D]."""
        return self.step(a, self.empty_state(a.shape[0], a.dtype, a.device))[0]


class SessaLayer(nn.Module):
    """One Sessa decoder layer: y = x + W_out(s ⊙ g) with a, g = W_in(LayerNorm(x))."""

    def __init__(
        self,
        D: int,
        n_heads: int = 1,
        n_kv_heads: int | None = None,
        max_len: int | None = None,
        ln_eps: float = 1e-5,
        use_flash: bool = False,
        use_forward_rope: bool = True,
        gamma_max: float = 0.999,
    ) -> None:
        super().__init__()
        self.D = D
        self.ln = nn.LayerNorm(D, eps=ln_eps)
        self.W_in = nn.Linear(D, 2 * D)
        self.mixer = SessaMixer(D, n_heads, n_kv_heads, max_len, use_flash, use_forward_rope, gamma_max)
        self.W_out = nn.Linear(D, D)

    def step(self, x: Tensor, state: LayerState) -> tuple[Tensor, LayerState]:
        """Outputs of S new positions and the state of all P + S."""
        a, g = self.W_in(self.ln(x)).split(self.D, dim=-1)
        s, state = self.mixer.step(F.gelu(a), state)
        return x + self.W_out(s * g), state

    def forward(self, x: Tensor) -> Tensor:
        a, g = self.W_in(self.ln(x)).split(self.D, dim=-1)
        return x + self.W_out(self.mixer(F.gelu(a)) * g)


class MLP(nn.Module):
    """Pre-LayerNorm GELU MLP with a residual, placed after a Sessa layer when mlp_ratio > 0."""

    def __init__(self, D: int, hidden: int, ln_eps: float) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(D, eps=ln_eps)
        self.fc_in = nn.Linear(D, hidden)
        self.fc_out = nn.Linear(hidden, D)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.fc_out(F.gelu(self.fc_in(self.ln(x))))


class SessaLM(nn.Module):
    """Token embedding -> N SessaLayer (each optionally followed by an MLP) -> LayerNorm -> LM head.

    Per-layer kv heads (`n_kv_heads` as a list) and a biased head (`lm_head_bias`) hold the common
    reference-code LMs; the state_dict keys are listed in README.md (Checkpoints).
    """

    def __init__(self, config: SessaConfig) -> None:
        super().__init__()
        config.validate()
        self.config = c = config
        self.embed = nn.Embedding(c.vocab_size, c.d_model)
        self.layers = nn.ModuleList(
            SessaLayer(c.d_model, c.n_heads, kv_heads, c.max_len, c.ln_eps,
                       use_forward_rope=c.use_forward_rope, gamma_max=c.gamma_max)
            for kv_heads in c.layer_kv_heads)
        if c.mlp_ratio > 0:
            self.mlps = nn.ModuleList(MLP(c.d_model, c.mlp_hidden, c.ln_eps) for _ in range(c.n_layers))
        self.norm_f = nn.LayerNorm(c.d_model, eps=c.ln_eps)
        self.lm_head = nn.Linear(c.d_model, c.vocab_size, bias=c.lm_head_bias)
        if c.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    def empty_state(self, batch: int) -> list[LayerState]:
        return [layer.mixer.empty_state(batch) for layer in self.layers]

    def step(self, input_ids: Tensor, states: list[LayerState]) -> tuple[Tensor, list[LayerState]]:
        """Logits [B, S, V] of S new tokens and the state of all P + S positions."""
        x = self.embed(input_ids)
        new_states = []
        for i, layer in enumerate(self.layers):
            x, state = layer.step(x, states[i])
            new_states.append(state)
            if self.config.mlp_ratio > 0:
                x = self.mlps[i](x)
        return self.lm_head(self.norm_f(x)), new_states

    def forward(self, input_ids: Tensor) -> Tensor:
        """Logits [B, T, V] of a whole sequence; written module by module so torch.fx can trace it."""
        x = self.embed(input_ids)
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if self.config.mlp_ratio > 0:
                x = self.mlps[i](x)
        return self.lm_head(self.norm_f(x))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())  # tied weights counted once


def init_weights(model: nn.Module, seed: int = 0, std: float = 0.02) -> nn.Module:
    """Deterministic GPT-style init for fresh models (tests, training, benchmarks)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, SessaMixer):
                module.gamma_bias.fill_(1.0)
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
            elif not (name.endswith("gamma_bias") or isinstance(model.get_submodule(name.rpartition(".")[0]),
                                                                 nn.LayerNorm)):
                p.zero_()
    return model


__all__ = ["LayerState", "SessaMixer", "SessaLayer", "SessaLM", "MLP", "feedback_attention",
           "apply_rope", "rope_inv_freq", "init_weights"]
