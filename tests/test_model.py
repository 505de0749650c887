"""sessa_export.model against the independent float64 recurrence of tests/reference_recurrence.py.

Every parity check here compares against a computation written from the spec in the test
helper (explicit loop over t, float64), never against sessa_export's own functions.
Errors are measured relative to the scale of the reference output: max|err| / max|ref|.
"""

from __future__ import annotations

import pytest
import torch

from reference_recurrence import (LayerShape, layer_trace, lm_forward, mixer_state, spec_inv_freq,
                                  to_f64)
from sessa_export.config import SessaConfig
from sessa_export.errors import SessaExportError
from sessa_export.model import SessaLayer, SessaLM, init_weights

FP32_TOL = 1e-5  # spec: fp32 parity to 1e-5 relative to the output's scale



def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.double() - ref.double()).abs().max() / ref.double().abs().max())


def randomize(module: torch.nn.Module, seed: int, std: float) -> torch.nn.Module:
    """init_weights at `std`, then random biases and LayerNorm affine too (they are zero/one after init)."""
    init_weights(module, seed=seed, std=std)
    gen = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() == 1:
                if name.endswith("ln.weight") or name.endswith("norm_f.weight"):
                    p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
                else:
                    p.copy_(std * torch.randn(p.shape, generator=gen))
    return module


def set_gain(mixer, mode: str, seed: int = 0) -> None:
    """Push γ = gamma_max·tanh(gamma_bias + gamma_ctx(ā)) to +gamma_max, -gamma_max, or both signs."""
    with torch.no_grad():
        if mode == "+":
            mixer.gamma_bias.fill_(12.0)
            mixer.gamma_ctx.weight.zero_()
        elif mode == "-":
            mixer.gamma_bias.fill_(-12.0)
            mixer.gamma_ctx.weight.zero_()
        elif mode == "mixed":  # large input-dependent part: γ saturates at either sign per position
            mixer.gamma_bias.fill_(0.0)
            gen = torch.Generator().manual_seed(seed)
            mixer.gamma_ctx.weight.copy_(3.0 * torch.randn(mixer.gamma_ctx.weight.shape, generator=gen))
        else:
            raise ValueError(mode)


def check_gain(gamma: torch.Tensor, mode: str, gamma_max: float) -> None:
    if mode == "+":
        assert gamma.min() > 0.999 * gamma_max
    elif mode == "-":
        assert gamma.max() < -0.999 * gamma_max
    else:
        assert gamma.max() > 0.99 * gamma_max and gamma.min() < -0.99 * gamma_max
    assert gamma.abs().max() <= gamma_max  # tanh rounds to 1.0 in float64 when saturated


def check_feedback_matters(trace) -> None:
    """s must differ materially from f, so a broken recurrence cannot pass the parity check."""
    assert float((trace.s - trace.f).abs().max() / trace.f.abs().max()) > 0.2
    # and every row t >= 1 of α is a distribution over j < t; row 0 is all zero
    T = trace.alpha.shape[-1]
    assert torch.all(trace.alpha[:, 0] == 0)
    assert torch.allclose(trace.alpha[:, 1:].sum(-1), torch.ones(1, dtype=torch.float64))
    assert torch.all(trace.alpha.triu() == 0) and T > 1


LAYER_CASES = [
    # (n_heads, n_kv_heads, rope, gain mode, gamma_max, T, D)
    pytest.param(1, None, True, "+", 0.999, 512, 48, id="H1-rope-gain+0.999-T512"),
    pytest.param(4, None, True, "+", 0.999, 512, 64, id="H4-rope-gain+0.999-T512"),
    pytest.param(4, 2, True, "-", 0.999, 512, 64, id="GQA4/2-rope-gain-0.999-T512"),
    pytest.param(4, None, False, "+", 0.9, 512, 64, id="H4-norope-gain+0.9-T512"),
    pytest.param(4, 2, True, "mixed", 0.9, 256, 64, id="GQA4/2-rope-gain+-0.9-T256"),
    pytest.param(4, 1, False, "-", 0.9, 96, 32, id="MQA4/1-norope-gain-0.9-T96"),
    pytest.param(2, None, True, "mixed", 0.999, 384, 32, id="H2-rope-gain+-0.999-T384"),
]


