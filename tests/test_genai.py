"""`export --genai`: ONNX Runtime GenAI runs the folder as it is, with the same bytes as `sessa-export run`.

The genai contract is the in-place one under the names GenAI binds (KV layers 0..L-1 the forward
keys and values, L..2L-1 the feedback keys and states, the length from `attention_mask`): the
parity checks of the other contracts hold against PyTorch, and the bound buffers are written in
place. `onnxruntime_genai.Generator` then decodes the bundled model greedily; its bytes must be the
CLI's. The GenAI tests skip where the onnxruntime-genai wheel is not installed.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from parity import CONFIGS, PARITY_CHECKS, assert_clean_error, assert_written_in_place, cli, models_per_config
from sessa_export.artifact import read_manifest, state_layout
from sessa_export.data import BUNDLED_MODEL
from sessa_export.runtime import OrtRunner
from sessa_export.state import GENAI
from sessa_export.to_onnx import export_onnx
from sessa_export.tracer import trace

pytestmark = pytest.mark.usefixtures("one_torch_thread")
PROMPT = "def main():\n    "


@pytest.fixture(scope="module")
def genai_exports(make_lm, tmp_path_factory):
    root = tmp_path_factory.mktemp("genai")
    return {name: (model, export_onnx(trace(model), root / name, state=GENAI))
            for name, model in models_per_config(make_lm).items()}


@pytest.fixture(scope="module")
def bundled(tmp_path_factory):
    out = tmp_path_factory.mktemp("genai-bundled") / "out"
    result = cli("export", BUNDLED_MODEL, "-o", out, "--genai")
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.parametrize("check", PARITY_CHECKS.values(), ids=PARITY_CHECKS.keys())
@pytest.mark.parametrize("name", CONFIGS)
def test_parity(genai_exports, name, check):
    model, out = genai_exports[name]
    check(model, OrtRunner(out, threads=1))


def test_the_names_genai_binds(genai_exports):
    import onnx

    model, out = genai_exports["GQA-mlp-tied"]
    layers = model.config.n_layers
    graph = onnx.load(str(out / "model.onnx")).graph
    inputs = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input}
    outputs = {o.name for o in graph.output}
    assert set(inputs) == {"input_ids", "attention_mask"} | {f"past_key_values.{i}.{kind}" for i in range(2 * layers)
                                                             for kind in ("key", "value")}
    assert outputs == {"logits"} | {f"present.{i}.{kind}" for i in range(2 * layers) for kind in ("key", "value")}
    mixer = model.layers[0].mixer
    assert inputs["past_key_values.0.key"] == ["batch", mixer.n_kv_heads, "capacity", mixer.head_dim]
    assert inputs[f"past_key_values.{layers}.value"] == ["batch", 1, "capacity", mixer.D]  # layer 0's feedback_state
    config = json.loads((out / "genai_config.json").read_text())
    assert config["search"]["past_present_share_buffer"] and config["model"]["decoder"]["num_hidden_layers"] == 2 * layers
    assert state_layout(read_manifest(out)).contract == GENAI


def test_steps_write_the_bound_buffers_in_place(genai_exports):
    model, out = genai_exports["GQA-mlp-tied"]
    assert_written_in_place(OrtRunner(out, threads=1), np.random.default_rng(4).integers(0, model.config.vocab_size,
                                                                                         (2, 12)))


def genai_greedy(folder, prompt: str, new: int) -> bytes:
    """`new` greedy tokens of onnxruntime_genai's Generator on `folder`, as bytes (a byte-level model)."""
    og = pytest.importorskip("onnxruntime_genai")
    model = og.Model(str(folder))  # the folder as it was written: nothing added
    tokenizer = og.Tokenizer(model)
    ids = tokenizer.encode(prompt)
    assert list(ids) == list(prompt.encode())  # the byte-level tokenizer: an id is its byte
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + new, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(ids)
    tokens = []
    while not generator.is_done():
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    assert tokenizer.decode(tokens) == bytes(tokens).decode("utf-8", "replace") and len(tokens) == new
    return bytes(tokens)


def cli_greedy(folder, prompt: str, new: int) -> bytes:
    result = cli("run", folder, "--prompt", prompt, "--max-new-tokens", new)
    assert result.exit_code == 0, result.output
    return result.stdout_bytes.rstrip(b"\n")[:new]


def test_genai_generates_the_bytes_of_run(bundled):
    files = sorted(p.name for p in bundled.iterdir())
    assert genai_greedy(bundled, PROMPT, 96) == cli_greedy(bundled, PROMPT, 96)
    assert sorted(p.name for p in bundled.iterdir()) == files


def test_a_quantized_genai_folder_still_loads(bundled, tmp_path):
    """quantize carries genai_config.json and the tokenizer files: GenAI runs the int8 folder as it is."""
    out = tmp_path / "int8"
    assert cli("quantize", bundled, "--mode", "int8", "-o", out).exit_code == 0
    assert genai_greedy(out, PROMPT, 32) == cli_greedy(out, PROMPT, 32)


def test_bad_genai_options(tmp_path):
    out = tmp_path / "x"
    assert_clean_error(cli("export", BUNDLED_MODEL, "-o", out, "--genai", "--state", "grow"), "--genai", "--state grow")
    assert_clean_error(cli("export", BUNDLED_MODEL, "-o", out, "--state", "genai"), "pass --genai")
    assert_clean_error(cli("export", BUNDLED_MODEL, "-o", out, "--genai", "--state-dtype", "bfloat16"),
                       "float32 or float16")
    assert not out.exists()
