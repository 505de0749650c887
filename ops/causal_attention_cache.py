"""The layer's forward attention over fixed-capacity key/value caches written in place (the
in-place state contract; standard ops, opset 24, inlined at export).

    inputs:  query [B, S, H·d], key, value [B, S, Hkv·d] (after RoPE), past_length int64 [],
             key_cache, value_cache [B, Hkv, C, d]
    outputs: output [B, S, H·d], key_cache, value_cache (rows P..P+S-1 written)

The new keys and values go into the caches with `TensorScatter` (in place when the caches are
bound as input and output). A decode step (S = 1) attends over the whole cache with the rows
beyond P masked (q @ keys^T, a softmax, @ values), no copy; its cost grows with the capacity,
which is why the runner grows the capacity with the context (state.capacity_for). A prefill or
chunk runs ops/causal_attention.py's blocked attention on the P valid rows and the new ones.
"""

from __future__ import annotations

import onnx
from onnxscript import script
from onnxscript.values import Opset

from .causal_attention import DOMAIN, CausalAttention, _prefix_names
from .feedback_attention import FLOAT

OP_TYPE = "CausalAttentionCache"
OPSET = 24

op = Opset("", OPSET)
inline = Opset(DOMAIN, 1)


@script(inline, default_opset=op)
def CausalAttentionCache(query, key, value, past_length, key_cache, value_cache,
                         q_num_heads: int, kv_num_heads: int, scale: float):
    past = op.Reshape(past_length, op.Constant(value_ints=[1]))
    rows = op.Expand(past, op.Shape(query, start=0, end=1))
    split_kv = op.Concat(op.Constant(value_ints=[0, 0]), op.Shape(key_cache, start=1, end=2),
                         op.Shape(key_cache, start=3), axis=0)  # [0, 0, Hkv, d]
    k = op.Transpose(op.Reshape(op.CastLike(key, key_cache), split_kv), perm=[0, 2, 1, 3])  # [B, Hkv, S, d]
    v = op.Transpose(op.Reshape(op.CastLike(value, value_cache), split_kv), perm=[0, 2, 1, 3])
    present_key = op.TensorScatter(key_cache, k, rows, axis=2)
    present_value = op.TensorScatter(value_cache, v, rows, axis=2)
    new = op.Shape(query, start=1, end=2)
    if op.Equal(op.Squeeze(new), op.Constant(value_int=1)):
        # q as [B, Hkv, G, d] (query head h reads kv head h // G); scores are q @ keys^T per kv head, which
        # ONNX Runtime runs with the transpose folded into the product (FusedMatMul, transB): each cache is
        # read once, straight through, and no copy of it is made. (keys @ q^T folds the transpose into the
        # one-column operand instead, which MLAS runs at half the speed.)
        d = op.Shape(key_cache, start=3)
        groups = op.Concat(op.Constant(value_ints=[0]), op.Shape(key_cache, start=1, end=2),
                           op.Constant(value_ints=[-1]), d, axis=0)  # [0, Hkv, G, d]
        q = op.Reshape(op.Mul(op.Cast(query, to=FLOAT), op.Constant(value_float=scale)), groups)
        scores = op.MatMul(q, op.Transpose(op.Cast(present_key, to=FLOAT), perm=[0, 1, 3, 2]))  # [B, Hkv, G, C]
        j = op.Range(op.Constant(value_int=0), op.Squeeze(op.Shape(key_cache, start=2, end=3)),
                     op.Constant(value_int=1))
        visible = op.LessOrEqual(j, past)  # [C]: rows 0..P
        lowest = op.Constant(value_float=-3.4028234663852886e38)
        probs = op.Softmax(op.Where(visible, scores, lowest), axis=-1)
        out = op.MatMul(probs, op.Cast(present_value, to=FLOAT))  # [B, Hkv, G, d]
        output = op.Reshape(out, op.Constant(value_ints=[0, 1, -1]))  # [B, 1, H·d]
    else:
        zero, axis2 = op.Constant(value_ints=[0]), op.Constant(value_ints=[2])
        total = op.Add(past, new)
        t = op.Range(op.Squeeze(past), op.Squeeze(total), op.Constant(value_int=1))
        j = op.Range(op.Constant(value_int=0), op.Squeeze(total), op.Constant(value_int=1))
        causal = op.LessOrEqual(op.Unsqueeze(j, [0]), op.Unsqueeze(t, [1]))  # [S, P+S]
        output, _, _ = CausalAttention(query, key, value, causal, op.Slice(key_cache, zero, past, axis2),
                                       op.Slice(value_cache, zero, past, axis2), q_num_heads=q_num_heads,
                                       kv_num_heads=kv_num_heads, scale=scale)
    return output, present_key, present_value


def function_proto() -> onnx.FunctionProto:
    """The function the exporter calls, then inlines (nodes named `CausalAttentionCache/...`)."""
    proto = CausalAttentionCache.to_function_proto()
    _prefix_names(proto.node, f"{OP_TYPE}/")
    return proto