@pytest.mark.parametrize("H, Hkv, rope, mode, gamma_max, T, D", LAYER_CASES)
def test_layer_forward_matches_float64_recurrence(H, Hkv, rope, mode, gamma_max, T, D):
    layer = SessaLayer(D, n_heads=H, n_kv_heads=Hkv, use_forward_rope=rope, gamma_max=gamma_max)
    randomize(layer, seed=H * 10 + T, std=0.2)
    set_gain(layer.mixer, mode, seed=T)
    layer.eval()
    x = torch.randn(2, T, D, generator=torch.Generator().manual_seed(T))

    sd = to_f64(layer.state_dict())
    shape = LayerShape(D, H, Hkv, 1e-5, rope, gamma_max)
    ref = layer_trace(sd, shape, x.double())
    check_gain(ref.gamma, mode, gamma_max)
    check_feedback_matters(ref)

    with torch.no_grad():
        y = layer(x)
    assert y.dtype == torch.float32 and y.shape == x.shape
    assert rel_err(y, ref.y) <= FP32_TOL
    # the layer's own contribution, not hidden behind the residual
    assert rel_err(y - x, ref.y - x.double()) <= FP32_TOL

    # the mixer alone, fed the same ā: s against the explicit loop
    a32 = ref.a_act.float()
    with torch.no_grad():
        s = layer.mixer(a32)
    assert rel_err(s, mixer_state(sd, shape, a32.double())) <= FP32_TOL


def test_reference_loop_equals_triangular_system():
    """Self-check of the helper: its loop solves (I − diag(γ)·A) s = f (spec §1 step 5)."""
    layer = randomize(SessaLayer(32, n_heads=2), seed=3, std=0.2)
    set_gain(layer.mixer, "mixed")
    x = torch.randn(1, 40, 32, generator=torch.Generator().manual_seed(3))
    ref = layer_trace(to_f64(layer.state_dict()), LayerShape(32, 2), x.double())
    system = torch.eye(40, dtype=torch.float64) - ref.gamma[0] * ref.alpha[0]
    s = torch.linalg.solve(system, ref.f[0])
    assert torch.allclose(s, ref.s[0], rtol=1e-12, atol=1e-12)
    assert torch.equal(ref.s[:, 0], ref.f[:, 0])


