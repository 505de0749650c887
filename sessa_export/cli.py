"""The `sessa-export` command line: inspect, export, validate, run, compile, quantize, bench, demo.

Exit codes: 0 success; 1 a check failed (validate tolerances); 2 bad input or usage.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Callable, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .errors import SessaExportError
from .quality import format_bytes
from .targets import TARGETS

app = typer.Typer(
    help="Take Sessa models from a PyTorch checkpoint to ONNX Runtime and TVM, exactly.\n\n"
         "Exit codes: 0 success, 1 a check failed (validate), 2 bad input (the message says what to fix).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console(emoji=False)  # paths, prompts and generated text are shown as they are
err_console = Console(stderr=True, emoji=False)

EXIT_CHECK_FAILED = 1
EXIT_BAD_INPUT = 2
DEFAULT_PREFILL, DEFAULT_DECODE = 384, 256  # validate's steps, shortened to fit an artifact unless given
DRIFT_PROMPT = 32  # random tokens before validate's drift decode


def command(fn: Callable) -> Callable:
    """Register a command whose SessaExportError becomes a one-line message and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except SessaExportError as exc:
            err_console.print(f"[bold red]error:[/bold red] {escape(str(exc))}", highlight=False, soft_wrap=True)
            raise typer.Exit(EXIT_BAD_INPUT) from None

    return app.command()(wrapper)


@command
def inspect(
    checkpoint: Path = typer.Argument(..., help="Checkpoint directory, .safetensors or torch file."),
    config: Optional[Path] = typer.Option(None, "--config", help="config.json for a bare state_dict."),
    model: Optional[str] = typer.Option(None, "--model", help="path/to/file.py:factory or package.module:factory "
                                        "building the nn.Module CHECKPOINT holds the weights of (a custom module)."),
) -> None:
    """Print a checkpoint's config, parameter count and bytes, layers, and state bytes per token.

    Given an export or compile directory, print its manifest: format, inputs, outputs, state layout, files.
    With --model, print the custom module's Sessa layers as the tracer finds them, and whether
    `sessa-export convert` can make it a SessaLM checkpoint.
    """
    from .artifact import is_artifact
    from .checkpoint import load_checkpoint

    if is_artifact(checkpoint):
        _inspect_artifact(checkpoint)
        return
    if model is not None:
        _inspect_module(checkpoint, model)
        return
    model = load_checkpoint(checkpoint, config)
    c = model.config
    params = model.num_parameters()
    itemsize = next(model.parameters()).element_size()
    table = Table(title=f"{checkpoint}", show_header=False)
    for key, value in c.to_dict().items():
        table.add_row(key, str(value))
    table.add_row("parameters", f"{params:,} ({format_bytes(params * itemsize)} as {next(model.parameters()).dtype})")
    per_token = c.state_values_per_token() * itemsize
    table.add_row("state per token of context", f"{format_bytes(per_token)} ({c.state_values_per_token():,} values)")
    console.print(table)
    layers = Table(title="layers")
    for col in ("layer", "heads", "kv heads", "head dim", "RoPE", "MLP"):
        layers.add_column(col)
    for i, layer in enumerate(model.layers):
        m = layer.mixer
        layers.add_row(str(i), str(m.n_heads), str(m.n_kv_heads), str(m.head_dim),
                       "on" if m.use_forward_rope else "off", str(c.mlp_hidden) if c.mlp_ratio > 0 else "-")
    console.print(layers)


def _inspect_module(weights: Path, spec: str) -> None:
    from .convert import to_sessa_lm
    from .sources import load_factory_model
    from .tracer import trace

    module = load_factory_model(spec, weights)
    graph = trace(module)
    params = sum(p.numel() for p in module.parameters())
    table = Table(title=f"{weights} ({spec}: {type(module).__name__})", show_header=False)
    table.add_row("input", f"{graph.input_name} ({graph.input_kind}"
                  + (f", vocabulary {graph.vocab_size})" if graph.vocab_size else f", width {graph.input_width})"))
    table.add_row("outputs", ", ".join(graph.outputs))
    table.add_row("parameters", f"{params:,}")
    per_token = graph.state.values_per_position()
    table.add_row("state per token of context", f"{format_bytes(per_token * 4)} ({per_token:,} float32 values)")
    try:
        to_sessa_lm(module, spec)
        table.add_row("as SessaLM", "maps onto SessaLM: `sessa-export convert` writes it as a checkpoint")
    except SessaExportError as exc:
        table.add_row("as SessaLM", escape(str(exc)))
    console.print(table)
    layers = Table(title="Sessa mixers")
    for col in ("layer", "module", "heads", "kv heads", "head dim", "RoPE"):
        layers.add_column(col)
    paths = [n.path for n in graph.nodes if n.op == "mixer"]
    for i, (path, m) in enumerate(zip(paths, graph.mixers)):
        layers.add_row(str(i), path, str(m.n_heads), str(m.n_kv_heads), str(m.head_dim),
                       "on" if m.use_forward_rope else "off")
    console.print(layers)


