"""The state contract: what a step carries between calls, owned in one place (spec §2).

Per Sessa layer the state is four tensors over the P positions already processed:

    key, value        [batch, kv_heads, past, head_dim]   forward keys (after RoPE) and values
    feedback_key      [batch, past, d_model]              k_b
    feedback_state    [batch, past, d_model]              s

`StateLayout` says, for every layer, those fields, their axes (symbolic "batch" and "past"; the
rest fixed), the names of the past (input) and present (output) tensors, and which axis holds
positions. The exporters, runners, validation, benchmarks and the C++ example read it (the
manifest's "state" list is `StateLayout.to_manifest()`); nothing guesses a tensor's kind.

Calling convention of a step: the data input, then the state tensors in `names()` order (layer
by layer, fields in FIELDS order). Four contracts (`CONTRACTS`):

- "grow": the state tensors hold exactly P positions (axis "past"); the ONNX graph returns
  `present.{i}.{field}` with P + S positions, which become the next step's past.
- "inplace": the state tensors are caches of a capacity C (axis "capacity") of which the first P
  rows are valid, and one more input, `past_sequence_length` (int64 scalar), gives P. The step
  writes rows P..P+S-1 and returns the same caches as `present.{i}.{field}`: bound to the same
  buffers as the inputs, nothing is copied. The caller grows C with the context (`capacity_for`:
  whole blocks of CAPACITY_BLOCK positions, at most max_len) and copies the valid rows once when
  it does.
- "fixed": "inplace" with C fixed when the module is compiled (the TVM modules: compile --max-len):
  the caller passes P with the caches, a context past C is refused, and the step writes the caches it
  is given without returning them (no present outputs).
- "genai": "inplace" as ONNX Runtime GenAI binds a decoder with `past_present_share_buffer`: each
  layer's key / value are KV layer i (`past_key_values.{i}.key` / `.value`), its feedback_key /
  feedback_state KV layer L + i with one head of width d_model ([batch, 1, capacity, d_model]),
  and the length is given as `attention_mask` [batch, P + S] (all ones; P = its width − S).
  Tensors keep their FIELDS names everywhere else (`names()`); `graph_name` maps them.

The state's precision (`STATE_DTYPES`: float32, float16, bfloat16) is the layout's too, chosen
apart from the weights': the caches store it, every read casts to float32 and the recurrence
accumulates in float32 (spec §3). numpy has no bfloat16, so a bfloat16 state is held in uint16
arrays of the same bits (`StateDType.storage`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Mapping, Sequence

import numpy as np

from .errors import SessaExportError

FIELDS = ("key", "value", "feedback_key", "feedback_state")
BATCH, PAST = "batch", "past"  # the symbolic axes of every state tensor
GROW, INPLACE, GENAI, FIXED = "grow", "inplace", "genai", "fixed"
CONTRACTS = (GROW, INPLACE, GENAI, FIXED)
EXPORT_CONTRACTS = (GROW, INPLACE, GENAI)  # an ONNX export's (--state); FIXED is a compiled module's
POSITIONS = {GROW: PAST, INPLACE: "capacity", GENAI: "capacity", FIXED: "capacity"}  # each contract's positions axis
PAST_LENGTH = "past_sequence_length"  # the in-place contract's input: P
ATTENTION_MASK = "attention_mask"  # the genai contract's: [batch, P + S]
FEEDBACK_FIELDS = ("feedback_key", "feedback_state")
# In-place capacities are whole blocks of positions. A decode reads the whole capacity (ONNX Runtime's
# CPU attention has no valid-length stop) and a growth copies the P valid rows once: 64 keeps both near
# 3% at a context of 1024 (half a block read in vain on average, 2P rows copied every 64 steps), where
# 256 read 12.5% more than the context on average and 25% at 1024 itself.
CAPACITY_BLOCK = 64


@dataclass(frozen=True)
class StateDType:
    """One precision the state can be stored in: its numpy storage, ONNX type and size."""

    name: str
    storage: type  # the numpy dtype of the arrays that hold it
    onnx_type: int  # onnx.TensorProto element type
    itemsize: int

    def to_float32(self, array: np.ndarray) -> np.ndarray:
        """The stored values as float32."""
        if self.name == "bfloat16":
            return (np.asarray(array, np.uint16).astype(np.uint32) << 16).view(np.float32)
        return np.asarray(array).astype(np.float32)


STATE_DTYPES = {d.name: d for d in (StateDType("float32", np.float32, 1, 4), StateDType("float16", np.float16, 10, 2),
                                    StateDType("bfloat16", np.uint16, 16, 2))}


def state_dtype(name: str) -> StateDType:
    """The STATE_DTYPES entry called `name`; a clear error for any other."""
    if name not in STATE_DTYPES:
        raise SessaExportError(f"unknown --state-dtype {name!r}; choose one of {', '.join(STATE_DTYPES)}")
    return STATE_DTYPES[name]


def capacity_for(positions: int, max_len: int | None) -> int:
    """The in-place capacity that holds `positions`: whole CAPACITY_BLOCKs, at most max_len."""
    if max_len is not None and positions > max_len:
        raise SessaExportError(f"context of {positions} positions exceeds the model's max_len={max_len}")
    capacity = -(-positions // CAPACITY_BLOCK) * CAPACITY_BLOCK
    return min(capacity, max_len) if max_len is not None else capacity


def past_name(layer: int, field: str) -> str:
    """The name of a state input: what a step reads."""
    return f"past_key_values.{layer}.{field}"


def present_name(layer: int, field: str) -> str:
    """The name of a state output: what a step returns, fed back as `past_name` next step."""
    return f"present.{layer}.{field}"


@dataclass(frozen=True)
class LayerLayout:
    """One Sessa layer's share of the state: its head layout and the axes of its four fields."""

    layer: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_model: int
    use_forward_rope: bool
    gamma_max: float

    def axes(self, field: str) -> list:
        """Axes of `field`: "batch", "past" and fixed widths."""
        if field in ("key", "value"):
            return [BATCH, self.n_kv_heads, PAST, self.head_dim]
        if field in ("feedback_key", "feedback_state"):
            return [BATCH, PAST, self.d_model]
        raise KeyError(field)

    def shape(self, field: str, batch: int, positions: int) -> list[int]:
        """The concrete shape of `field` for `batch` sequences of `positions` positions."""
        return [batch if a == BATCH else positions if a == PAST else a for a in self.axes(field)]

    def values_per_position(self) -> int:
        """State values one position adds for one sequence: 2·Hkv·d + 2·D (spec §2)."""
        return 2 * self.n_kv_heads * self.head_dim + 2 * self.d_model


