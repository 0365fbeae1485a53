"""Ctrl-C and preemption of a real ``ivgr-dist train`` run: stop after the current step with its checkpoint, one
line that says where and how to resume, exit 130 (SIGINT) / 143 (SIGTERM), no traceback; the resumed run
continues from that checkpoint and no step is logged twice."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def _overrides(tmp: Path, model: Path) -> list[str]:
    return [
        f"model.path={model}",
        f"data.train_files=[{tmp}/data/train.parquet]",
        f"data.val_files=[{tmp}/data/val.parquet]",
        "data.synthetic.num_records=64",
        "data.rollout_batch_size=8",
        "rollout.max_response_length=32",
        "rollout.num_engines=1",
        "learner.global_batch_size=8",
        "sft.enabled=false",
        f"trainer.output_dir={tmp}/run",
        "trainer.max_steps=6",
        "trainer.save_every=0",  # only the signal's checkpoint (and the last step's)
        "trainer.loggers=[jsonl]",
    ]


def _steps(metrics: Path) -> list[int]:
    if not metrics.is_file():
        return []
    return [json.loads(line)["step"] for line in metrics.read_text().splitlines() if line.strip()]


def _run_until(tmp: Path, model: Path, after_steps: int, send) -> tuple[subprocess.CompletedProcess, float]:
    """Start the job, wait until ``after_steps`` steps are logged, call ``send(proc)``; the finished process and
    the seconds from the signal to its exit."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "ivgr_dist.cli", "train", *_overrides(tmp, model)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,  # its own process group: a terminal's Ctrl-C goes to the whole group
    )
    metrics = tmp / "run" / "metrics.jsonl"
    deadline = time.monotonic() + 400
    try:
        while len(_steps(metrics)) < after_steps:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the run did not reach the step"
            time.sleep(0.5)
        t0 = time.monotonic()
        send(proc)
        out, err = proc.communicate(timeout=300)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), time.monotonic() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _check_stopped(result, signame: str, code: int, run: Path) -> int:
    print(result.stderr[-3000:])
    assert result.returncode == code, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("ivgr-dist train: stopped by")]
    assert len(lines) == 1, result.stderr[-3000:]
    m = re.match(rf"ivgr-dist train: stopped by {signame} after step (\d+); checkpoint (\S+); resume: (.+)$", lines[0])
    assert m, lines[0]
    step, ckpt = int(m.group(1)), Path(m.group(2))
    assert ckpt == run / "checkpoints" / f"step_{step:06d}" and (ckpt / "COMPLETE").is_file()
    assert "ivgr_dist.cli train" in m.group(3) and f"trainer.output_dir={run}" in m.group(3)
    assert _steps(run / "metrics.jsonl")[-1] == step < 6  # stopped early, at the checkpointed step
    assert not (run / "model").exists()  # no export after a signal: the grace period goes to the checkpoint
    return step


def test_sigint_then_sigterm_stop_with_a_checkpoint_and_resume_without_duplicates(tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    ctrl_c, _ = _run_until(tmp_path, tiny_model_dir, 1, lambda p: os.killpg(p.pid, signal.SIGINT))
    first = _check_stopped(ctrl_c, "SIGINT", 130, run)
    # preemption: SIGTERM to the job's process only (Kubernetes, SLURM), during the resumed run
    term, _ = _run_until(tmp_path, tiny_model_dir, first + 1, lambda p: p.send_signal(signal.SIGTERM))
    assert f"resumed from {run / 'checkpoints' / f'step_{first:06d}'}" in term.stderr
    second = _check_stopped(term, "SIGTERM", 143, run)
    assert second > first
    assert _steps(run / "metrics.jsonl") == list(range(1, second + 1))  # every step once