def _inspect_artifact(path: Path) -> None:
    from .artifact import read_manifest

    manifest = read_manifest(path)
    table = Table(title=f"{path} ({manifest['format']})", show_header=False)
    skip = {"state", "config", "input", "outputs"}
    for key, value in manifest.items():
        if key not in skip:
            table.add_row(key, str(value))
    table.add_row("input", f"{manifest['input']['name']} ({manifest['input']['kind']})")
    table.add_row("outputs", ", ".join(manifest["outputs"]))
    for file in sorted(path.iterdir()):
        table.add_row(f"file {file.name}", format_bytes(file.stat().st_size))
    console.print(table)
    layers = Table(title="state per layer (past → present)")
    for col in ("layer", "key/value", "feedback_key/feedback_state", "RoPE"):
        layers.add_column(col)
    for layer in manifest["state"]:
        shapes = layer["shapes"]
        layers.add_row(str(layer["layer"]), str(shapes["key"]), str(shapes["feedback_key"]),
                       "on" if layer["use_forward_rope"] else "off")
    console.print(layers)


@command
def export(
    checkpoint: Optional[Path] = typer.Argument(None, help="Checkpoint (directory, .safetensors or torch file); "
                                                "with --model, the weights for the factory's module."),
    out: Path = typer.Option(..., "-o", "--out", help="Output directory (replaced when it exists)."),
    config: Optional[Path] = typer.Option(None, "--config", help="config.json for a bare state_dict."),
    model: Optional[str] = typer.Option(None, "--model", help="path/to/file.py:factory or package.module:factory "
                                        "building an nn.Module "
                                        "whose positions meet only in Sessa mixers."),
    state: Optional[str] = typer.Option(None, "--state", help="The state contract: grow (the default: each step "
                                        "returns state tensors of P + S positions; opset 23) or inplace (caches of a "
                                        "capacity, written in place when bound as input and output, plus a "
                                        "past_sequence_length input; opset 24)."),
    genai: bool = typer.Option(False, "--genai", help="Write a folder ONNX Runtime GenAI loads as it is "
                               "(onnxruntime_genai.Model): the in-place contract with the names GenAI binds under "
                               "past_present_share_buffer, genai_config.json, and a tokenizer.json (--tokenizer, or "
                               "byte-level for a 256-token vocabulary)."),
    ort_format: bool = typer.Option(False, "--ort-format", help="Also write OUT/model.ort (ORT format, for "
                                    "ONNX Runtime Mobile and minimal builds) and OUT/model.required_operators.config "
                                    "(its operators, for a reduced-size ORT build: --include_ops_by_config)."),
    mobile: bool = typer.Option(False, "--mobile", help="Also write the ORT Mobile step graphs for the NNAPI and "
                                "CoreML execution providers: OUT/model.mobile_decode.onnx (1 token) and "
                                "OUT/model.mobile_prefill.onnx (chunks of 64), fixed shapes, batch 1, caches of the "
                                "model's max_len (at most 2048) written by the caller from the returned rows "
                                "(README, ORT Mobile)."),
    state_dtype: str = typer.Option("float32", "--state-dtype", help="The state's precision, apart from the "
                                    "weights': float32, float16 or bfloat16 (--state inplace). Reads cast to float32 "
                                    "and the feedback recurrence accumulates in float32; `validate` reports the cost."),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="A Hugging Face tokenizer.json for the model, "
                                             "copied into OUT (tokenizer.json, named in the manifest) so that `run OUT "
                                             "--prompt` uses it."),
) -> None:
    """Export to OUT/model.onnx + OUT/sessa_config.json: one step graph for prefill, chunks and decode."""
    from .sources import load_model
    from .to_onnx import check_state, export_onnx
    from .tokenizer import tokenizer_for
    from .tracer import trace

    if state == "genai":
        raise SessaExportError("--state genai: pass --genai, which also writes the files GenAI loads")
    if genai and state not in (None, "inplace"):
        raise SessaExportError(f"--genai writes GenAI's form of the in-place contract: drop --state {state}")
    state = "genai" if genai else state or "grow"
    check_state([], state, state_dtype)  # a --state or --state-dtype it cannot run fails before any work
    with console.status("loading model") as status:
        source = load_model(checkpoint, config, model)
        status.update("tracing")
        graph = trace(source)
        if tokenizer is not None:
            tokenizer_for(tokenizer, graph.vocab_size, "the model")  # before the export, not after it
        export_onnx(graph, out, progress=lambda msg: status.update(msg), tokenizer=tokenizer,
                    source=str(checkpoint.resolve()) if checkpoint else None, factory=model, state=state,
                    state_dtype=state_dtype, ort_format=ort_format, mobile=mobile)
    size = sum(f.stat().st_size for f in out.iterdir())
    console.print(f"wrote {out}/ ({format_bytes(size)}): {len(graph.mixers)} Sessa layers, "
                  f"inputs {graph.input_name} + {4 * len(graph.mixers)} state tensors ({state}, {state_dtype})")


