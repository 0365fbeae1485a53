"""Run ``ivgr-dist train`` as a user would, in a subprocess with a local Ray cluster of its own."""

from __future__ import annotations

import os
import subprocess
import sys


def run_train(overrides: list[str], timeout: float) -> subprocess.CompletedProcess:
    """``python -m ivgr_dist.cli train OVERRIDES``; RAY_ADDRESS is dropped so the run starts its own cluster,
    whatever the caller's environment points at."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run(
        [sys.executable, "-m", "ivgr_dist.cli", "train", *overrides],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
