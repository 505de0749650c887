"""ORT Mobile graphs for the NNAPI and CoreML (MLProgram) execution providers: `export --mobile`.

Those providers take fixed shapes and a short list of operators (onnxruntime/tools/mobile_helpers/
*_supported_ops.md), so an export made with `--mobile` also carries two fixed-shape step graphs of
batch 1 over caches of a fixed capacity C:

- `model.mobile_decode.onnx`: one token (S = 1);
- `model.mobile_prefill.onnx`: a chunk of CHUNK tokens; the host pads a shorter last chunk (with any
  id) and keeps its first n rows: every row sees only earlier ones, so padding changes nothing before it.

Inputs: `input_ids` int32 [1, S], `past_sequence_length` int32 [1] (P) and the caches
`past_key_values.{i}.{field}` (the in-place contract's shapes at capacity C, float32; rows >= P are
never read but must be finite: start from zeros). Outputs: `logits` [1, S, V] and only the new rows,
`present_rows.{i}.{field}` ([1, kv_heads, S, head_dim], [1, S, d_model]): the host copies the n valid
ones into rows P..P+n-1 of its caches (ONNX Runtime Mobile's NNAPI and CoreML providers have no
TensorScatter, and returning whole caches would copy all of them every step). C is the model's
max_len, at most MAX_CAPACITY (MAX_CAPACITY without one); P + n <= C.

Everything is spelled in operators both providers list: MatMul, Softmax, Add/Sub/Mul/Div, Relu,
Max, Reshape, Transpose, Slice, Concat, Cast, ReduceMean, Sqrt, Exp, Tanh. Masks are arithmetic on
P (Relu(P - j) - Relu(P - j - 1): no Less, Where, Range or Clip, which NNAPI takes only as a ReLU
range), added to the scores as 0 or MASKED; the new rows' masks are constants; RoPE's cos and sin
rows are a one-hot matrix (Relu(1 - (j - t)²)) times constant tables (CoreML has no Gather), the
pair rotation a constant ±1 matrix; LayerNormalization and Gelu are spelled out (NNAPI lists
neither, nor Erf: erf is Abramowitz & Stegun 7.1.26, error < 1.5e-7); the feedback recurrence of a
chunk is the ops/feedback_attention.py block solve with a constant identity. The token embedding
stays one Gather (NNAPI takes it with int32 ids; CoreML's MLProgram list has no Gather).
`MobileRunner` is the host loop in Python; `usability` counts the nodes each provider takes.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import onnx_ir as ir
import torch

from .. import __version__
from ..artifact import member, read_manifest, state_layout
from ..errors import SessaExportError
from ..ops.registry import OPS
from ..runtime.cache_writes import CacheWrites
from ..state import FIELDS, INPLACE, PAST_LENGTH, past_name
from ..stepgraph import StepGraph
from . import IR_VERSION, OnnxBuilder, check_model

CHUNK = 64  # prefill rows per call: one block of the feedback solve (ops/feedback_attention.py)
MAX_CAPACITY = 2048  # cache rows of a model without max_len, and the most any mobile export holds
OPSET = 17  # old enough for every ORT Mobile release with both providers; nothing here needs newer
DECODE_MODEL, PREFILL_MODEL = "model.mobile_decode.onnx", "model.mobile_prefill.onnx"
WEIGHTS = "model.mobile.weights"  # the weights both models read, stored once
MASKED = -30000.0  # added to the scores of keys a row must not see: exp underflows to exactly 0 in float32,
#                    and it stays finite in float16 (a provider computing in float16 gets no -inf - -inf)
# Abramowitz & Stegun 7.1.26: erf(z) = 1 - t(a1 + t(a2 + t(a3 + t(a4 + t a5)))) e^(-z²), t = 1 / (1 + p z), z >= 0
ERF_P = 0.3275911
ERF_A = (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429)


def capacity(max_len: int | None) -> int:
    """The mobile caches' rows: the model's max_len, at most MAX_CAPACITY (MAX_CAPACITY without one)."""
    return MAX_CAPACITY if max_len is None else min(max_len, MAX_CAPACITY)


def rows_name(layer: int, field: str) -> str:
    """The name of the output holding a step's new rows of a cache."""
    return f"present_rows.{layer}.{field}"


