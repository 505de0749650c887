"""Shared test helpers. tests/ is importable (reference_recurrence, custom_models) from every test file."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

TESTS_DIR = Path(__file__).resolve().parent
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))


def randomize_weights(module: torch.nn.Module, seed: int = 0, std: float = 0.15) -> torch.nn.Module:
    """init_weights at `std` (so the feedback path matters), then random biases and norm affines too.

    init_weights leaves biases at 0 and norm weights at 1 (and zeroes the weight of a LayerNorm it does not
    recognise by name); random values there make a dropped bias or a wrong norm show up in parity tests.
    """
    from sessa_export.model import init_weights

    init_weights(module, seed=seed, std=std)
    gen = torch.Generator().manual_seed(seed + 7919)
    norms = {f"{path}.weight" if path else "weight" for path, m in module.named_modules()
             if isinstance(m, torch.nn.LayerNorm)}
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() == 1:
                noise = torch.randn(p.shape, generator=gen)
                p.copy_(1.0 + 0.1 * noise if name in norms else std * noise)
    return module


@pytest.fixture(scope="session")
def make_lm():
    """Build a small random SessaLM: make_lm(seed=0, std=0.15, **config fields)."""
    from sessa_export.config import SessaConfig
    from sessa_export.model import SessaLM

    def build(seed: int = 0, std: float = 0.15, **fields) -> SessaLM:
        defaults = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4)
        config = SessaConfig(**{**defaults, **fields})
        return randomize_weights(SessaLM(config), seed=seed, std=std).eval()

    return build


@pytest.fixture(scope="module")
def one_torch_thread():
    """1 intra-op thread: on a shared 2-core machine more threads spin against each other (10-100x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def one_tvm_thread(one_torch_thread):
    """1 TVM worker thread as well, for the same reason (set as TvmRunner sets it: a pool started any
    other way pins this process to one core, use_tvm_threads)."""
    from sessa_export.runtime import available_cores
    from sessa_export.runtime.tvm_runner import use_tvm_threads

    use_tvm_threads(1)
    yield
    use_tvm_threads(available_cores())  # what a runner gets by default: later modules time at full width


@pytest.fixture(scope="session")
def bundled_library(tmp_path_factory):
    """bundled_library(*options): `sessa-export compile` of the bundled model for --target cpu (the default
    --cpu) at capacity BUNDLED_CAPACITY with `options` (such as "--quantization", "q8"), built once a
    session for each set of options and shared by every test file that only reads it (a compile takes
    5-10 s here). A test that changes a library copies it first."""
    from parity import compile_bundled

    built: dict[tuple[str, ...], Path] = {}

    def build(*options: str) -> Path:
        if options not in built:
            built[options] = compile_bundled(tmp_path_factory.mktemp("bundled_library") / "tiny", *options)
        return built[options]

    return build