@command
def compile(  # noqa: A001 - the command is called `compile`
    source: Optional[Path] = typer.Argument(None, help="Checkpoint, or an export directory (its recorded "
                                            "source checkpoint is compiled); with --model, the weights."),
    out: Path = typer.Option(..., "-o", "--out", help="Output directory (replaced when it exists)."),
    target: str = typer.Option("cpu", "--target", help=f"{', '.join(TARGETS)}: "
                               + "; ".join(f"{t.name}: {t.summary}" for t in TARGETS.values()) + "."),
    arch: Optional[str] = typer.Option(None, "--arch", help="CUDA arch: sm_80 (default) or sm_90."),
    host: Optional[str] = typer.Option(None, "--host", help="Host triple to cross compile for: "
                                       + "; ".join(f"{t.name} {' or '.join(t.hosts)}" for t in TARGETS.values()
                                                   if t.hosts) + "."),
    cpu: Optional[str] = typer.Option(None, "--cpu", help="--target cpu: the processors the library may assume. "
                                      "x86-64: x86-64, x86-64-v2, x86-64-v3 (default: AVX2 + FMA, every x86-64 chip "
                                      "since Haswell and Zen 1), x86-64-v4 (AVX-512) or native (this machine's CPU); "
                                      "--host aarch64-linux-gnu: generic (default, NEON), cortex-a76 (dot product) or "
                                      "neoverse-v1 (i8mm, SVE). The library refuses to load on a CPU without them."),
    max_len: Optional[int] = typer.Option(None, "--max-len", help="Compiled capacity in positions (default: "
                                          "the model's max_len, else 2048)."),
    config: Optional[Path] = typer.Option(None, "--config", help="config.json for a bare state_dict."),
    model: Optional[str] = typer.Option(None, "--model", help="path/to/file.py:factory or package.module:factory "
                                        "building an nn.Module "
                                        "whose positions meet only in Sessa mixers."),
    state_dtype: str = typer.Option("float32", "--state-dtype", help="The caches' precision, apart from the "
                                    "weights': float32, float16 or bfloat16. The kernels read them as float32 and "
                                    "accumulate in float32; `validate` reports the cost."),
    quantization: str = typer.Option("none", "--quantization", help="none, q8 or q4 (--target cpu): the "
                                     "linear layers' weights (the LM head included) and the embedding table as "
                                     "int8 / packed int4 with a float16 scale per 32 inputs; decode runs integer "
                                     "dot products (VNNI, AVX2, sdot/usdot as --cpu allows)."),
    keep: list[str] = typer.Option([], "--keep", help="With --quantization: keep in float32 lm_head, embed, or a "
                                   "module path prefix such as layers.0 (repeatable, or comma-separated)."),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="A Hugging Face tokenizer.json for the model, "
                                             "copied into OUT (tokenizer.json, named in the manifest) so that `run OUT "
                                             "--prompt` uses it (default: the one an export directory given "
                                             "as the source carries)."),
) -> None:
    """Compile with TVM into OUT/ (library + sessa_config.json): one `step` for prefill, chunks and decode.

    With --quantization q8|q4 check the result with `sessa-export validate OUT` (quality thresholds:
    q8 as int8, q4 as int4).
    """
    from .artifact import is_artifact, read_manifest
    from .sources import compile_source, load_model
    from .to_tvm import CompileTarget, check_quantization, compile_graph
    from .state import state_dtype as state_dtype_of
    from .tokenizer import recorded_tokenizer, tokenizer_for
    from .tracer import trace

    compile_target = CompileTarget(target, arch, host, cpu)  # checks target/arch/host/cpu before any work
    state_dtype_of(state_dtype)
    check_quantization(quantization, compile_target)
    checkpoint = compile_source(source, model) if source is not None else None
    if tokenizer is None and source is not None and is_artifact(source):
        tokenizer = recorded_tokenizer(source, read_manifest(source))
    with console.status("loading model") as status:
        loaded = load_model(checkpoint, config, model)
        status.update("tracing")
        graph = trace(loaded)
        if tokenizer is not None:
            tokenizer_for(tokenizer, graph.vocab_size, "the model")  # before minutes of compiling, not after
        compile_graph(graph, out, compile_target, max_len, progress=lambda msg: status.update(msg),
                      tokenizer=tokenizer,
                      source=str(checkpoint.resolve()) if checkpoint else None, quantization=quantization,
                      factory=model, inputs=(source,), state_dtype=state_dtype,
                      keep=[part.strip() for item in keep for part in item.split(",") if part.strip()])
    manifest = read_manifest(out)
    size = sum(f.stat().st_size for f in out.iterdir())
    console.print(f"wrote {out}/ ({format_bytes(size)}): {manifest['library']} for {compile_target.describe()}, "
                  f"capacity {manifest['capacity']} positions, {len(graph.mixers)} Sessa layers, "
                  f"compiled in {manifest['compile_seconds']:.1f} s")


