"""`sessa-export quantize` (int8, int4, fp16) and the quality report of `validate` on quantized exports.

Quality is measured as `validate` does (sessa_export/quality.py) on the bundled model
(sessa_export/assets/tiny): 16384 bytes of the held-out text as 64 windows of 256 bytes spread over
the whole text, each prefilled in chunks of 128 with the state carried, against the float32 ONNX export of the same
checkpoint (which matches PyTorch to 1e-4, test_onnx_export.py); one CLI test runs the real
`validate --checkpoint` path against PyTorch. Sizes are those of the linear and embedding weights'
initializers (with their scales and zero points) against the float32 ones.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest

from conftest import randomize_weights
from parity import assert_clean_error, cli
from sessa_export import quality
from sessa_export.checkpoint import load_checkpoint, save_checkpoint
from sessa_export.config import SessaConfig
from sessa_export.data import BUNDLED_MODEL, heldout_bytes
from sessa_export.errors import SessaExportError
from sessa_export.model import SessaLM
from sessa_export.to_onnx import export_onnx
from sessa_export.ops import feedback_attention as fa_op
from sessa_export.to_onnx.quantize import export_size, find_weights, linear_weight_bytes, quantize_export
from sessa_export.runtime import OrtRunner
from sessa_export.tracer import trace

MODES = ("int8", "int4", "fp16")
BUNDLED = (BUNDLED_MODEL / "model.safetensors").is_file()
# Weight bytes (with scales and zero points) against float32: int8 (block 32) is ~0.29, int4 ~0.16,
# fp16 0.5; nothing quantized would be 1.0.
MAX_WEIGHT_RATIO = {"int8": 0.35, "int4": 0.25, "fp16": 0.55}
MIN_WEIGHT_RATIO = {"int8": 0.2, "int4": 0.1, "fp16": 0.45}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """The bundled model, or (before it exists) a small random one shaped like it."""
    if BUNDLED:
        return BUNDLED_MODEL
    config = SessaConfig(vocab_size=256, d_model=160, n_layers=2, n_heads=4, n_kv_heads=2, mlp_ratio=3.0,
                         tie_embeddings=True)
    model = randomize_weights(SessaLM(config), seed=0, std=0.05).eval()
    return save_checkpoint(model, tmp_path_factory.mktemp("ckpt") / "random")


@pytest.fixture(scope="module")
def fp32_export(checkpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fp32") / "export"
    return export_onnx(trace(load_checkpoint(checkpoint)), out, source=str(Path(checkpoint).resolve()))


@pytest.fixture(scope="module")
def quantized(fp32_export, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("quantized")
    for mode in MODES:
        quantize_export(fp32_export, root / mode, mode)
    return {mode: root / mode for mode in MODES}


@pytest.fixture(scope="module")
def text_ids() -> np.ndarray:
    return quality.text_ids(heldout_bytes(), quality.DEFAULT_BYTES, 256, quality.DEFAULT_WINDOW)


@pytest.fixture(scope="module")
def reference_logits(fp32_export, text_ids) -> np.ndarray:
    return quality.run_logits(OrtRunner(fp32_export, threads=1), text_ids, quality.DEFAULT_CHUNK)


def model_of(path: Path) -> onnx.ModelProto:
    return onnx.load(str(path / "model.onnx"))


def manifest_of(path: Path) -> dict:
    return json.loads((path / "sessa_config.json").read_text())


# -- what each mode writes -----------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
def test_weights_shrink(mode, fp32_export, quantized):
    ratio = linear_weight_bytes(quantized[mode]) / linear_weight_bytes(fp32_export)
    assert MIN_WEIGHT_RATIO[mode] <= ratio <= MAX_WEIGHT_RATIO[mode], f"{mode}: weights are {ratio:.3f}x of fp32"
    file_ratio = export_size(quantized[mode]) / export_size(fp32_export)
    assert file_ratio <= MAX_WEIGHT_RATIO[mode] + 0.05, f"{mode}: model file is {file_ratio:.3f}x of fp32"


@pytest.mark.parametrize("mode", MODES)
def test_feedback_attention_survives_and_checker_passes(mode, fp32_export, quantized):
    path = quantized[mode]
    onnx.checker.check_model(str(path / "model.onnx"), full_check=True)
    model = model_of(path)
    n_layers = manifest_of(fp32_export)["config"]["n_layers"]
    fa_nodes = [n for n in model.graph.node if n.domain == fa_op.DOMAIN and n.op_type == fa_op.OP_TYPE]
    assert len(fa_nodes) == n_layers
    assert [(f.domain, f.name) for f in model.functions] == [(fa_op.DOMAIN, fa_op.OP_TYPE)]
    assert any(o.domain == fa_op.DOMAIN and o.version == fa_op.VERSION for o in model.opset_import)
    ops = Counter(n.op_type for n in model.graph.node)
    expected = {"int8": "MatMulNBits", "int4": "MatMulNBits", "fp16": "MatMul"}[mode]
    assert ops[expected] >= 1
    if mode != "fp16":
        # the model is tied: its table stays float32, read by the Gather and (transposed) by the head's MatMul
        assert ops["GatherBlockQuantized"] == 0 and ops["Gather"] == 1
        bits = {a.name: a.i for n in model.graph.node if n.op_type == "MatMulNBits" for a in n.attribute}["bits"]
        assert bits == {"int8": 8, "int4": 4}[mode]
        assert ops["MatMul"] == 1, f"{mode}: {ops['MatMul']} float MatMul left (every other linear layer is quantized)"
        # a mixer's q/k/v/proj_fb/gamma_ctx read one activation: one MatMulNBits over them, then a Split
        nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
        assert len({n.input[0] for n in nbits}) == len(nbits)
        assert ops["Split"] >= n_layers + Counter(n.op_type for n in model_of(fp32_export).graph.node)["Split"]
    left = {w.module.rsplit(".", 1)[-1] for w in find_weights(model)}  # float32 weights still in the model
    assert left == ({"gamma_ctx"} if mode == "fp16" else {"embed"}), left  # fp16 keeps the gain path in float32


@pytest.mark.parametrize("mode", MODES)
def test_manifest_records_mode_and_source(mode, fp32_export, quantized):
    manifest, source = manifest_of(quantized[mode]), manifest_of(fp32_export)
    quant = manifest["quantization"]
    assert quant["mode"] == mode
    assert quant["block_size"] == (None if mode == "fp16" else 32)
    assert quant["keep"] == [] and quant["kept_weights"] == []
    assert quant["source_sha256"] == hashlib.sha256((fp32_export / "model.onnx").read_bytes()).hexdigest()
    assert quant["source_size_bytes"] == export_size(fp32_export)
    assert quant["size_bytes"] == export_size(quantized[mode])
    assert manifest["weights_sha256"] == source["weights_sha256"]
    assert manifest["dtype"] == ("float16" if mode == "fp16" else "float32")
    assert not list(quantized[mode].parent.glob(f".{mode}.*")), "temporary directory left behind"
    umask = os.umask(0)
    os.umask(umask)
    assert quantized[mode].stat().st_mode & 0o777 == 0o777 & ~umask, "the export directory must not be private"


def test_fp16_types_and_float32_islands(quantized):
    """State and logits are float16; the softmaxes, LayerNorms and RoPE angles run in float32."""
    model = model_of(quantized["fp16"])
    F16, F32 = onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT
    for value in [*model.graph.input[1:], *model.graph.output]:
        assert value.type.tensor_type.elem_type == F16, value.name
    produced, checked = {}, Counter()

    def check_float32_inputs(graph: onnx.GraphProto) -> None:
        """Attention (in the forward attention's If and Loop) and LayerNormalization take float32: their
        first input is a Cast to float32, or a Slice of one."""
        produced.update({o: n for n in graph.node for o in n.output})
        for node in graph.node:
            if node.op_type in ("Attention", "LayerNormalization"):
                source = produced.get(node.input[0])
                while source is not None and source.op_type == "Slice":
                    source = produced.get(source.input[0])
                assert source is not None and source.op_type == "Cast" and \
                    next(a.i for a in source.attribute if a.name == "to") == F32, node.name
                checked[node.op_type] += 1
            for attribute in node.attribute:
                if attribute.type == onnx.AttributeProto.GRAPH:
                    check_float32_inputs(attribute.g)

    check_float32_inputs(model.graph)
    layers = manifest_of(quantized["fp16"])["config"]["n_layers"]
    assert checked["Attention"] == 2 * layers and checked["LayerNormalization"] >= layers, checked
    inits = {i.name: i.data_type for i in model.graph.initializer}
    assert all(t == F32 for n, t in inits.items() if n.startswith("rope_inv_freq"))
    assert inits.get("embed.weight", inits.get("embed.weight_fp16")) == F16  # the table the tied head reads
    runner = OrtRunner(quantized["fp16"], threads=1)
    state = runner.empty_state(1)
    assert all(v.numpy().dtype == np.float16 for v in state.values())
    logits, state = runner.step(np.array([[1, 2, 3]]), state)
    assert all(v.numpy().dtype == np.float16 for v in state.values())
    logits, state = runner.step(np.arange(300)[None] % 256, state)  # the forward attention's 256-row blocks
    assert logits.dtype == np.float16 and np.isfinite(logits).all()
    assert all(v.numpy().dtype == np.float16 and v.numpy().shape[-2] == 303 for v in state.values())  # positions


# -- quality --------------------------------------------------------------------------------------------------

def quality_report(mode, quantized, text_ids, reference_logits) -> quality.QualityReport:
    logits = quality.run_logits(OrtRunner(quantized[mode], threads=1), text_ids, quality.DEFAULT_CHUNK)
    return quality.compare(mode, reference_logits, logits, text_ids, quality.DEFAULT_CHUNK)


@pytest.mark.parametrize("mode", MODES)
def test_quality_thresholds(mode, quantized, text_ids, reference_logits):
    if mode != "fp16" and not BUNDLED:
        pytest.skip("top-1 agreement is only meaningful on the trained bundled model (assets/tiny)")
    report = quality_report(mode, quantized, text_ids, reference_logits)
    assert report.ok, json.dumps(report.to_dict(), indent=1)
    assert report.positions == quality.DEFAULT_BYTES and report.windows == 64
    if BUNDLED:
        assert report.bpb_reference < 6.0, "the bundled model should predict its held-out text (uniform: 8)"
        assert abs(report.bpb_diff) < 0.01 * report.bpb_reference


def test_int4_bits_per_byte_within_3_percent(quantized, text_ids, reference_logits):
    """Meaningful on any model, trained or not (the top-1 bar needs the trained one)."""
    report = quality_report("int4", quantized, text_ids, reference_logits)
    assert report.bpb_increase <= 0.03, json.dumps(report.to_dict(), indent=1)
    assert report.kl_mean < 0.05


def test_quality_metrics_on_known_inputs():
    """compare() on hand-made logits: identical logits are perfect, a flipped argmax is counted."""
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 256, (1, 64))
    ref = rng.standard_normal((1, 64, 256)).astype(np.float32) * 3
    same = quality.compare("int8", ref, ref.copy(), ids, 16)
    assert same.top1_agreement == 1.0 and same.kl_max < 1e-12 and same.logits_error == 0 and same.ok
    assert same.bpb_diff == 0
    bad = ref.copy()
    bad[:, :8] = -bad[:, :8]  # 8 of 64 rows disagree
    worse = quality.compare("int8", ref, bad, ids, 16)
    assert worse.top1_agreement == pytest.approx(56 / 64) and worse.kl_mean > 0.01 and not worse.ok
    assert [c.ok for c in worse.checks] == [False, False]


@pytest.mark.parametrize("bits", (8, 4))
def test_fused_matmul_nbits_gives_the_separate_products(bits):
    """fuse_shared_input: three MatMulNBits of one activation (widths that are not one another's, one
    of a single column) as one over their weights side by side, then a Split, give the same outputs."""
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    from sessa_export.to_onnx.quantize import Weight, fuse_shared_input, quantize_nbits

    rng = np.random.default_rng(bits)
    widths, inputs = (48, 1, 80), 64
    weights = [rng.standard_normal((inputs, n)).astype(np.float32) for n in widths]
    nodes = [helper.make_node("MatMul", ["x", f"w{i}"], [f"y{i}"], name=f"mm{i}") for i in range(3)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [3, inputs])],
                              [helper.make_tensor_value_info(f"y{i}", onnx.TensorProto.FLOAT, [3, n])
                               for i, n in enumerate(widths)],
                              [numpy_helper.from_array(w, f"w{i}") for i, w in enumerate(weights)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    quantize = [Weight(f"w{i}", node, [inputs, n]) for i, (node, n) in enumerate(zip(nodes, widths))]
    x = rng.standard_normal((3, inputs)).astype(np.float32)

    def run(m: onnx.ModelProto) -> list[np.ndarray]:
        return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})

    separate = quantize_nbits(model, quantize, bits, 32)
    assert Counter(n.op_type for n in separate.graph.node) == {"MatMulNBits": 3}
    fused = onnx.ModelProto.FromString(separate.SerializeToString())
    assert fuse_shared_input(fused) == 2
    assert Counter(n.op_type for n in fused.graph.node) == {"MatMulNBits": 1, "Split": 1}
    for got, want, w in zip(run(fused), run(separate), weights):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        # and a product of the right weight: 4-bit blocks of normal weights are ~10% off, another weight ~140%
        assert np.abs(got - x @ w).max() < 0.3 * np.abs(x @ w).max()


def test_keep_leaves_named_layers_in_float32(fp32_export, tmp_path):
    out = tmp_path / "int4-keep"
    result = cli("quantize", fp32_export, "--mode", "int4", "--keep", "lm_head", "--keep", "embed,layers.0",
                 "-o", out)
    assert result.exit_code == 0, result.output
    model = model_of(out)
    floats = {w.name for w in find_weights(model)}
    kept = manifest_of(out)["quantization"]["kept_weights"]
    assert "embed.weight" in kept  # the tied LM head reads it: `--keep lm_head` names it too
    assert any(k.startswith("layers.0.") for k in kept) and not any(k.startswith("layers.1.") for k in kept)
    assert floats == set(kept)
    assert manifest_of(out)["quantization"]["keep"] == ["lm_head", "embed", "layers.0"]
    nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert nbits and not any(n.input[1].startswith(("layers.0.", "lm_head")) for n in nbits)


# -- the command line -------------------------------------------------------------------------------------------

def test_cli_quantize_then_validate(checkpoint, fp32_export, tmp_path):
    out = tmp_path / "int8"
    result = cli("quantize", fp32_export, "--mode", "INT8", "-o", out)
    assert result.exit_code == 0, result.output
    assert "int8" in result.stdout and "wrote" in result.stdout
    assert "INT8" not in result.stdout, "the mode is shown normalised"
    report = tmp_path / "report.json"
    result = cli("validate", out, "--checkpoint", checkpoint, "--json", report)
    data = json.loads(report.read_text())
    assert data["mode"] == "int8" and data["positions"] == 16384 and data["windows"] == 64
    for key in ("top1_agreement", "kl_mean", "kl_max", "bpb_reference", "bpb_quantized", "bpb_diff",
                "size_reference", "size_quantized"):
        assert key in data
    for label in ("top-1 agreement", "KL mean", "KL max", "bits/byte float32", "bits/byte int8", "size on disk"):
        assert label in result.stdout
    assert result.exit_code == (0 if data["ok"] else 1), result.output
    if BUNDLED:
        assert result.exit_code == 0, result.output


def test_validate_exits_1_when_a_threshold_fails(checkpoint, quantized, monkeypatch):
    monkeypatch.setitem(quality.THRESHOLDS, "fp16", [("logits_error", "<=", 0.0)])
    # --drift 0: the fp16 export's float16 state would add a 4096-step drift decode (tests/test_state_dtype.py)
    result = cli("validate", quantized["fp16"], "--checkpoint", checkpoint, "--bytes", 256, "--drift", 0)
    assert result.exit_code == 1, result.output
    assert "FAIL" in result.stdout


def assert_refused(result, out: Path, *words: str) -> None:
    """A clean error naming `words` that leaves nothing at `out`, not even a temporary directory."""
    assert_clean_error(result, *words)
    assert not out.exists(), f"{out} was written"
    assert not list(out.parent.glob(f".{out.name}.*")), "temporary directory left behind"


def _not_dividing(fp32_export) -> int:
    widths = {w.input_width for w in find_weights(model_of(fp32_export))}
    return next(b for b in (16, 32, 64, 128, 256) if any(w % b for w in widths))


def test_bad_inputs_exit_2_and_write_nothing(fp32_export, quantized, checkpoint, tmp_path):
    out = tmp_path / "out"
    assert_refused(cli("quantize", fp32_export, "--mode", "int3", "-o", out), out, "unknown mode", "int3")
    assert_refused(cli("quantize", quantized["int8"], "--mode", "int4", "-o", out), out,
                       "already quantized", "int8")
    block = _not_dividing(fp32_export)
    result = cli("quantize", fp32_export, "--mode", "int4", "--block-size", block, "-o", out)
    assert_refused(result, out, f"--block-size {block} does not divide", "input width", ".weight")
    assert_refused(cli("quantize", fp32_export, "--mode", "int4", "--block-size", 24, "-o", out), out,
                       "power of 2")
    assert_refused(cli("quantize", fp32_export, "--mode", "fp16", "--block-size", 32, "-o", out), out,
                       "int4 and int8 only")
    assert_refused(cli("quantize", checkpoint, "--mode", "int8", "-o", out), out, "not an export")
    assert_refused(cli("quantize", tmp_path / "missing", "--mode", "int8", "-o", out), out, "not found")
    assert_refused(cli("quantize", fp32_export, "--mode", "int8", "--keep", "layers.99", "-o", out), out,
                       "layers.99", "matches no")
    everything = ",".join(sorted({w.module.split(".")[0] for w in find_weights(model_of(fp32_export))}))
    for mode in ("int8", "int4"):
        assert_refused(cli("quantize", fp32_export, "--mode", mode, "--keep", everything, "-o", out), out,
                       "--keep", f"{mode} would quantize nothing")


def test_fp16_may_keep_every_weight(fp32_export, tmp_path):
    """fp16 still converts the activations and state when every weight is kept in float32."""
    everything = sorted({w.module.split(".")[0] for w in find_weights(model_of(fp32_export))})
    manifest = quantize_export(fp32_export, tmp_path / "fp16", "fp16", keep=everything)
    assert manifest["quantization"]["quantized_weights"] == [] and manifest["dtype"] == "float16"


def test_validate_bad_inputs_exit_2_and_write_nothing(checkpoint, quantized, tmp_path):
    report = tmp_path / "report.json"

    def validate(path: Path, *options):
        return cli("validate", path, "--checkpoint", checkpoint, "--json", report, *options)

    assert_refused(validate(quantized["int8"], "--bytes", 100, "--window", 256), report,
                   "--bytes 100", "window of 256")
    broken = tmp_path / "broken"
    shutil.copytree(quantized["int8"], broken)
    manifest = manifest_of(broken)
    for value, words in ((["int8"], ("sessa_config.json", '"quantization"', "list")),
                         ({**manifest["quantization"], "mode": "int3"}, ("sessa_config.json", "int3", "int8"))):
        (broken / "sessa_config.json").write_text(json.dumps({**manifest, "quantization": value}))
        assert_refused(validate(broken), report, *words)


def test_text_ids_refuses_fewer_bytes_than_a_window():
    with pytest.raises(SessaExportError, match="--bytes 100 is less than one window of 256"):
        quality.text_ids(heldout_bytes(), 100, 256, 256)


def test_api_refuses_fp16_source(quantized, tmp_path):
    with pytest.raises(SessaExportError, match="already quantized"):
        quantize_export(quantized["fp16"], tmp_path / "x", "int8")
    assert not (tmp_path / "x").exists()
