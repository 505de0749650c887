"""`ai.sessa.FeedbackAttentionCache` (spec §4, the fixed-capacity form): FeedbackAttention over
caches of capacity C that are written in place.

    inputs:  query, key, forward [B, S, D], gain [B, S, 1], key_cache, state_cache [B, C, D]
             (or [B, 1, C, D], as ONNX Runtime GenAI's KV layers hold them), past_length int64 []
             (P, the valid rows of the caches)
    outputs: state [B, S, D], key_cache, state_cache (the inputs with rows P..P+S-1 written)

The math is `ai.sessa.FeedbackAttention`'s. A decode step (S = 1) scores its row against the
whole cache with the rows j >= P masked out (one pass, no copy); a prefill or chunk takes the P
valid rows of each cache and runs the growing op's blocked solve on them. The new keys and states
go into the caches with `TensorScatter` (opset 24): bound to the same buffer as input and output
(ONNX Runtime's IOBinding, or the same `Ort::Value` as input and output in C and C++), the caches
are written in place and nothing else of them is copied. The reads mask or slice rows >= P, so
they never see a row this step writes, whatever order a runtime runs the writes in.
"""

from __future__ import annotations

import onnx
from onnxscript import script
from onnxscript.values import Opset

from .feedback_attention import DOMAIN, FLOAT, FeedbackAttention

OP_TYPE = "FeedbackAttentionCache"
VERSION = 1
OPSET = 24  # TensorScatter
INPUTS = ("query", "key", "forward", "gain", "key_cache", "state_cache", "past_length")
OUTPUTS = ("state", "key_cache", "state_cache")

op = Opset("", OPSET)
sessa = Opset(DOMAIN, VERSION)


@script(sessa, default_opset=op)
def FeedbackAttentionCache(query, key, forward, gain, key_cache, state_cache, past_length, scale: float = 0.0):
    past = op.Reshape(past_length, op.Constant(value_ints=[1]))
    rows = op.Expand(past, op.Shape(query, start=0, end=1))  # the write index of every batch row
    # the caches' rows as [B, C, D]: a view of [B, 1, C, D] caches as well (Reshape copies nothing)
    as_rows = op.Concat(op.Constant(value_ints=[0, -1]), op.Shape(key_cache, start=-1), axis=0)
    keys, states = op.Reshape(key_cache, as_rows), op.Reshape(state_cache, as_rows)
    # the new rows shaped as the caches: [B, S, D] or [B, 1, S, D]
    as_cache = op.Concat(op.Shape(key_cache, start=0, end=-2), op.Shape(query, start=1, end=2),
                         op.Shape(key_cache, start=-1), axis=0)
    present_key = op.TensorScatter(key_cache, op.Reshape(op.CastLike(key, key_cache), as_cache), rows, axis=-2)
    if op.Equal(op.Squeeze(op.Shape(query, start=1, end=2)), op.Constant(value_int=1)):
        width = op.Cast(op.Shape(query, start=-1), to=FLOAT)
        given = op.Constant(value_float=scale)
        scale_used = op.Where(op.Equal(given, op.Constant(value_float=0.0)), op.Reciprocal(op.Sqrt(width)), given)
        q = op.Mul(op.Cast(query, to=FLOAT), scale_used)
        # q @ keys^T, the transpose folded into the product (as in causal_attention_cache): one pass over
        # the key cache, no copy of it
        scores = op.MatMul(q, op.Transpose(op.Cast(keys, to=FLOAT), perm=[0, 2, 1]))  # [B, 1, C]
        j = op.Range(op.Constant(value_int=0), op.Squeeze(op.Shape(keys, start=1, end=2)),
                     op.Constant(value_int=1))
        earlier = op.Less(j, past)  # [C]: the P valid rows
        lowest = op.Constant(value_float=-3.4028234663852886e38)
        alpha = op.Mul(op.Softmax(op.Where(earlier, scores, lowest), axis=-1), op.Cast(earlier, to=FLOAT))
        summed = op.MatMul(alpha, op.Cast(states, to=FLOAT))  # P = 0: alpha is all zero
        state = op.CastLike(op.Add(op.Cast(forward, to=FLOAT), op.Mul(op.Cast(gain, to=FLOAT), summed)), forward)
    else:
        zero, axis1 = op.Constant(value_ints=[0]), op.Constant(value_ints=[1])
        state, _, _ = FeedbackAttention(query, key, forward, gain, op.Slice(keys, zero, past, axis1),
                                        op.Slice(states, zero, past, axis1), scale=scale)
    present_state = op.TensorScatter(state_cache, op.Reshape(op.CastLike(state, state_cache), as_cache), rows,
                                     axis=-2)
    return state, present_key, present_state


def function_proto() -> onnx.FunctionProto:
    """The function body that ships inside every in-place export (beside FeedbackAttention's, which it calls)."""
    proto = FeedbackAttentionCache.to_function_proto()
    proto.doc_string = __doc__.strip().splitlines()[0]
    return proto
