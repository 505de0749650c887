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
from rich.table import Table

from .errors import SessaExportError

app = typer.Typer(
    help="Take Sessa models from a PyTorch checkpoint to ONNX Runtime and TVM, exactly.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()
err_console = Console(stderr=True)

EXIT_CHECK_FAILED = 1
EXIT_BAD_INPUT = 2


def command(fn: Callable) -> Callable:
    """Register a command whose SessaExportError becomes a one-line message and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except SessaExportError as exc:
            err_console.print(f"[bold red]error:[/bold red] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(EXIT_BAD_INPUT) from None

    return app.command()(wrapper)


def _format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


@command
def inspect(
    checkpoint: Path = typer.Argument(..., help="Checkpoint directory, .safetensors or torch file."),
    config: Optional[Path] = typer.Option(None, "--config", help="config.json for a bare state_dict."),
) -> None:
    """Print a checkpoint's config, parameter count and bytes, layers, and state bytes per token."""
    from .checkpoint import load_checkpoint

    model = load_checkpoint(checkpoint, config)
    c = model.config
    params = model.num_parameters()
    itemsize = next(model.parameters()).element_size()
    table = Table(title=f"{checkpoint}", show_header=False)
    for key, value in c.to_dict().items():
        table.add_row(key, str(value))
    table.add_row("parameters", f"{params:,} ({_format_bytes(params * itemsize)} as {next(model.parameters()).dtype})")
    per_token = c.state_values_per_token() * itemsize
    table.add_row("state per token of context", f"{_format_bytes(per_token)} ({c.state_values_per_token():,} values)")
    console.print(table)
    layers = Table(title="layers")
    for col in ("layer", "heads", "kv heads", "head dim", "RoPE", "MLP"):
        layers.add_column(col)
    for i, layer in enumerate(model.layers):
        m = layer.mixer
        layers.add_row(str(i), str(m.n_heads), str(m.n_kv_heads), str(m.head_dim),
                       "on" if m.use_forward_rope else "off", str(c.mlp_hidden) if c.mlp_ratio > 0 else "-")
    console.print(layers)


@command
def demo(
    prompt: str = typer.Option("def fibonacci(n):\n", help="Prompt text (bytes)."),
    max_new_tokens: int = typer.Option(200, help="Bytes to generate."),
) -> None:
    """Run the bundled tiny model: generate bytes from a prompt with the step path."""
    import numpy as np

    from .checkpoint import load_checkpoint
    from .data import BUNDLED_MODEL, decode, encode
    from .generate import generate
    from .runtime import TorchRunner

    runner = TorchRunner(load_checkpoint(BUNDLED_MODEL))
    console.print(f"[bold]bundled model[/bold] {BUNDLED_MODEL} ({runner.model.num_parameters():,} parameters)")
    prompt_ids = np.array([encode(prompt)], dtype=np.int64)
    sys.stdout.write(prompt)
    result = generate(runner, prompt_ids, max_new_tokens,
                      on_tokens=lambda t: (sys.stdout.write(decode([int(t[0])])), sys.stdout.flush()))
    sys.stdout.write("\n")
    console.print(f"pytorch: prefill {result.prompt_tokens} tokens in {result.prefill_s * 1e3:.1f} ms, "
                  f"decode {result.decode_tokens_per_s:.1f} tokens/s")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