@dataclass(frozen=True)
class StateLayout:
    """Every layer's state, in call order, under one contract (CONTRACTS) and one precision (STATE_DTYPES)."""

    layers: tuple[LayerLayout, ...]
    contract: str = GROW
    dtype: str = "float32"  # a STATE_DTYPES name
    capacity: int | None = None  # FIXED: the compiled capacity

    @classmethod
    def from_mixers(cls, mixers: Sequence, contract: str = GROW, dtype: str = "float32") -> StateLayout:
        """The layout of a model's Sessa mixers (sessa_export.model.SessaMixer), in order, under an export's
        `contract` (EXPORT_CONTRACTS)."""
        if contract not in EXPORT_CONTRACTS:
            raise SessaExportError(f"unknown --state {contract!r}; choose one of {', '.join(EXPORT_CONTRACTS)}")
        state_dtype(dtype)
        return cls(tuple(LayerLayout(i, m.n_heads, m.n_kv_heads, m.head_dim, m.D, bool(m.use_forward_rope),
                                     float(m.gamma_max)) for i, m in enumerate(mixers)), contract, dtype)

    @classmethod
    def from_manifest(cls, entries: object, contract: object = None, where: str = "sessa_config.json",
                      dtype: str = "float32") -> StateLayout:
        """Read the manifest's "state" list and "state_contract" (what `to_manifest` and `contract_manifest`
        wrote; no contract: "grow"; no "dtype" in it: `dtype`, the model's); a clear error when they do not fit."""
        kind = GROW if contract is None else contract.get("kind") if isinstance(contract, dict) else None
        if kind not in CONTRACTS:
            raise SessaExportError(f"{where}: unknown \"state_contract\" {contract!r}; re-run the export or compile")
        rerun = "re-run the compile" if kind == FIXED else "re-run the export"  # "fixed": a TVM library's
        dtype = contract.get("dtype", dtype) if isinstance(contract, dict) else dtype
        if dtype not in STATE_DTYPES:
            raise SessaExportError(f"{where}: unknown state dtype {dtype!r}; {rerun}")
        keys = ("n_heads", "n_kv_heads", "head_dim", "d_model")
        if not isinstance(entries, list):
            raise SessaExportError(f"{where}: \"state\" must be a list of layers; {rerun}")
        layers = []
        for i, entry in enumerate(entries):
            ok = isinstance(entry, dict) and all(type(entry.get(k)) is int and entry[k] > 0 for k in keys)
            if not ok:
                raise SessaExportError(f"{where}: \"state\" entry {i} needs positive integers {', '.join(keys)}; "
                                       f"{rerun}")
            layers.append(LayerLayout(i, *(entry[k] for k in keys), bool(entry.get("use_forward_rope", False)),
                                     float(entry.get("gamma_max", 0.0))))
        capacity = contract.get("capacity") if kind == FIXED else None
        if kind == FIXED and not (type(capacity) is int and capacity > 0):
            raise SessaExportError(f"{where}: the \"fixed\" state contract needs a positive \"capacity\"; {rerun}")
        layout = cls(tuple(layers), kind, dtype, capacity)
        # manifests before "fields" was written hold the same; a "fixed" one of 2026-12-03 also has presents
        checked = ("past", "shapes") if kind == FIXED else ("past", "present", "shapes")
        if any({k: e.get(k) for k in checked} != {k: w[k] for k in checked}
               for e, w in zip(entries, layout.to_manifest())):
            raise SessaExportError(f"{where}: \"state\" names or shapes differ from the state contract; {rerun}")
        return layout

    def to_manifest(self) -> list[dict]:
        """The manifest's "state" list: per layer its names, axes, fields in order and head layout (and its
        present names, but for "fixed", whose step returns no state)."""
        return [{
            "layer": s.layer,
            "fields": list(FIELDS),
            "past": {f: self.graph_name(s.layer, f) for f in FIELDS},
            **({} if self.contract == FIXED else
               {"present": {f: self.graph_name(s.layer, f, present=True) for f in FIELDS}}),
            "shapes": {f: self.axes(s, f) for f in FIELDS},
            "n_heads": s.n_heads, "n_kv_heads": s.n_kv_heads, "head_dim": s.head_dim,
            "d_model": s.d_model, "use_forward_rope": s.use_forward_rope, "gamma_max": s.gamma_max,
        } for s in self.layers]

    def contract_manifest(self) -> dict:
        """The manifest's "state_contract": which form, and for the in-place forms their length input,
        capacity rule and which outputs alias which inputs (none for "fixed")."""
        if self.contract == GROW:
            return {"kind": GROW, "dtype": self.dtype}
        if self.contract == FIXED:
            return {"kind": FIXED, "dtype": self.dtype, "capacity_axis": POSITIONS[FIXED], "capacity": self.capacity,
                    "capacity_rule": "fixed when compiled (compile --max-len); a longer context is refused",
                    "in_place": "the step writes rows P..P+S-1 of the caches passed to it and returns none of them"}
        length = ({"past_length_input": PAST_LENGTH} if self.contract == INPLACE else
                  {"attention_mask_input": ATTENTION_MASK, "past_length": "the attention mask's width minus the new "
                   "positions (its values are not read)"})
        return {"kind": self.contract, "dtype": self.dtype, **length, "capacity_axis": POSITIONS[self.contract],
                "capacity_block": CAPACITY_BLOCK,
                "capacity_rule": f"whole blocks of {CAPACITY_BLOCK} positions, at most max_len; "
                                 "the caller copies the valid rows into larger caches when one fills",
                "aliases": {present: past for present, past in self.present_of().items()}}

    def axes(self, layer: LayerLayout, field: str) -> list:
        """Axes of `field` of `layer` as the graph holds it (positions axis "past" or "capacity"; genai gives
        the feedback fields a head axis of 1)."""
        axes = [POSITIONS[self.contract] if a == PAST else a for a in layer.axes(field)]
        return axes[:1] + [1] + axes[1:] if self.contract == GENAI and field in FEEDBACK_FIELDS else axes

    def graph_name(self, layer: int, field: str, present: bool = False) -> str:
        """The graph's name of a state input (or output, `present`): FIELDS names, or genai's KV layers."""
        if self.contract != GENAI:
            return present_name(layer, field) if present else past_name(layer, field)
        kv_layer = layer + len(self.layers) if field in FEEDBACK_FIELDS else layer
        kind = "key" if field in ("key", "feedback_key") else "value"
        return f"present.{kv_layer}.{kind}" if present else f"past_key_values.{kv_layer}.{kind}"

    def __len__(self) -> int:
        return len(self.layers)

    def tensors(self) -> Iterator[tuple[LayerLayout, str]]:
        """(layer, field) of every state tensor, in call order."""
        for layer in self.layers:
            for field in FIELDS:
                yield layer, field

    def names(self) -> list[str]:
        """The past (input) names in call order."""
        return [past_name(layer.layer, field) for layer, field in self.tensors()]

    def present_of(self) -> dict[str, str]:
        """The graph's present name -> the past name (`names()`) it feeds next step."""
        return {self.graph_name(layer.layer, f, present=True): past_name(layer.layer, f) for layer, f in self.tensors()}

    def field_of(self, name: str) -> str:
        """The field of a past tensor name (`past_key_values.{i}.{field}`)."""
        field = name.rsplit(".", 1)[-1]
        if field not in FIELDS or name != past_name(int(name.split(".")[1]), field):
            raise KeyError(name)
        return field

    def position_axis(self, field: str) -> int:
        """The axis of `field` that counts positions, as the graph holds it."""
        return self.axes(LayerLayout(0, 1, 1, 1, 1, False, 0.0), field).index(POSITIONS[self.contract])

    @property
    def precision(self) -> StateDType:
        """The state's precision (STATE_DTYPES)."""
        return STATE_DTYPES[self.dtype]

    def shape(self, layer: LayerLayout, field: str, batch: int, positions: int) -> list[int]:
        """The concrete shape of a state tensor as the graph holds it."""
        return [batch if a == BATCH else positions if a == POSITIONS[self.contract] else a
                for a in self.axes(layer, field)]

    def zeros(self, batch: int, positions: int = 0) -> dict[str, np.ndarray]:
        """Every state tensor, zero-filled in the state's storage dtype as the graph holds it, named by `names()`."""
        return {past_name(layer.layer, f): np.zeros(self.shape(layer, f, batch, positions), self.precision.storage)
                for layer, f in self.tensors()}

    def positions_held(self, batch: int, shapes: Mapping[str, Sequence[int]]) -> int:
        """The positions a state of these tensor shapes holds (grow: P; inplace: the capacity C); a clear
        error when it does not fit."""
        expected = self.names()
        missing = [name for name in expected if name not in shapes]
        unexpected = [name for name in shapes if name not in expected]
        if missing or unexpected:
            raise SessaExportError("the state does not fit the model: "
                                   + "; ".join(f"{what}: {', '.join(names)}" for what, names in
                                               (("missing", missing), ("unexpected", unexpected)) if names))
        held, positions = set(), POSITIONS[self.contract]
        for layer, field in self.tensors():
            name, axes = past_name(layer.layer, field), self.axes(layer, field)
            shape, want = list(shapes[name]), [batch if a == BATCH else a for a in axes]
            if len(shape) != len(axes) or any(a != positions and w != got for a, w, got in zip(axes, want, shape)):
                raise SessaExportError(f"state tensor {name} has shape {shape}, expected {want}")
            held.add(shape[axes.index(positions)])
        if len(held) > 1:
            raise SessaExportError(f"the state tensors hold different numbers of past positions: {sorted(held)}")
        return held.pop() if held else 0

    def values_per_position(self) -> int:
        """State values one position adds for one sequence, over all layers."""
        return sum(layer.values_per_position() for layer in self.layers)


__all__ = ["FIELDS", "CONTRACTS", "GROW", "INPLACE", "GENAI", "PAST_LENGTH", "ATTENTION_MASK", "STATE_DTYPES",
           "StateDType", "state_dtype", "LayerLayout", "StateLayout", "capacity_for",
           "past_name", "present_name"]