@command
def run(
    artifact: Path = typer.Argument(..., help="Export directory (or a checkpoint, to run PyTorch)."),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="Prompt text, turned into token ids by the model's "
                                         "tokenizer: --tokenizer, else the one the artifact carries, else its UTF-8 "
                                         "bytes for a byte-level model (vocab_size 256)."),
    prompt_token_ids: Optional[str] = typer.Option(None, "--prompt-ids", help="The prompt as token ids, "
                                                   "comma-separated (1,2,3), instead of --prompt: for models "
                                                   "without a tokenizer."),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="A Hugging Face tokenizer.json "
                                             "(default: the artifact's own, if it carries one)."),
    show_ids: bool = typer.Option(False, "--ids", help="Print the generated token ids (comma-separated, as "
                                  "--prompt-ids takes them) instead of their text."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", min=1, help="Tokens to generate."),
    temperature: float = typer.Option(0.0, help="0 = greedy."),
    top_k: int = typer.Option(0, "--top-k", help="Keep the k most likely tokens (0 = all)."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling mass (1 = all)."),
    seed: int = typer.Option(0, help="Sampling seed."),
) -> None:
    """Generate from a prompt, streaming the output: prefill, then decode with the state.

    Prints the generated text as the tokenizer decodes it (without the prompt), or the token ids with
    --ids, and always for a model that has no tokenizer and is not byte-level.
    """
    from .artifact import is_artifact, read_manifest
    from .generate import Sampling, check_new_tokens, generate, prompt_ids
    from .runtime import open_runner, vocab_size
    from .tokenizer import BYTES, check_ids, load_tokenizer, model_tokenizer, needs_tokenizer, parse_ids

    sampling = Sampling(temperature, top_k, top_p, seed)  # bad settings fail here, before any work
    check_new_tokens(max_new_tokens)
    if (prompt is None) == (prompt_token_ids is None):
        raise SessaExportError("give the prompt as --prompt TEXT or as --prompt-ids 1,2,3 (one of them)")
    given_ids = parse_ids(prompt_token_ids) if prompt_token_ids is not None else None
    if prompt is not None:
        prompt_ids(BYTES.encode(prompt), max_new_tokens, None, "")  # not UTF-8, or empty: before loading anything
    given = load_tokenizer(tokenizer) if tokenizer is not None else None
    runner = open_runner(artifact)
    vocab, max_len = vocab_size(runner), runner.max_len
    manifest = read_manifest(artifact) if is_artifact(artifact) else None
    text = model_tokenizer(given, vocab, str(artifact), artifact, manifest)
    if given_ids is not None:
        ids, option = check_ids(given_ids, vocab, "--prompt-ids", str(artifact)).tolist(), "--prompt-ids"
    elif text is None:
        raise needs_tokenizer(str(artifact), vocab, "--prompt-ids 1,2,3")
    else:
        ids, option = text.encode(prompt), "--prompt"
    ids = prompt_ids(ids, max_new_tokens, max_len, f"{artifact} has max_len={max_len}", option)
    stream = _ids_stream() if show_ids or text is None else _text_stream(text)
    result = generate(runner, ids, max_new_tokens, sampling, on_tokens=stream)
    sys.stdout.write("\n")
    err_console.print(f"{runner.name}: prefill {result.prompt_tokens} tokens in {result.prefill_s * 1e3:.1f} ms, "
                      f"decode {result.decode_tokens_per_s:.1f} tokens/s", highlight=False)


def _text_stream(tokenizer) -> Callable:
    """Write each generated token's text to stdout as soon as it makes whole characters."""
    step = tokenizer.streamer()

    def write(tokens) -> None:
        sys.stdout.buffer.write(step(int(tokens[0])))
        sys.stdout.flush()

    return write


def _ids_stream() -> Callable:
    """Write each generated token id to stdout, comma-separated."""
    first = True

    def write(tokens) -> None:
        nonlocal first
        sys.stdout.write(("" if first else ",") + str(int(tokens[0])))
        sys.stdout.flush()
        first = False

    return write


@command
def validate(
    artifact: Path = typer.Argument(..., help="Export directory to check."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="Reference checkpoint "
                                              "(default: the one recorded at export); with --model, its weights."),
    model: Optional[str] = typer.Option(None, "--model", help="path/to/file.py:factory or package.module:factory "
                                        "of a custom model's export, "
                                        "required for one (the artifact records it; sessa-export imports no code an "
                                        "artifact names). The reference is then the module's step graph run step by "
                                        "step in PyTorch with the reference Sessa mixers (checked once against the "
                                        "module's own forward): logits and state are compared."),
    prefill: Optional[int] = typer.Option(None, min=1, help="Prefill length T (default 384: past 256, so an ONNX "
                                          "export's forward attention is checked in its blocked form too; shortened "
                                          "with --decode to fit the artifact's max_len or capacity)."),
    decode_steps: Optional[int] = typer.Option(None, "--decode", min=0, help="Decode steps N after the prefill "
                                               "(default 256). T + N given past the artifact's limit is refused."),
    seed: int = typer.Option(0, help="Seed for random tokens and chunk splits."),
    atol: float = typer.Option(1e-4, help="Absolute tolerance (fp32 default)."),
    rtol: float = typer.Option(1e-4, help="Tolerance relative to the tensor's max |value|."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the report as JSON here."),
    text: Optional[Path] = typer.Option(None, "--text", help="Evaluation text instead of the bundled held-out "
                                        "text: read as bytes by a byte-level model, else through its tokenizer."),
    text_ids: Optional[Path] = typer.Option(None, "--text-ids", help="Evaluation token ids instead of text, for "
                                            "models without a tokenizer: one integer per line, or a .npy of "
                                            "integers [N]."),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="A Hugging Face tokenizer.json that turns "
                                             "the evaluation text into token ids (default: the artifact's own, if "
                                             "it carries one; byte-level models read bytes)."),
    eval_bytes: int = typer.Option(16384, "--bytes", "--tokens", min=2, help="Quantized exports: bytes (tokens, "
                                   "for a model that reads token ids) of text to evaluate, in --window sequences "
                                   "spread evenly over the text."),
    window: int = typer.Option(256, "--window", min=2, help="Quantized exports: bytes (tokens) per sequence (a "
                               "fresh state each); keep it within the model's training context."),
    chunk: int = typer.Option(128, "--chunk", min=1, help="Quantized exports: tokens per prefill step "
                              "(the state is carried between chunks)."),
    drift: int = typer.Option(4096, "--drift", min=0, help="Artifacts with a float16/bfloat16 state: greedy decode "
                              "steps over which the logits error is followed (shortened to the artifact's limit; "
                              "0 skips)."),
) -> None:
    """Compare an export with the PyTorch reference; exit 1 when a tolerance fails.

    A tensor passes when max|export - reference| <= atol + rtol * max|reference|, for the logits and
    every state tensor, after every step of: a prefill + decode on random tokens (batch 2) and on the
    bundled held-out text, and a prefill in random uneven chunks.

    A quantized export (`sessa-export quantize`) is held to quality thresholds instead: both models
    read --bytes of the held-out text (or --text) as sequences of --window bytes spread evenly over
    the text, each prefilled in chunks of --chunk tokens with the state carried. The report gives
    top-1 agreement with the float32 reference, mean and max KL of the next-token distributions,
    bits per byte of both and their difference, the logits error and the size on disk of both.
    A model that is not byte-level reads token ids instead: the text through its tokenizer
    (--tokenizer, or the one the artifact carries), or --text-ids; its figures are per token.
    Exit 1 when the mode's threshold fails -
    int8: top-1 agreement >= 99% and mean KL <= 0.01 nats;
    int4: top-1 agreement >= 95% and bits per byte at most 3% above float32;
    fp16: max |logits error| <= 1e-2 x max |reference logits|.

    An artifact whose state is stored in float16 or bfloat16 (--state-dtype) is held to its
    quantization mode's bar, or with float32 weights to fp16's; and a greedy decode of --drift
    steps follows its logits error against the float32 reference (with float32 weights it must
    stay within the same 1e-2).
    """
    import json

    from .artifact import read_manifest
    from .runtime import open_runner, vocab_size
    from .sources import reference_runner
    from .tokenizer import load_tokenizer, read_ids
    from .validate import Tolerance, cases, render, report_dict, run_case

    if json_out is not None and not json_out.parent.is_dir():  # before the run, not after it
        raise SessaExportError(f"--json {json_out}: the directory {json_out.parent} does not exist")
    if text is not None and text_ids is not None:
        raise SessaExportError("give --text or --text-ids, not both")
    given_ids = read_ids(text_ids) if text_ids is not None else None
    given = load_tokenizer(tokenizer) if tokenizer is not None else None
    candidate = open_runner(artifact)
    manifest = read_manifest(artifact)
    reference = reference_runner(artifact, manifest, checkpoint, model)
    evaluation = _evaluation_text(artifact, manifest, vocab_size(candidate), text, given_ids, given)
    if manifest.get("quantization") or candidate.layout.dtype != "float32":
        _validate_quality(artifact, manifest, reference, candidate, evaluation, eval_bytes, window, chunk, json_out,
                            drift, seed)
        return
    tol = Tolerance(atol, rtol)
    reports = []
    limits = [n for n in (manifest.get("max_len"), candidate.max_len) if n]  # TVM: capacity
    limit = min(limits) if limits else None
    steps_t = DEFAULT_PREFILL if prefill is None else prefill
    steps_n = DEFAULT_DECODE if decode_steps is None else decode_steps
    if (prefill is not None or decode_steps is not None) and limit is not None and steps_t + steps_n > limit:
        raise SessaExportError(f"--prefill {steps_t} and --decode {steps_n} need {steps_t + steps_n} positions; "
                               f"{artifact} holds at most {limit}: pass smaller ones")
    byte_text = evaluation if isinstance(evaluation, bytes) else None  # token ids: their own case below
    checks = cases(vocab_size(candidate), steps_t, steps_n, byte_text, seed, limit)
    length = sum(checks[0][2])
    if byte_text is None and len(evaluation) >= length:
        checks.insert(1, ("text as token ids, prefill + decode", evaluation[None, :length], checks[0][2]))
    for name, ids, steps in track(checks, "validating"):
        reports.append(run_case(name, reference, candidate, ids, steps, tol))
    render(reports, tol, console)
    if json_out is not None:
        json_out.write_text(json.dumps(report_dict(reports, tol), indent=2) + "\n")
    if not all(r.ok for r in reports):
        raise typer.Exit(EXIT_CHECK_FAILED)


def _read_text(path: Path) -> bytes:
    if not path.is_file():
        raise SessaExportError(f"--text {path}: no such file")
    return path.read_bytes()


def _evaluation_text(artifact: Path, manifest: dict, vocab: int, text: Optional[Path], ids, given):
    """What validate reads as text: --text-ids as given (checked against the vocabulary), else the text
    (--text or the held-out text) through the model's tokenizer (`given`, else the artifact's) as token ids,
    else its bytes (byte-level; for any other model the quality check then says what to pass)."""
    import numpy as np

    from .data import heldout_bytes
    from .tokenizer import check_ids, model_tokenizer

    if ids is not None:
        return check_ids(ids, vocab, "--text-ids", str(artifact))
    data = _read_text(text) if text is not None else heldout_bytes()
    tokenizer = model_tokenizer(given, vocab, str(artifact), artifact, manifest)
    if tokenizer is None or tokenizer.byte_level:
        return data
    try:
        return np.array(tokenizer.encode(data.decode("utf-8"), "--text"), dtype=np.int64)
    except UnicodeDecodeError:
        raise SessaExportError(f"--text {text}: not UTF-8 text, which the tokenizer reads") from None


def _validate_quality(artifact: Path, manifest: dict, reference, candidate, text, eval_bytes: int,
                        window: int, chunk: int, json_out: Optional[Path], drift_steps: int, seed: int) -> None:
    """Quality of a quantized or narrow-state artifact against the float32 reference, and the drift of a
    narrow state; exit 1 when a bar fails."""
    import json

    import numpy as np

    from rich.progress import Progress

    from .quality import THRESHOLDS, describe, evaluate_artifact, render
    from .runtime import vocab_size

    with console.status("evaluating against float32 (the report says on how many bytes)"):
        report, title = evaluate_artifact(artifact, manifest, reference, candidate, text, eval_bytes, window, chunk)
    render(report, console, title=f"{title}, {describe(report)}")
    result, ok = report.to_dict(), report.ok
    limits = [n for n in (manifest.get("max_len"), candidate.max_len) if n]  # TVM: capacity
    prompt = np.random.default_rng(seed).integers(0, vocab_size(candidate), (1, DRIFT_PROMPT))
    steps = min([drift_steps] + [n - DRIFT_PROMPT for n in limits])
    if candidate.layout.dtype != "float32" and steps > 0:
        from .drift import greedy_drift, render as render_drift

        bar = None if manifest.get("quantization") else THRESHOLDS["state"][0][2]
        with Progress(console=err_console, transient=True) as bars:
            task = bars.add_task(f"drift over {steps} greedy steps", total=steps)
            drift = greedy_drift(reference, candidate, prompt, steps, candidate.layout.dtype, bar,
                                 progress=lambda done: bars.update(task, completed=done))
        render_drift(drift, console)
        result["drift"], ok = drift.to_dict(), ok and drift.ok
    if json_out is not None:
        json_out.write_text(json.dumps(result, indent=2) + "\n")
    if not ok:
        raise typer.Exit(EXIT_CHECK_FAILED)


@command
def quantize(
    export_dir: Path = typer.Argument(..., metavar="OUT", help="ONNX export directory (from `sessa-export export`)."),
    mode: str = typer.Option(..., "--mode", help="int8 | int4 | fp16."),
    block_size: Optional[int] = typer.Option(None, "--block-size", help="int4 and int8: values per "
                                             "quantization block, a power of 2 from 16 to 256 (default 32); it "
                                             "must divide the input width of every quantized weight."),
    keep: list[str] = typer.Option([], "--keep", help="Keep in full precision: lm_head, embed, or a module "
                                   "path prefix such as layers.0 or layers.0.mixer (repeatable, or comma-separated)."),
    out: Path = typer.Option(..., "-o", "--out", help="Directory to write (replaced atomically)."),
) -> None:
    """Quantize an ONNX export: int8 or int4 (block-wise weights, MatMulNBits) or fp16.

    Every linear layer and the embedding are quantized unless --keep names them. int8 and int4 use
    ONNX Runtime's MatMulNBitsQuantizer: 8- or 4-bit weights with a scale and zero point per block
    of --block-size inputs, activations quantized to int8 per block at run time; fp16 stores
    weights, activations and state in float16 while the softmaxes, LayerNorms, the feedback gain
    and recurrence accumulate in float32. The ai.sessa.FeedbackAttention nodes and function are
    kept. Check the result with `sessa-export validate OUT2 --checkpoint CKPT`.
    """
    from .to_onnx.quantize import left_in_float, quantize_export

    names = [part.strip() for item in keep for part in item.split(",") if part.strip()]
    with console.status("quantizing") as status:
        manifest = quantize_export(export_dir, out, mode, block_size, names, progress=lambda msg: status.update(msg))
    quant = manifest["quantization"]
    before, after = quant["source_size_bytes"], quant["size_bytes"]
    block = f", block {quant['block_size']}" if quant.get("block_size") else ""
    kept = (f"; kept in full precision: {', '.join(quant['keep'])} ({len(quant['kept_weights'])} weights)"
            if quant["kept_weights"] else "")
    console.print(f"wrote {out}/ ({format_bytes(after)}, {after / before:.2f}x of {format_bytes(before)}): "
                  f"{quant['mode']}{block}, {len(quant['quantized_weights'])} weights quantized{kept}"
                  f"{left_in_float(quant)}")


@command
def convert(
    checkpoint: Path = typer.Argument(..., help="The custom module's weights (safetensors or a torch state_dict)."),
    model: str = typer.Option(..., "--model", help="path/to/file.py:factory or package.module:factory building "
                              "the nn.Module the weights are for."),
    out: Path = typer.Option(..., "-o", "--out", help="Checkpoint directory to write (config.json + "
                             "model.safetensors; replaced when it exists)."),
) -> None:
    """Write a custom module as a SessaLM checkpoint (config.json + model.safetensors), when it is one.

    The module must compute what a SessaLM computes: embedding, Sessa layers (each optionally followed
    by an MLP), a final LayerNorm and a linear head (per-layer kv heads, tied or biased head allowed).
    Otherwise the message names the first module or key that does not map. The converted model's
    logits are checked against the module's own forward before anything is written.
    """
    from .checkpoint import check_checkpoint_out
    from .convert import convert as convert_module
    from .sources import load_factory_model

    check_checkpoint_out(out, inputs=(checkpoint,))
    with console.status("converting"):
        lm = convert_module(load_factory_model(model, checkpoint), model, out, inputs=(checkpoint,))
    c = lm.config
    console.print(f"wrote {out}/ (config.json + model.safetensors): SessaLM, vocab {c.vocab_size}, d_model "
                  f"{c.d_model}, {c.n_layers} layers, kv heads {list(c.layer_kv_heads)}, "
                  f"{'tied' if c.tie_embeddings else 'untied'} head{' with bias' if c.lm_head_bias else ''}")


def track(items, description: str):
    """A rich progress bar over a list."""
    from rich.progress import track as rich_track

    return rich_track(list(items), description=description, console=err_console, transient=True)


@command
def bench(
    artifact: Path = typer.Argument(..., help="Export directory, compiled directory or checkpoint."),
    context: int = typer.Option(1024, min=1, help="Prefill length, and the context decode runs at."),
    decode_steps: int = typer.Option(32, "--decode-steps", min=1, help="Decode steps timed."),
    batch: int = typer.Option(1, min=1, help="Batch size."),
    threads: Optional[int] = typer.Option(None, min=1, help="Intra-op threads (ONNX Runtime)."),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="A Hugging Face tokenizer.json: the timed "
                                             "tokens are the held-out text through it (default: the artifact's own "
                                             "tokenizer, or bytes for a byte-level model; random ids for a model "
                                             "with neither)."),
) -> None:
    """Time prefill tokens/s and decode ms/token at a context (medians of repeated runs).

    The tokens timed are the bundled held-out text as the model's tokenizer reads it (repeated if the
    context is longer), or random ids for a model without one; the speed does not depend on them.
    """
    from .artifact import is_artifact, read_manifest
    from .bench import time_runners
    from .data import heldout_bytes
    from .runtime import open_runner, vocab_size
    from .tokenizer import load_tokenizer, model_tokenizer

    given = load_tokenizer(tokenizer) if tokenizer is not None else None
    runner = open_runner(artifact, threads)
    vocab = vocab_size(runner)
    text = model_tokenizer(given, vocab, str(artifact), artifact, read_manifest(artifact) if is_artifact(artifact)
                           else None)
    tokens = text.encode(heldout_bytes().decode("utf-8"), "the held-out text") if text is not None else None
    with console.status(f"timing {runner.name}"):
        t = time_runners({runner.name: runner}, vocab, context, decode_steps, batch, tokens=tokens)[runner.name]
    console.print(f"{runner.name}: prefill {t.prefill_tokens_per_s:,.0f} tokens/s at T={context}, "
                  f"decode {t.decode_ms_per_token:.2f} ms/token at context {context}, batch {batch}")


