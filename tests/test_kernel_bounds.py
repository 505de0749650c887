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

HERE = Path(__file__).parent


def test_kernels_stay_inside_their_buffers():
    """Both kernels' five cases in one child (its imports cost seconds); the last line it printed names
    the case after which it died."""
    done = subprocess.run([sys.executable, str(HERE / "guarded_kernels.py"), "feedback", "forward"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"exit {done.returncode} after:\n{done.stdout}{done.stderr[-2000:]}"
    assert [line.split(":")[0] for line in done.stdout.splitlines() if line.endswith(": ok")] == \
        ["feedback"] * 5 + ["forward"] * 5
