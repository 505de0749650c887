"""An independent float64 implementation of Sessa, written from sessa-spec.md for the tests.

It shares no code with `sessa_export.model`: every step of spec §1 is written out here with
plain float64 tensor arithmetic (LayerNorm, exact erf GELU, q/k/v, interleaved RoPE, GQA,
causal softmax, out_proj, strictly causal feedback softmax, the gain, and the feedback
recurrence as an explicit loop over t, not a triangular solve). Weights come in as a
state_dict (any dtype) and are converted to float64.

RoPE angles follow the spec literally: `inv_freq_i = 10000^(-2i/d)` and `θ = t · inv_freq`
are computed in float32 (as the reference code does), then the float32 θ is used in float64.
If the state_dict carries the reference's `mixer.rope_inv_freq` buffer, that value is used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

F64 = torch.float64


def to_f64(state_dict: dict) -> dict[str, torch.Tensor]:
    """A detached float64 CPU copy of every floating tensor (bool/int buffers kept as they are)."""
    out = {}
    for key, value in state_dict.items():
        value = torch.as_tensor(value).detach().cpu()
        out[key] = value.to(F64) if value.is_floating_point() else value.clone()
    return out


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    mean = x.mean(dim=-1, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)  # biased variance, as LayerNorm
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def gelu_erf(x: torch.Tensor) -> torch.Tensor:
    """The exact GELU: x · Φ(x) = 0.5 x (1 + erf(x / √2))."""
    return 0.5 * x * (1.0 + torch.special.erf(x / math.sqrt(2.0)))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    y = x @ weight.T
    return y if bias is None else y + bias


def softmax_rows(scores: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Softmax over the allowed entries of the last axis; a row with nothing allowed is all zero."""
    neg = torch.full_like(scores, -math.inf)
    masked = torch.where(allowed, scores, neg)
    row_max = masked.max(dim=-1, keepdim=True).values
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    e = torch.where(allowed, torch.exp(scores - row_max), torch.zeros_like(scores))
    total = e.sum(dim=-1, keepdim=True)
    return torch.where(total > 0, e / torch.where(total > 0, total, torch.ones_like(total)), e)


def spec_inv_freq(head_dim: int) -> torch.Tensor:
    """inv_freq_i = 10000^(-2i/d), computed in float32 as the reference code does."""
    exponent = torch.arange(0, head_dim, 2, dtype=torch.float32) / float(head_dim)
    return 1.0 / (torch.tensor(10000.0, dtype=torch.float32) ** exponent)