class MobileBuilder(OnnxBuilder):
    """OnnxBuilder for one fixed-shape step of `sequence` tokens over caches of `capacity` rows, batch 1."""

    def __init__(self, graph: StepGraph, sequence: int, capacity: int) -> None:
        super().__init__(graph, INPLACE)
        self.sequence, self.capacity = sequence, capacity

    # -- what NNAPI refuses, spelled out ----------------------------------------------------------
    def op(self, op_type: str, inputs: list, **attrs) -> ir.Value:
        """A node, with LayerNormalization and Gelu (the op table's faces emit them) in arithmetic."""
        if op_type == "LayerNormalization":
            return self._layer_norm(*inputs, epsilon=attrs.get("epsilon", 1e-5))
        if op_type == "Gelu":
            return self._gelu(inputs[0], attrs.get("approximate", "none"))
        return super().op(op_type, inputs, **attrs)

    def _layer_norm(self, x: ir.Value, weight: ir.Value, bias: ir.Value, epsilon: float) -> ir.Value:
        centred = self.op("Sub", [x, self.op("ReduceMean", [x], axes=[-1])])
        variance = self.op("ReduceMean", [self.op("Mul", [centred, centred])], axes=[-1])
        normed = self.op("Div", [centred, self.op("Sqrt", [self.op("Add", [variance, self.operand(epsilon)])])])
        return self.op("Add", [self.op("Mul", [normed, weight]), bias])

    def _gelu(self, x: ir.Value, approximate: str) -> ir.Value:
        """x/2 (1 + erf(x/√2)), as x/2 + |x|/2 · erf(|x|/√2) (erf is odd); or the tanh form."""
        def mul(a, number):
            return self.op("Mul", [a, self.operand(number)])

        def add(a, number):
            return self.op("Add", [a, self.operand(number)])

        if approximate == "tanh":  # x/2 (1 + tanh(√(2/π) (x + 0.044715 x³)))
            cube = self.op("Mul", [self.op("Mul", [x, x]), x])
            inner = mul(self.op("Add", [x, mul(cube, 0.044715)]), math.sqrt(2 / math.pi))
            return mul(self.op("Mul", [x, add(self.op("Tanh", [inner]), 1.0)]), 0.5)
        magnitude = self.op("Max", [x, mul(x, -1.0)])
        z = mul(magnitude, 1 / math.sqrt(2))
        t = self.op("Div", [self.operand(1.0), add(mul(z, ERF_P), 1.0)])
        poly = mul(t, ERF_A[-1])
        for a in reversed(ERF_A[:-1]):
            poly = self.op("Mul", [add(poly, a), t])
        gauss = self.op("Exp", [mul(self.op("Mul", [z, z]), -1.0)])
        erf = self.op("Sub", [self.operand(1.0), self.op("Mul", [poly, gauss])])
        return mul(self.op("Add", [x, self.op("Mul", [magnitude, erf])]), 0.5)

    # -- the step's positions and masks, from P by arithmetic -------------------------------------
    def shape(self, x: ir.Value, dims: list[int]) -> ir.Value:
        return self.op("Reshape", [x, self.const(np.array(dims, dtype=np.int64), f"shape.{dims}")])

    def step_values(self) -> None:
        """P as float, the cache rows' mask (j < P) and score bias, and the positions P..P+S-1."""
        S, C = self.sequence, self.capacity
        past = self.op("Cast", [self.past_length], to=ir.DataType.FLOAT)  # [1]
        self.row_index = self.const(np.arange(C, dtype=np.float32), f"rows.{C}")  # j
        ahead = self.op("Sub", [past, self.row_index])  # P - j, whole: Relu(P - j) - Relu(P - j - 1) is 1 where j < P
        self.cache_mask = self.op("Sub", [self.op("Relu", [ahead]),
                                          self.op("Relu", [self.op("Sub", [ahead, self.operand(1.0)])])])  # [C]
        self.cache_bias = self.op("Mul", [self.op("Sub", [self.cache_mask, self.operand(1.0)]), self.operand(-MASKED)])
        self.t = self.op("Add", [self.shape(past, [1, 1]),
                                 self.const(np.arange(S, dtype=np.float32)[:, None], f"offsets.{S}")])  # [S, 1]

    def rope_rows(self, head_dim: int, inv_freq) -> tuple[ir.Value, ir.Value]:
        """cos and sin of θ = t·inv_freq for the step's positions, each pair's value twice: [S, 1, d]."""
        key = f"rope{head_dim}"
        if key not in self.cache:
            C = self.capacity
            theta = torch.arange(C, dtype=torch.float32)[:, None] * inv_freq.detach().float().cpu()[None, :]
            if "onehot" not in self.cache:
                u = self.op("Sub", [self.row_index, self.t])  # j - t, [S, C]
                # Relu(1 - (j - t)²), whole numbers: 1 where j = t, else 0 ([S, C]; all 0 for a padded row past C)
                self.cache["onehot"] = self.op("Relu", [self.op("Sub", [self.operand(1.0), self.op("Mul", [u, u])])])
            tables = []
            for values, name in ((theta.cos(), "cos"), (theta.sin(), "sin")):  # the reference's cos and sin
                table = self.const(np.repeat(values.numpy(), 2, axis=1), f"rope_{name}.{head_dim}")  # [C, d]
                rows = self.op("MatMul", [self.cache["onehot"], table])
                tables.append(self.shape(rows, [self.sequence, 1, head_dim]))
            self.cache[key] = tuple(tables)
        return self.cache[key]

    def rope(self, x: ir.Value, head_dim: int, inv_freq) -> ir.Value:
        """Rotate the interleaved pairs of x [S, heads, d]: x·cos + (x @ R)·sin, R mapping (a, b) to (-b, a)."""
        cos, sin = self.rope_rows(head_dim, inv_freq)
        turn = np.zeros((head_dim, head_dim), dtype=np.float32)
        turn[np.arange(1, head_dim, 2), np.arange(0, head_dim, 2)] = -1.0
        turn[np.arange(0, head_dim, 2), np.arange(1, head_dim, 2)] = 1.0
        turned = self.op("MatMul", [x, self.const(turn, f"rope_turn.{head_dim}")])
        return self.op("Add", [self.op("Mul", [x, cos]), self.op("Mul", [turned, sin])])

    def new_rows_bias(self, strict: bool, repeat: int = 1) -> ir.Value:
        """The constant score bias of the new rows among themselves, [repeat·S, S]: 0 where key i' is
        visible to row i (i' <= i, or i' < i when `strict`), MASKED elsewhere."""
        S = self.sequence
        visible = np.tril(np.ones((S, S), dtype=np.float32), -1 if strict else 0)
        return self.const(np.tile((1.0 - visible) * MASKED, (repeat, 1)).astype(np.float32),
                          f"new_bias.{S}.{int(strict)}.{repeat}")

    # -- the two attentions on the caches, returning the new rows ---------------------------------
    def forward_attention(self, q, k, v, mixer, path: str, layer: int) -> ir.Value:
        """RoPE, then attention of the S rows over the P valid cache rows and the new rows before them."""
        H, Hkv, d, S, C = mixer.n_heads, mixer.n_kv_heads, mixer.head_dim, self.sequence, self.capacity
        G = H // Hkv
        q, k, v = self.shape(q, [S, H, d]), self.shape(k, [S, Hkv, d]), self.shape(v, [S, Hkv, d])
        if mixer.use_forward_rope:
            q, k = self.rope(q, d, mixer.rope_inv_freq), self.rope(k, d, mixer.rope_inv_freq)
        k_heads, v_heads = self.op("Transpose", [k], perm=[1, 0, 2]), self.op("Transpose", [v], perm=[1, 0, 2])
        self.rows(layer, key=self.shape(k_heads, [1, Hkv, S, d]), value=self.shape(v_heads, [1, Hkv, S, d]))
        # query head h = kv·G + g reads kv head kv; its rows g·S + i
        q = self.shape(self.op("Transpose", [self.shape(self.op("Mul", [q, self.operand(float(d ** -0.5))]),
                                                        [S, Hkv, G, d])], perm=[1, 2, 0, 3]), [Hkv, G * S, d])
        past = self.past[layer]
        key_cache, value_cache = self.shape(past["key"], [Hkv, C, d]), self.shape(past["value"], [Hkv, C, d])
        # keys @ q, then the small result transposed: no transposed copy of the cache
        scores_past = self.op("Transpose", [self.op("MatMul", [key_cache, self.op("Transpose", [q], perm=[0, 2, 1])])],
                              perm=[0, 2, 1])  # [Hkv, G·S, C]
        scores_new = self.op("MatMul", [q, self.op("Transpose", [k_heads], perm=[0, 2, 1])])  # [Hkv, G·S, S]
        probs = self.op("Softmax", [self.op("Concat", [self.op("Add", [scores_past, self.cache_bias]),
                                                       self.op("Add", [scores_new, self.new_rows_bias(False, G)])],
                                            axis=-1)], axis=-1)
        out = self.op("Add", [self.op("MatMul", [self.slice(probs, 0, C), value_cache]),
                              self.op("MatMul", [self.slice(probs, C, C + S), v_heads])])  # [Hkv, G·S, d]
        return self.shape(self.op("Transpose", [self.shape(out, [Hkv, G, S, d])], perm=[2, 0, 1, 3]), [1, S, H * d])

    def slice(self, x: ir.Value, start: int, end: int) -> ir.Value:
        """x[..., start:end] with constant bounds (CoreML takes only those)."""
        return self.op("Slice", [x, self.const(np.array([start]), f"index.{start}"),
                                 self.const(np.array([end]), f"index.{end}"), self.const(np.array([-1]), "index.-1")])

    def feedback_attention(self, q_b, k_b, f, gain, mixer, layer: int) -> ir.Value:
        """s of the S rows (spec §4) over the P valid cache rows, the chunk's rows solved as
        ops/feedback_attention.py's block: (I − M)⁻¹ = (I + M)(I + M²)(I + M⁴)…, M strictly lower."""
        S, C, D = self.sequence, self.capacity, mixer.D
        q = self.op("Mul", [self.shape(q_b, [S, D]), self.operand(float(D ** -0.5))])
        k, forward, g = self.shape(k_b, [S, D]), self.shape(f, [S, D]), self.shape(gain, [S, 1])
        past = self.past[layer]
        key_cache, state_cache = self.shape(past["feedback_key"], [C, D]), self.shape(past["feedback_state"], [C, D])
        scores_past = self.op("MatMul", [key_cache, self.op("Transpose", [q], perm=[1, 0])])  # [C, S]
        scores = self.op("Add", [self.op("Transpose", [scores_past], perm=[1, 0]), self.cache_bias])  # [S, C]
        if S > 1:
            scores_new = self.op("Add", [self.op("MatMul", [q, self.op("Transpose", [k], perm=[1, 0])]),
                                         self.new_rows_bias(True)])
            scores = self.op("Concat", [scores, scores_new], axis=-1)
        probs = self.op("Softmax", [scores], axis=-1)  # a row with no visible key: uniform, then masked to 0
        alpha_past = self.op("Mul", [self.slice(probs, 0, C) if S > 1 else probs, self.cache_mask])
        x = self.op("Add", [forward, self.op("Mul", [g, self.op("MatMul", [alpha_past, state_cache])])])
        if S == 1:
            s = x
        else:
            strict = np.tril(np.ones((S, S), dtype=np.float32), -1)
            m = self.op("Mul", [g, self.op("Mul", [self.slice(probs, C, C + S), self.const(strict, f"strict.{S}")])])
            inverse = self.op("Add", [self.const(np.eye(S, dtype=np.float32), f"eye.{S}"), m])
            for _ in range(max(0, math.ceil(math.log2(S)) - 1)):  # M^S = 0
                m = self.op("MatMul", [m, m])
                inverse = self.op("Add", [inverse, self.op("MatMul", [inverse, m])])
            s = self.op("MatMul", [inverse, x])
        self.rows(layer, feedback_key=self.shape(k, [1, S, D]), feedback_state=self.shape(s, [1, S, D]))
        return self.shape(s, [1, S, D])

    def rows(self, layer: int, **values: ir.Value) -> None:
        """Name the outputs holding a step's new rows of `layer`'s caches."""
        for field, value in values.items():
            shape = self.layout.layers[layer].shape(field, 1, self.sequence)
            self.outputs.append(self.typed(value, rows_name(layer, field), shape))

    # -- the walk ---------------------------------------------------------------------------------
    def build(self) -> ir.Model:
        g, S, C = self.graph, self.sequence, self.capacity
        self.dtype = ir.DataType.FLOAT
        if g.input_kind == "tokens":
            self.data_input = self.new_input(g.input_name, ir.DataType.INT32, [1, S])
        else:
            self.data_input = self.new_input(g.input_name, self.dtype, [1, S, g.input_width])
        self.values[g.input_name] = self.data_input
        self.past_length = self.new_input(PAST_LENGTH, ir.DataType.INT32, [1])
        self.past = [{f: self.new_input(past_name(layer.layer, f), self.dtype, layer.shape(f, 1, C)) for f in FIELDS}
                     for layer in self.layout.layers]
        self.step_values()
        for node in g.nodes:
            args = [self.values[i] if isinstance(i, str) else i for i in node.inputs]
            self.values[node.output] = OPS[node.op].onnx(self, node, *args)
        results = [self.typed(self.op("Identity", [self.values[value]]), name, [1, S, self.widths[value]])
                   for name, value in g.outputs.items()]
        graph = ir.Graph(self.inputs, results + self.outputs, nodes=self.tape.nodes,
                         initializers=self.tape.initializers, opset_imports={"": OPSET},
                         name=f"sessa_mobile_step_{S}")
        return ir.Model(graph, ir_version=IR_VERSION, producer_name="sessa-export", producer_version=__version__)


