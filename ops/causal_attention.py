"""The layer's forward attention as standard ONNX ops, in causal blocks of query rows.

ONNX Runtime's `Attention` kernel scores every new row against every key and only then applies
the causal mask: over a T-token prefill that is twice the work the mask keeps. Above BLOCK new
rows this function runs the rows in blocks of BLOCK, and each block's `Attention` sees only the
keys up to its last row (the past ones and the present built so far); a decode step or a short
chunk takes one `Attention` (a Loop costs ORT about 0.3 ms per layer and step). The results are
the same to the bit: each row's scores, mask and softmax are unchanged. It casts its inputs to
float32 and returns float32, so the softmax of a float16 model stays float32 (the fp16 converter
casts the outputs back); ORT drops the casts of a float32 model. Casting back here instead would
cost a float32 model a copy of the whole present key and value every step (ORT keeps a Cast that
writes a graph output: 6 ms of a 125M decode step).

The exporter inlines this function, so a saved model holds only standard ops.
"""

from __future__ import annotations

import onnx
from onnxscript import opset23 as op
from onnxscript import script
from onnxscript.values import Opset

from .feedback_attention import FLOAT

DOMAIN = "ai.sessa.inline"  # never in a saved model: the exporter inlines every call
OP_TYPE = "CausalAttention"
BLOCK = 256  # query rows per Attention: larger blocks score more of the masked half, smaller ones pay
#              more per block; 128 and 256 timed alike in a 125M prefill, 384 and 512 slower on one layer

inline = Opset(DOMAIN, 1)


@script(inline, default_opset=op)
def CausalAttention(query, key, value, visible, past_key, past_value,
                    q_num_heads: int, kv_num_heads: int, scale: float):
    new = op.Shape(query, start=1, end=2)
    block = op.Constant(value_ints=[BLOCK])
    if op.LessOrEqual(op.Squeeze(new), op.Constant(value_int=BLOCK)):
        output, present_key, present_value = op.Attention(
            op.Cast(query, to=FLOAT), op.Cast(key, to=FLOAT), op.Cast(value, to=FLOAT), visible,
            op.Cast(past_key, to=FLOAT), op.Cast(past_value, to=FLOAT),
            q_num_heads=q_num_heads, kv_num_heads=kv_num_heads, scale=scale)
    else:
        q = op.Cast(query, to=FLOAT)
        k = op.Cast(key, to=FLOAT)
        v = op.Cast(value, to=FLOAT)
        past = op.Shape(past_key, start=2, end=3)
        zero = op.Constant(value_ints=[0])
        axis0 = op.Constant(value_ints=[0])
        axis1 = op.Constant(value_ints=[1])
        n_blocks = op.Squeeze(op.Div(op.Add(new, op.Constant(value_ints=[BLOCK - 1])), block))
        output = op.Slice(q, zero, zero, axis1)  # [B, 0, H·d]
        present_key = op.Cast(past_key, to=FLOAT)
        present_value = op.Cast(past_value, to=FLOAT)
        for index in range(n_blocks):
            start = op.Mul(op.Reshape(index, op.Constant(value_ints=[1])), block)
            end = op.Min(op.Add(start, block), new)
            rows_visible = op.Slice(op.Slice(visible, start, end, axis0), zero, op.Add(past, end), axis1)
            rows, present_key, present_value = op.Attention(
                op.Slice(q, start, end, axis1), op.Slice(k, start, end, axis1), op.Slice(v, start, end, axis1),
                rows_visible, present_key, present_value,
                q_num_heads=q_num_heads, kv_num_heads=kv_num_heads, scale=scale)
            output = op.Concat(output, rows, axis=1)
    return output, present_key, present_value


def function_proto() -> onnx.FunctionProto:
    """The function the exporter calls, then inlines; its nodes, subgraphs' included, are named
    `CausalAttention/...` so that profiles of the inlined model still say where they came from."""
    proto = CausalAttention.to_function_proto()
    _prefix_names(proto.node, f"{OP_TYPE}/")
    return proto


def _prefix_names(nodes, prefix: str) -> None:
    for node in nodes:
        node.name = prefix + node.name
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                _prefix_names(attribute.g.node, prefix)
