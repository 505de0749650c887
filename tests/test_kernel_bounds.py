"""The CPU attention kernels touch nothing outside their buffers: each runs in a child process
(tests/guarded_kernels.py) with every tensor between PROT_NONE guard pages, so one element read
before a cache's first row or past its last is a SIGSEGV on every run, not a rare crash of a
large model (the FeedbackAttention prefill once read 16 rows before its key cache: the 1B-class
float32 model crashed in about a third of its runs).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent


@pytest.mark.parametrize("kernels", ["feedback", "forward"])
def test_kernels_stay_inside_their_buffers(kernels):
    done = subprocess.run([sys.executable, str(HERE / "guarded_kernels.py"), kernels], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, f"exit {done.returncode} after:\n{done.stdout}{done.stderr[-2000:]}"
    assert done.stdout.count(": ok") == 5