def test_rope_inv_freq_is_the_spec_value():
    layer = SessaLayer(64, n_heads=4)
    d = 16
    exact = 10000.0 ** (-2.0 * torch.arange(d // 2, dtype=torch.float64) / d)
    inv = layer.mixer.rope_inv_freq
    assert inv.dtype == torch.float32 and inv.shape == (d // 2,)
    assert torch.allclose(inv.double(), exact, rtol=3e-7, atol=0)
    assert torch.equal(inv, spec_inv_freq(d))
    assert not hasattr(SessaLayer(64, n_heads=4, use_forward_rope=False).mixer, "rope_inv_freq")


LM_CASES = [
    pytest.param(SessaConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                             mlp_ratio=2.0, gamma_max=0.999), id="gqa-mlp"),
    pytest.param(SessaConfig(vocab_size=50, d_model=24, n_layers=3, n_heads=1, use_forward_rope=False,
                             tie_embeddings=True, gamma_max=0.9), id="H1-norope-tied"),
]


def make_lm(config: SessaConfig, seed: int = 0, std: float = 0.2, gain: float = 3.0) -> SessaLM:
    model = randomize(SessaLM(config), seed=seed, std=std)
    with torch.no_grad():
        for i, layer in enumerate(model.layers):
            layer.mixer.gamma_bias.fill_(gain if i % 2 == 0 else -gain)
    return model.eval()


@pytest.mark.parametrize("config", LM_CASES)
def test_lm_forward_matches_float64_reference(config):
    model = make_lm(config)
    ids = torch.randint(0, config.vocab_size, (2, 200), generator=torch.Generator().manual_seed(1))
    sd = to_f64(model.state_dict())
    if config.tie_embeddings:
        sd.pop("lm_head.weight")  # the reference falls back to the embedding
    ref, traces = lm_forward(sd, config, ids)
    for trace in traces:
        check_feedback_matters(trace)
    with torch.no_grad():
        logits = model(ids)
    assert logits.shape == (2, 200, config.vocab_size)
    assert rel_err(logits, ref) <= FP32_TOL


# ---------------------------------------------------------------------------------------------
# step(): decode and chunked prefill against the full forward


def check_states_equal(got, want, tol=FP32_TOL):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        for name in ("key", "value", "feedback_key", "feedback_state"):
            a, b = getattr(g, name), getattr(w, name)
            assert a.shape == b.shape, name
            assert rel_err(a, b) <= tol, name


def check_state_shapes(states, config: SessaConfig, batch: int, past: int) -> None:
    for st in states:
        assert st.key.shape == (batch, config.kv_heads, past, config.head_dim)
        assert st.value.shape == (batch, config.kv_heads, past, config.head_dim)
        assert st.feedback_key.shape == (batch, past, config.d_model)
        assert st.feedback_state.shape == (batch, past, config.d_model)
        assert st.past == past


@pytest.mark.parametrize("config", LM_CASES)
def test_decode_one_token_at_a_time_matches_forward(config):
    model = make_lm(config, seed=5)
    T = 96
    ids = torch.randint(0, config.vocab_size, (2, T), generator=torch.Generator().manual_seed(2))
    sd = to_f64(model.state_dict())
    ref, _ = lm_forward(sd, config, ids)
    with torch.no_grad():
        full = model(ids)
        prefill_logits, prefill_states = model.step(ids, model.empty_state(2))
        states = model.empty_state(2)
        check_state_shapes(states, config, 2, 0)
        outs = []
        for t in range(T):
            out, states = model.step(ids[:, t:t + 1], states)
            outs.append(out)
        decoded = torch.cat(outs, dim=1)
    check_state_shapes(states, config, 2, T)
    assert rel_err(decoded, full) <= FP32_TOL
    assert rel_err(decoded, ref) <= FP32_TOL
    assert rel_err(prefill_logits, full) <= FP32_TOL
    check_states_equal(states, prefill_states)


def random_split(T: int, gen: torch.Generator, max_chunk: int) -> list[int]:
    sizes = []
    while sum(sizes) < T:
        sizes.append(min(int(torch.randint(1, max_chunk + 1, (1,), generator=gen)), T - sum(sizes)))
    return sizes


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_chunk_splits_match_forward(seed):
    config = SessaConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_ratio=1.0)
    model = make_lm(config, seed=seed)
    T = 160
    gen = torch.Generator().manual_seed(100 + seed)
    ids = torch.randint(0, config.vocab_size, (2, T), generator=gen)
    sizes = random_split(T, gen, max_chunk=37)
    assert len(set(sizes)) > 2 and sum(sizes) == T  # uneven
    ref, _ = lm_forward(to_f64(model.state_dict()), config, ids)
    with torch.no_grad():
        full = model(ids)
        _, prefill_states = model.step(ids, model.empty_state(2))
        states, outs, pos = model.empty_state(2), [], 0
        for size in sizes:
            out, states = model.step(ids[:, pos:pos + size], states)
            assert out.shape == (2, size, config.vocab_size)
            pos += size
            check_state_shapes(states, config, 2, pos)
            outs.append(out)
        chunked = torch.cat(outs, dim=1)
    assert rel_err(chunked, full) <= FP32_TOL
    assert rel_err(chunked, ref) <= FP32_TOL
    check_states_equal(states, prefill_states)


def test_step_is_pure():
    """step returns a new state and leaves the one it was given untouched."""
    config = SessaConfig(vocab_size=32, d_model=16, n_layers=1, n_heads=2)
    model = make_lm(config)
    ids = torch.randint(0, 32, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        _, st = model.step(ids, model.empty_state(1))
        before = [tuple(t.clone() for t in s) for s in st]
        a, _ = model.step(ids[:, :1], st)
        b, _ = model.step(ids[:, :1], st)
    assert torch.equal(a, b)
    for s, saved in zip(st, before):
        for t, u in zip(s, saved):
            assert torch.equal(t, u)


# ---------------------------------------------------------------------------------------------
# t = 0, the empty feedback sum, low precision


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_first_position_and_empty_state_have_no_nan(dtype):
    layer = randomize(SessaLayer(32, n_heads=4, n_kv_heads=2), seed=7, std=0.2)
    set_gain(layer.mixer, "+")
    layer = layer.to(dtype).eval()
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2, 6, 32, generator=gen).to(dtype)
    ref = layer_trace(to_f64(layer.state_dict()), LayerShape(32, 4, 2), x.double(), activation_dtype=dtype)
    tol = 1e-5 if dtype == torch.float32 else 16 * torch.finfo(dtype).eps
    with torch.no_grad():
        y1 = layer(x[:, :1])  # T = 1: only the empty feedback sum
        y = layer(x)
        state = layer.mixer.empty_state(2)
        assert state.past == 0 and state.feedback_state.dtype == dtype
        s0, state = layer.step(x[:, :1], state)  # first decode step from an empty state
        s1, state = layer.step(x[:, 1:2], state)
    for out in (y1, y, s0, s1):
        assert out.dtype == dtype
        assert torch.isfinite(out).all()
    assert state.past == 2 and torch.isfinite(state.feedback_state).all()
    # at t = 0, s_0 = f_0: the first output is exactly the no-feedback value
    assert rel_err(y1, ref.y[:, :1]) <= tol
    assert rel_err(s0, ref.y[:, :1]) <= tol
    assert rel_err(y, ref.y) <= tol
    assert rel_err(s1, ref.y[:, 1:2]) <= tol


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", ["+", "-"])
def test_half_precision_long_sequence_with_extreme_gain(dtype, mode):
    """γ at ±0.999 over 512 positions in float16/bfloat16: finite, and close to the float64
    recurrence (the solve accumulates in float32). Weights at std 0.1 keep the attentions
    soft enough that the result is not dominated by input rounding."""
    D, T = 64, 512
    layer = randomize(SessaLayer(D, n_heads=4, n_kv_heads=2), seed=11, std=0.1)
    set_gain(layer.mixer, mode)
    layer = layer.to(dtype).eval()
    x = torch.randn(2, T, D, generator=torch.Generator().manual_seed(11)).to(dtype)
    ref = layer_trace(to_f64(layer.state_dict()), LayerShape(D, 4, 2), x.double(), activation_dtype=dtype)
    check_feedback_matters(ref)
    with torch.no_grad():
        y = layer(x)
    assert torch.isfinite(y).all()
    assert rel_err(y, ref.y) <= 8 * torch.finfo(dtype).eps


# ---------------------------------------------------------------------------------------------
# loading the public reference code's state_dict


def reference_state_dict(layer: SessaLayer, max_len: int | None, with_buffers: bool) -> dict:
    """What the reference SessaLayer's state_dict holds: parameters plus, optionally, its derived buffers."""
    sd = {k: v.clone() for k, v in layer.state_dict().items()}
    if with_buffers:
        m = layer.mixer
        if m.use_forward_rope:
            sd["mixer.rope_inv_freq"] = spec_inv_freq(m.head_dim)
        if max_len is not None:
            sd["mixer.causal_mask_f_full"] = torch.ones(max_len, max_len, dtype=torch.bool).tril()
            sd["mixer.causal_mask_fb_full"] = torch.ones(max_len, max_len, dtype=torch.bool).tril(-1)
    return sd


SPEC_KEYS = {
    "ln.weight", "ln.bias", "W_in.weight", "W_in.bias", "mixer.q_proj.weight", "mixer.q_proj.bias",
    "mixer.k_proj.weight", "mixer.k_proj.bias", "mixer.v_proj.weight", "mixer.v_proj.bias",
    "mixer.proj_fb.weight", "mixer.proj_fb.bias", "mixer.gamma_bias", "mixer.gamma_ctx.weight",
    "W_out.weight", "W_out.bias",
}


@pytest.mark.parametrize("H, Hkv, rope", [(4, 2, True), (1, None, True), (4, None, False)])
def test_layer_state_dict_keys_and_shapes_are_the_spec(H, Hkv, rope):
    D = 32
    layer = SessaLayer(D, n_heads=H, n_kv_heads=Hkv, use_forward_rope=rope)
    sd = layer.state_dict()
    expected = set(SPEC_KEYS) | ({"mixer.out_proj.weight"} if H > 1 else set())
    assert set(sd) == expected
    kv = (Hkv or H) * (D // H)
    shapes = {
        "ln.weight": (D,), "W_in.weight": (2 * D, D), "W_in.bias": (2 * D,), "mixer.q_proj.weight": (D, D),
        "mixer.k_proj.weight": (kv, D), "mixer.v_proj.weight": (kv, D), "mixer.k_proj.bias": (kv,),
        "mixer.proj_fb.weight": (2 * D, D), "mixer.proj_fb.bias": (2 * D,), "mixer.gamma_bias": (),
        "mixer.gamma_ctx.weight": (1, D), "W_out.weight": (D, D), "W_out.bias": (D,),
    }
    if H > 1:
        shapes["mixer.out_proj.weight"] = (D, D)
    for key, shape in shapes.items():
        assert tuple(sd[key].shape) == shape, key
    assert SessaLayer(D, n_heads=H).mixer.gamma_bias.item() == 1.0


@pytest.mark.parametrize("H, Hkv, rope, max_len", [(4, 2, True, 24), (1, None, True, 24),
                                                   (4, None, False, 24), (2, None, True, None)])
@pytest.mark.parametrize("with_buffers", [True, False])
def test_load_reference_state_dict(H, Hkv, rope, max_len, with_buffers):
    D = 32
    trained = randomize(SessaLayer(D, n_heads=H, n_kv_heads=Hkv, max_len=max_len, use_forward_rope=rope),
                        seed=H, std=0.2)
    sd = reference_state_dict(trained, max_len, with_buffers)
    if H == 1:
        assert "mixer.out_proj.weight" not in sd
    keys_before = set(sd)
    fresh = SessaLayer(D, n_heads=H, n_kv_heads=Hkv, max_len=max_len, use_forward_rope=rope)
    result = fresh.load_state_dict(sd, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert set(sd) == keys_before  # the caller's dict is not consumed
    x = torch.randn(1, 20, D, generator=torch.Generator().manual_seed(0))
    ref = layer_trace(to_f64(sd), LayerShape(D, H, Hkv, 1e-5, rope), x.double())
    with torch.no_grad():
        assert torch.equal(fresh(x), trained(x))
        assert rel_err(fresh(x), ref.y) <= FP32_TOL
    if rope:
        assert torch.equal(fresh.mixer.rope_inv_freq, spec_inv_freq(D // H))


def test_h1_layer_refuses_an_out_proj_key():
    sd = SessaLayer(16, n_heads=2).state_dict()
    sd = {k: v for k, v in sd.items()}
    one = SessaLayer(16, n_heads=1)
    with pytest.raises(RuntimeError, match="out_proj"):
        one.load_state_dict(sd, strict=True)


# ---------------------------------------------------------------------------------------------
# max_len


def test_step_past_max_len_raises():
    config = SessaConfig(vocab_size=32, d_model=16, n_layers=2, n_heads=2, max_len=16)
    model = make_lm(config)
    ids = torch.randint(0, 32, (1, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        _, states = model.step(ids[:, :10], model.empty_state(1))
        _, states = model.step(ids[:, 10:16], states)  # exactly max_len: allowed
        assert states[0].past == 16
        with pytest.raises(SessaExportError, match="max_len"):
            model.step(ids[:, 16:17], states)
        with pytest.raises(SessaExportError, match="max_len"):
            model.step(ids[:, 10:17], model.step(ids[:, :10], model.empty_state(1))[1])
        with pytest.raises(SessaExportError, match="max_len"):
            model(ids)
        assert torch.isfinite(model(ids[:, :16])).all()
