"""``ivgr-dist train`` with a judge URL where nothing listens: it fails in seconds, before the warm start, the
engines and the learner, with one line naming the URL, and exits 1 (it used to train for minutes with every
consistency request failing and nothing on the console)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


def test_train_with_an_unreachable_judge_fails_in_seconds_with_one_line(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}/v1"  # closed below: connection refused
    cmd = [sys.executable, "-m", "ivgr_dist.cli", "train", f"trainer.output_dir={tmp_path / 'run'}",
           "reward.judge.backend=openai", f"reward.judge.urls=[{url}]"]  # fmt: skip
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=150, cwd=tmp_path)
    wall = time.monotonic() - t0
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines() == [
        f"ivgr-dist train: judge {url} is unreachable (ConnectError): is the server up and reward.judge.urls right?"
    ]
    assert not (tmp_path / "run" / "sft_model").exists()  # the warm start (sft.enabled by default) never began
    assert wall < 60, f"{wall:.0f} s: local Ray start and one refused connection should take seconds"