@command
def demo(
    prompt: str = typer.Option("import os\n\n\ndef ", help="Prompt text (the bundled model is byte-level: "
                               "its UTF-8 bytes are the token ids)."),
    max_new_tokens: int = typer.Option(200, min=1, help="Bytes to generate."),
    out: Path = typer.Option(Path("sessa-demo"), "-o", "--out", help="Where the artifacts are written "
                             "(OUT/onnx, OUT/tvm-cpu)."),
    temperature: float = typer.Option(0.8, help="Sampling temperature (0 = greedy)."),
    seed: int = typer.Option(0, help="Sampling seed."),
) -> None:
    """The whole pipeline on the bundled tiny model: ONNX and TVM CPU, validated and generating.

    Exports to ONNX and compiles with TVM for this CPU, validates both against PyTorch step by
    step, generates through each and prints tokens/s beside the PyTorch reference.
    """
    from .demo import CAPACITY, run_demo
    from .generate import Sampling, prompt_ids
    from .tokenizer import BYTES

    sampling = Sampling(temperature, top_k=40, seed=seed)  # bad settings fail here, before any work
    ids = prompt_ids(BYTES.encode(prompt), max_new_tokens, CAPACITY, f"the demo compiles for {CAPACITY}")
    if not run_demo(out, prompt, ids, max_new_tokens, sampling, console, track, _text_stream(BYTES)):
        raise typer.Exit(EXIT_CHECK_FAILED)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
