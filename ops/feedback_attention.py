"""`ai.sessa.FeedbackAttention` (spec §4) as an ONNX function of standard ops.

Steps 3-5 of a Sessa layer for S new positions given the P earlier ones:
    α_t,j = softmax_{j<t}(q_b,t · k_b,j · scale)          (strictly causal; row t = 0 is all zero)
    s_t   = f_t + γ_t · Σ_{j<t} α_t,j s_j
The scores against the P earlier keys are one matrix product. The S new rows form a unit lower
triangular system, solved in blocks of 64 rows. Each block scores only the keys it can see (the
past ones and the new ones before its end: the causal half, not all S × S), takes what the past
states and the solved rows before it contribute (matrix products), then inverts its own (I − M)
exactly with the doubling product (I + M)(I + M²)(I + M⁴)… which ends because M^64 = 0, built on
the block's 64 × 64 matrices and applied to its D-wide rows in one product (applying each factor
to the rows in turn took ORT twice as long). A decode step (S = 1) skips the solve behind an If:
its one row sees exactly the P past keys (the Loop's machinery cost ORT about 0.3 ms per layer
and step). Everything accumulates in float32 and casts back to the input type, so float16 and
bfloat16 models keep the spec's precision (§3); the present key and state take the past ones'
type, so a state may be stored narrower than the activations (export --state-dtype).

Every model that uses the op carries this function, so a runtime that knows nothing of
`ai.sessa` inlines it; a runtime with a fused kernel replaces the node.
`scale` = 0 (the default) means D^-1/2; the exporter always writes the scale it used.
"""

from __future__ import annotations

import onnx
from onnxscript import opset23 as op
from onnxscript import script
from onnxscript.values import Opset

DOMAIN = "ai.sessa"
VERSION = 1
OP_TYPE = "FeedbackAttention"
INPUTS = ("query", "key", "forward", "gain", "past_key", "past_state")
OUTPUTS = ("state", "present_key", "present_state")

sessa = Opset(DOMAIN, VERSION)
FLOAT = 1  # onnx.TensorProto.FLOAT


@script(sessa, default_opset=op)
def FeedbackAttention(query, key, forward, gain, past_key, past_state, scale: float = 0.0):
    present_key = op.Concat(past_key, op.CastLike(key, past_key), axis=1)  # the state may be stored narrower
    width = op.Cast(op.Shape(query, start=-1), to=FLOAT)
    given = op.Constant(value_float=scale)
    scale_used = op.Where(op.Equal(given, op.Constant(value_float=0.0)), op.Reciprocal(op.Sqrt(width)), given)
    q = op.Mul(op.Cast(query, to=FLOAT), scale_used)
    k = op.Cast(key, to=FLOAT)
    f = op.Cast(forward, to=FLOAT)
    g = op.Cast(gain, to=FLOAT)
    s_past = op.Cast(past_state, to=FLOAT)
    scores_past = op.MatMul(q, op.Transpose(op.Cast(past_key, to=FLOAT), perm=[0, 2, 1]))  # [B, S, P]

    past = op.Shape(past_key, start=1, end=2)
    new = op.Shape(query, start=1, end=2)
    zero = op.Constant(value_ints=[0])
    one = op.Constant(value_ints=[1])
    axis1 = op.Constant(value_ints=[1])
    axis2 = op.Constant(value_ints=[2])
    # A row with no earlier key (t = 0) sees equal finite scores, then the mask zeroes it: no NaN.
    lowest = op.Constant(value_float=-3.4028234663852886e38)

    if op.Equal(op.Squeeze(new), op.Constant(value_int=1)):
        # decode: the one new row t = P sees exactly the P past keys
        solved = op.Add(f, op.Mul(g, op.MatMul(op.Softmax(scores_past, axis=-1), s_past)))  # P = 0: empty sum
    else:
        block = op.Constant(value_ints=[64])
        n_blocks = op.Squeeze(op.Div(op.Add(new, op.Constant(value_ints=[63])), block))
        solved = op.Slice(f, zero, zero, axis1)  # [B, 0, D]
        for index in range(n_blocks):
            start = op.Mul(op.Reshape(index, op.Constant(value_ints=[1])), block)
            end = op.Min(op.Add(start, block), new)
            visible = op.Add(past, end)
            # the block's rows score only the keys they can see: the past ones and new ones before `end`
            scores_new = op.MatMul(op.Slice(q, start, end, axis1),
                                   op.Transpose(op.Slice(k, zero, end, axis1), perm=[0, 2, 1]))
            scores = op.Concat(op.Slice(scores_past, start, end, axis1), scores_new, axis=2)  # [B, rows, P+end]
            t = op.Range(op.Squeeze(op.Add(past, start)), op.Squeeze(visible), op.Constant(value_int=1))
            j = op.Range(op.Constant(value_int=0), op.Squeeze(visible), op.Constant(value_int=1))
            earlier = op.Less(op.Unsqueeze(j, [0]), op.Unsqueeze(t, [1]))  # j < t
            alpha = op.Mul(op.Softmax(op.Where(earlier, scores, lowest), axis=-1), op.Cast(earlier, to=FLOAT))
            g_rows = op.Slice(g, start, end, axis1)
            from_past = op.MatMul(op.Slice(alpha, zero, past, axis2), s_past)
            from_solved = op.MatMul(op.Slice(alpha, past, op.Add(past, start), axis2), solved)
            x = op.Add(op.Slice(f, start, end, axis1), op.Mul(g_rows, op.Add(from_past, from_solved)))
            m = op.Mul(g_rows, op.Slice(alpha, op.Add(past, start), visible, axis2))  # [B, rows, rows], strictly lower
            # (I - m)^-1 = (I + m)(I + m^2)(I + m^4)(I + m^8)(I + m^16)(I + m^32), built on the
            # block's rows x rows matrices, then applied to the D-wide rows once
            eye = op.EyeLike(op.Squeeze(op.Slice(m, zero, one, zero), zero))  # [rows, rows]
            inverse = op.Add(eye, m)
            m = op.MatMul(m, m)
            inverse = op.Add(inverse, op.MatMul(inverse, m))
            m = op.MatMul(m, m)
            inverse = op.Add(inverse, op.MatMul(inverse, m))
            m = op.MatMul(m, m)
            inverse = op.Add(inverse, op.MatMul(inverse, m))
            m = op.MatMul(m, m)
            inverse = op.Add(inverse, op.MatMul(inverse, m))
            m = op.MatMul(m, m)
            inverse = op.Add(inverse, op.MatMul(inverse, m))
            solved = op.Concat(solved, op.MatMul(inverse, x), axis=1)

    state = op.CastLike(solved, forward)
    present_state = op.Concat(past_state, op.CastLike(state, past_state), axis=1)
    return state, present_key, present_state


def function_proto() -> onnx.FunctionProto:
    """The function body that ships inside every exported model."""
    proto = FeedbackAttention.to_function_proto()
    proto.doc_string = __doc__.strip().splitlines()[0]
    return proto