def rope_angles(positions: torch.Tensor, inv_freq32: torch.Tensor,
                activation_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """θ_{t,i} = t · inv_freq_i computed in float32 and cast to the activation dtype (the
    reference's quirk, spec §1 step 2), returned as float64 [T, d/2]."""
    theta32 = positions.to(torch.float32)[:, None] * inv_freq32.to(torch.float32)[None, :]
    return theta32.to(activation_dtype).to(F64)


def rotate_interleaved(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """x [B, T, heads, d]: pair (x[2i], x[2i+1]) rotated by θ [T, d/2] (interleaved layout)."""
    out = torch.empty_like(x)
    cos = torch.cos(theta)[None, :, None, :]
    sin = torch.sin(theta)[None, :, None, :]
    x_even, x_odd = x[..., 0::2], x[..., 1::2]
    out[..., 0::2] = x_even * cos - x_odd * sin
    out[..., 1::2] = x_even * sin + x_odd * cos
    return out


@dataclass
class LayerShape:
    D: int
    n_heads: int = 1
    n_kv_heads: int | None = None
    ln_eps: float = 1e-5
    use_forward_rope: bool = True
    gamma_max: float = 0.999

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def head_dim(self) -> int:
        return self.D // self.n_heads


@dataclass
class LayerTrace:
    """Every intermediate of one layer, float64."""

    a_act: torch.Tensor  # ā [B, T, D]
    g: torch.Tensor  # [B, T, D]
    f: torch.Tensor  # forward branch [B, T, D]
    alpha: torch.Tensor  # feedback weights [B, T, T], strictly lower triangular
    gamma: torch.Tensor  # [B, T, 1]
    s: torch.Tensor  # feedback state [B, T, D]
    y: torch.Tensor  # layer output [B, T, D]
    key: torch.Tensor  # forward keys after RoPE [B, Hkv, T, d]
    value: torch.Tensor  # forward values [B, Hkv, T, d]
    feedback_key: torch.Tensor  # k_b [B, T, D]


def _get(sd: dict, key: str) -> torch.Tensor:
    if key not in sd:
        raise KeyError(f"reference: state_dict has no {key!r}")
    return sd[key]


def forward_branch(sd: dict, p: str, shape: LayerShape, a: torch.Tensor,
                   activation_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    """f = out_proj(concat_h softmax_{j<=t}(q_h k_{h//G}^T / sqrt(d)) v_{h//G}) ; also (key, value)."""
    B, T, D = a.shape
    H, Hkv, d = shape.n_heads, shape.kv_heads, shape.head_dim
    q = linear(a, _get(sd, p + "mixer.q_proj.weight"), _get(sd, p + "mixer.q_proj.bias")).reshape(B, T, H, d)
    k = linear(a, _get(sd, p + "mixer.k_proj.weight"), _get(sd, p + "mixer.k_proj.bias")).reshape(B, T, Hkv, d)
    v = linear(a, _get(sd, p + "mixer.v_proj.weight"), _get(sd, p + "mixer.v_proj.bias")).reshape(B, T, Hkv, d)
    if shape.use_forward_rope:
        inv = sd.get(p + "mixer.rope_inv_freq")
        inv32 = spec_inv_freq(d) if inv is None else inv.to(torch.float32)
        theta = rope_angles(torch.arange(T), inv32, activation_dtype)
        q = rotate_interleaved(q, theta)
        k = rotate_interleaved(k, theta)
    t_idx = torch.arange(T)
    causal = t_idx[None, :] <= t_idx[:, None]  # [T, T], j <= t
    group = H // Hkv
    heads = []
    for h in range(H):
        kv = h // group
        scores = torch.einsum("btd,bjd->btj", q[:, :, h, :], k[:, :, kv, :]) * d ** -0.5
        weights = softmax_rows(scores, causal[None].expand(B, T, T))
        heads.append(torch.einsum("btj,bjd->btd", weights, v[:, :, kv, :]))
    f = torch.cat(heads, dim=-1)  # [B, T, H*d], head h at columns h*d..(h+1)*d
    if H > 1:
        f = linear(f, _get(sd, p + "mixer.out_proj.weight"))
    elif p + "mixer.out_proj.weight" in sd:
        raise KeyError("reference: H == 1 must have no out_proj")
    return f, k.permute(0, 2, 1, 3).contiguous(), v.permute(0, 2, 1, 3).contiguous()


def feedback_recurrence(f: torch.Tensor, q_b: torch.Tensor, k_b: torch.Tensor,
                        gamma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """s_0 = f_0; s_t = f_t + γ_t Σ_{j<t} α_{t,j} s_j, by an explicit loop over t. Returns (s, α)."""
    B, T, D = f.shape
    scale = D ** -0.5
    s = torch.zeros_like(f)
    alpha = torch.zeros(B, T, T, dtype=f.dtype)
    s[:, 0] = f[:, 0]  # empty sum at t = 0
    for t in range(1, T):
        scores = torch.einsum("bd,bjd->bj", q_b[:, t], k_b[:, :t]) * scale  # j < t only
        scores = scores - scores.max(dim=-1, keepdim=True).values
        e = torch.exp(scores)
        a_t = e / e.sum(dim=-1, keepdim=True)
        alpha[:, t, :t] = a_t
        s[:, t] = f[:, t] + gamma[:, t] * torch.einsum("bj,bjd->bd", a_t, s[:, :t])
    return s, alpha


def layer_trace(sd: dict, shape: LayerShape, x: torch.Tensor, prefix: str = "",
                activation_dtype: torch.dtype = torch.float32) -> LayerTrace:
    """One SessaLayer, spec §1 steps 1-6, in float64. `sd` holds float64 tensors (see to_f64).
    `activation_dtype` only sets the dtype the RoPE angles are rounded to (the reference quirk)."""
    p = prefix
    x = x.to(F64)
    D = shape.D
    h = layer_norm(x, _get(sd, p + "ln.weight"), _get(sd, p + "ln.bias"), shape.ln_eps)
    ag = linear(h, _get(sd, p + "W_in.weight"), _get(sd, p + "W_in.bias"))
    a, g = ag[..., :D], ag[..., D:]
    a_act = gelu_erf(a)
    f, key, value = forward_branch(sd, p, shape, a_act, activation_dtype)
    fb = linear(a_act, _get(sd, p + "mixer.proj_fb.weight"), _get(sd, p + "mixer.proj_fb.bias"))
    q_b, k_b = fb[..., :D], fb[..., D:]
    gamma = shape.gamma_max * torch.tanh(
        _get(sd, p + "mixer.gamma_bias") + linear(a_act, _get(sd, p + "mixer.gamma_ctx.weight")))
    s, alpha = feedback_recurrence(f, q_b, k_b, gamma)
    y = x + linear(s * g, _get(sd, p + "W_out.weight"), _get(sd, p + "W_out.bias"))
    return LayerTrace(a_act, g, f, alpha, gamma, s, y, key, value, k_b)


def mixer_state(sd: dict, shape: LayerShape, a_act: torch.Tensor, prefix: str = "") -> torch.Tensor:
    """s for a given ā (the mixer alone), float64."""
    p = prefix
    a_act = a_act.to(F64)
    D = shape.D
    f, _, _ = forward_branch(sd, p, shape, a_act)
    fb = linear(a_act, _get(sd, p + "mixer.proj_fb.weight"), _get(sd, p + "mixer.proj_fb.bias"))
    gamma = shape.gamma_max * torch.tanh(
        _get(sd, p + "mixer.gamma_bias") + linear(a_act, _get(sd, p + "mixer.gamma_ctx.weight")))
    return feedback_recurrence(f, fb[..., :D], fb[..., D:], gamma)[0]


def lm_forward(sd: dict, config, input_ids: torch.Tensor) -> tuple[torch.Tensor, list[LayerTrace]]:
    """SessaLM logits [B, T, V] in float64: embedding -> layers (+ pre-LN GELU MLP with residual)
    -> final LayerNorm -> LM head (the embedding matrix when tied and lm_head is absent)."""
    shape = LayerShape(config.d_model, config.n_heads, config.n_kv_heads, config.ln_eps,
                       config.use_forward_rope, config.gamma_max)
    x = _get(sd, "embed.weight")[input_ids]
    traces = []
    for i in range(config.n_layers):
        trace = layer_trace(sd, shape, x, prefix=f"layers.{i}.")
        traces.append(trace)
        x = trace.y
        if config.mlp_ratio > 0:
            p = f"mlps.{i}."
            h = layer_norm(x, _get(sd, p + "ln.weight"), _get(sd, p + "ln.bias"), config.ln_eps)
            h = gelu_erf(linear(h, _get(sd, p + "fc_in.weight"), _get(sd, p + "fc_in.bias")))
            x = x + linear(h, _get(sd, p + "fc_out.weight"), _get(sd, p + "fc_out.bias"))
    x = layer_norm(x, _get(sd, "norm_f.weight"), _get(sd, "norm_f.bias"), config.ln_eps)
    head = sd.get("lm_head.weight")
    if head is None:
        if not config.tie_embeddings:
            raise KeyError("reference: state_dict has no 'lm_head.weight'")
        head = _get(sd, "embed.weight")
    return linear(x, head), traces
