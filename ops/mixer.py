"""The Sessa mixer as both back ends emit it (spec §1 steps 2-5), written once.

    q, k, v = q_proj(ā), k_proj(ā), v_proj(ā)
    f       = out_proj(forward_attention(q, k, v))           (identity out_proj when H == 1)
    q_b, k_b = split(proj_fb(ā))
    γ       = gamma_max · tanh(gamma_bias + gamma_ctx(ā))
    s       = FeedbackAttention(q_b, k_b, f, γ)

The two attentions are where positions meet and where the state is read and written: each back
end provides them (`forward_attention`, `feedback_attention` on its builder: ONNX emits RoPE, the
blocked `Attention` and the `ai.sessa.FeedbackAttention` node over growing state tensors; TVM
calls its TIR kernels on in-place caches). Everything else here is the builders' shared
vocabulary, so the projections, the split and the gain exist once for every back end.
"""

from __future__ import annotations

import numpy as np

from .op import Op

GAIN = "gain"  # the role of the nodes computing γ (the fp16 converter keeps them in float32)


def gain(b, a, mixer, path: str):
    """γ_t = gamma_max · tanh(gamma_bias + gamma_ctx(ā_t)), [B, S, 1] (spec §1 step 4)."""
    with b.role(GAIN):
        ctx = b.linear(a, mixer.gamma_ctx, f"{path}.gamma_ctx")
        bias = b.const(mixer.gamma_bias.detach().reshape(1), f"{path}.gamma_bias")
        gamma_max = b.const(np.array([mixer.gamma_max], dtype=np.float32), f"{path}.gamma_max")
        return b.apply("mul", b.apply("tanh", b.apply("add", ctx, bias)), gamma_max)


def emit(b, node, a):
    """One Sessa mixer on ā: the new positions' s, with its layer's state read and written."""
    mixer, path, layer = node.module, node.path, node.attrs["index"]
    q, k, v, fb = b.linears(a, [(getattr(mixer, name), f"{path}.{name}") for name in ("q_proj", "k_proj", "v_proj", "proj_fb")])
    heads = b.forward_attention(q, k, v, mixer, path, layer)
    f = heads if mixer.n_heads == 1 else b.linear(heads, mixer.out_proj, f"{path}.out_proj")
    q_b, k_b = b.split(fb, [mixer.D, mixer.D])
    return b.feedback_attention(q_b, k_b, f, gain(b, a, mixer, path), mixer, layer)


OP = Op("mixer", emit, emit, width=lambda node, widths, graph: node.module.D)