# -- writing ------------------------------------------------------------------------------------
def write_mobile(directory: Path, graph: StepGraph, progress: Callable[[str], None] = lambda _: None) -> dict:
    """Write the decode and prefill models into `directory`, their weights stored once (WEIGHTS, read by
    both); return the manifest keys naming them and their calling convention."""
    C = capacity(graph.max_len)
    progress(f"building the ORT Mobile step graphs (decode, prefill chunks of {CHUNK}; capacity {C})")
    models = {name: ir.serde.serialize_model(MobileBuilder(graph, S, C).build())
              for name, S in ((DECODE_MODEL, 1), (PREFILL_MODEL, CHUNK))}
    save_sharing_weights(directory, models)
    for name in models:
        check_model(directory / name, progress)
    layout = graph.state
    return {"mobile_decode_file": DECODE_MODEL, "mobile_prefill_file": PREFILL_MODEL, "mobile_weights_file": WEIGHTS,
            "mobile": {
                "batch": 1, "decode_sequence": 1, "prefill_sequence": CHUNK, "capacity": C,
                "capacity_rule": f"the model's max_len, at most {MAX_CAPACITY} ({MAX_CAPACITY} without one)",
                "input_dtype": "int32" if graph.input_kind == "tokens" else "float32",
                "past_length_input": PAST_LENGTH, "past_length_shape": [1],
                "caches": {past_name(layer.layer, f): layer.shape(f, 1, C) for layer in layout.layers for f in FIELDS},
                "rows": {past_name(layer.layer, f): rows_name(layer.layer, f)
                         for layer in layout.layers for f in FIELDS},
                "host": "feed the caches with P valid rows (the rest finite: start from zeros); copy the first n "
                        "rows of each present_rows output into rows P..P+n-1 of its cache; pad a prefill chunk "
                        f"of n < {CHUNK} tokens with any id and keep its first n rows of logits",
            }}


def save_sharing_weights(directory: Path, models: dict[str, onnx.ModelProto]) -> None:
    """Save the models; the first one's large initializers go to WEIGHTS, and every later model's
    initializer of the same name and bytes points at the same bytes there instead of a copy."""
    (first, proto), *rest = models.items()
    data = {t.name: t.raw_data for t in proto.graph.initializer}
    onnx.save_model(proto, directory / first, save_as_external_data=True, all_tensors_to_one_file=True,
                    location=WEIGHTS, size_threshold=1024)
    stored = {t.name: t for t in onnx.load(directory / first, load_external_data=False).graph.initializer
              if t.data_location == onnx.TensorProto.EXTERNAL}
    for name, other in rest:
        for tensor in other.graph.initializer:
            shared = stored.get(tensor.name)
            if shared is not None and tensor.raw_data == data[tensor.name] and list(tensor.dims) == list(shared.dims):
                tensor.ClearField("raw_data")
                tensor.data_location = onnx.TensorProto.EXTERNAL
                tensor.external_data.extend(shared.external_data)
        onnx.save_model(other, directory / name)


def usability(model_path: Path) -> dict[str, dict]:
    """`check_onnx_model_mobile_usability`'s partition figures for NNAPI and CoreML MLProgram: the model
    after ORT's basic optimizations, its shapes inferred, each node counted when the provider lists its
    operator and its inputs have fixed shapes."""
    from onnxruntime.tools.mobile_helpers.usability_checker import check_coreml_partitions, check_nnapi_partitions
    from onnxruntime.tools.onnx_model_utils import ModelProtoWithShapeInfo, optimize_model

    with tempfile.TemporaryDirectory() as tmp:
        optimized = Path(tmp) / Path(model_path).name
        optimize_model(Path(model_path), optimized, use_external_initializers=True)
        model = ModelProtoWithShapeInfo(optimized).model_with_shape_info
    infos = {"NNAPI": check_nnapi_partitions(model, True),
             "CoreML MLProgram": check_coreml_partitions(model, True, "coreml_supported_mlprogram_ops.md")}
    return {ep: {"nodes": i.num_nodes, "supported": i.num_supported_nodes, "partitions": i.num_partitions,
                 "percent": 100.0 * i.num_supported_nodes / i.num_nodes, "unsupported_ops": sorted(i.unsupported_ops)}
            for ep, i in infos.items()}


# -- the host loop ------------------------------------------------------------------------------
@dataclass(frozen=True)
class MobileState:
    """The mobile models' caches (numpy, capacity rows, P valid) and P."""

    arrays: dict  # past name -> np.ndarray [1, .., capacity, ..]
    past: int
    writes: CacheWrites = dataclasses.field(default_factory=CacheWrites)  # the steps run on these caches
    index: int = 0  # how many of them came before this state

    def copy(self) -> "MobileState":
        """An independent state (copies the caches): for running two continuations."""
        return MobileState({name: array.copy() for name, array in self.arrays.items()}, self.past)


class MobileRunner:
    """What an ORT Mobile app does with an `export --mobile`, in Python: prefill in chunks of CHUNK (the
    last one padded; a single token by the decode model), decode by the decode model, and after every
    call the new rows copied into the caches. Batch 1; contexts up to the capacity."""

    name = "onnxruntime-mobile"

    def __init__(self, path: str | Path, threads: int | None = None,
                 providers: tuple[str, ...] = ("CPUExecutionProvider",)) -> None:
        """`providers`: ONNX Runtime execution providers to ask for (where a build has NNAPI or CoreML)."""
        import onnxruntime as ort

        path = Path(path)
        self.manifest = read_manifest(path)
        self.record = self.manifest.get("mobile")
        if not isinstance(self.record, dict):
            raise SessaExportError(f"{path}: this export has no ORT Mobile models; re-run `sessa-export export "
                                   "... --mobile`")
        if self.manifest.get("quantization") is not None:
            raise SessaExportError(f"{path} is a quantized export: its ORT Mobile models are not quantized and not "
                                   "carried over; run them from the float32 export made with --mobile")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.sessions = {}
        for key, sequence in (("mobile_decode_file", 1), ("mobile_prefill_file", CHUNK)):
            file = member(path, self.manifest, key, DECODE_MODEL if sequence == 1 else PREFILL_MODEL,
                          verify=not self.sessions)  # every recorded file is checked once
            try:
                self.sessions[sequence] = ort.InferenceSession(str(file), options, providers=list(providers))
            except Exception as exc:  # onnxruntime raises its own exception types for broken models
                raise SessaExportError(f"{file}: ONNX Runtime cannot load it ({str(exc).splitlines()[0]}); "
                                       "re-run the export") from None
        self.layout = state_layout(self.manifest)
        self.capacity = self.max_len = int(self.record["capacity"])
        self.input_name = self.manifest["input"]["name"]
        self.tokens = self.manifest["input"]["kind"] == "tokens"
        self.width = self.manifest["input"].get("width")
        self.vocab_size = self.manifest["input"].get("vocab_size")
        self.logits_name = self.manifest["outputs"][0]

    def empty_state(self, batch: int) -> MobileState:
        if batch != 1:
            raise SessaExportError(f"the ORT Mobile models run batch 1, not {batch}")
        return MobileState({past_name(layer.layer, f): np.zeros(layer.shape(f, 1, self.capacity), np.float32)
                            for layer, f in self.layout.tensors()}, 0)

    def step(self, input_ids: np.ndarray, state: MobileState) -> tuple[np.ndarray, MobileState]:
        ids = np.asarray(input_ids)
        if not isinstance(state, MobileState):
            raise SessaExportError(f"pass the MobileState of empty_state() or step(), not {type(state).__name__}")
        if ids.ndim < 2 or ids.shape[0] != 1 or ids.shape[1] < 1:
            raise SessaExportError(f"{self.input_name} must be [1, sequence >= 1], got {list(ids.shape)}")
        total = state.past + ids.shape[1]
        if total > self.capacity:
            raise SessaExportError(f"context of {total} positions exceeds the ORT Mobile models' capacity "
                                   f"{self.capacity}")
        logits = []
        with state.writes.lock:
            index = state.writes.begin(state.index, state.past)
            past = state.past
            while past < total:
                n = min(total - past, CHUNK)
                sequence = 1 if n == 1 else CHUNK
                chunk = np.zeros((1, sequence, *ids.shape[2:]), np.int32 if self.tokens else np.float32)
                chunk[:, :n] = ids[:, past - state.past:past - state.past + n]
                logits.append(self._run(sequence, chunk, past, state.arrays, n))
                past += n
        return np.concatenate(logits, axis=1), MobileState(state.arrays, total, state.writes, index)

    def _run(self, sequence: int, chunk: np.ndarray, past: int, caches: dict, n: int) -> np.ndarray:
        """One call of the `sequence` model at P = past; its first n new rows copied into the caches."""
        session = self.sessions[sequence]
        feed = {self.input_name: chunk, PAST_LENGTH: np.array([past], np.int32), **caches}
        names = [self.logits_name, *self.record["rows"].values()]
        outputs = dict(zip(names, session.run(names, feed)))
        for (layer, field), (name, cache) in zip(self.layout.tensors(), caches.items()):
            axis = self.layout.position_axis(field)
            rows = np.take(outputs[self.record["rows"][name]], range(n), axis=axis)
            index = [slice(None)] * cache.ndim
            index[axis] = slice(past, past + n)
            cache[tuple(index)] = rows
        return outputs[self.logits_name][:, :n]

    def state_arrays(self, state: MobileState) -> dict[str, np.ndarray]:
        return {name: np.take(array, range(state.past), axis=self.layout.position_axis(self.layout.field_of(name)))
                for name, array in state.arrays.items()}


__all__ = ["CHUNK", "MAX_CAPACITY", "DECODE_MODEL", "PREFILL_MODEL", "WEIGHTS", "MobileBuilder", "MobileRunner",
           "MobileState", "capacity", "rows_name", "write_mobile", "usability"]
