"""End to end on a real local Ray cluster: ``ray start --head`` + ``ray job submit`` of the tiny job, then resume.

The job runs the real stack (2 vLLM CPU engines, 2 FSDP2 gloo learner ranks, shared-memory weight
sync) through ``cluster/submit.sh``, exactly as a user submits to a GPU cluster. A second, local
``ivgr-dist train`` with a higher ``max_steps`` then resumes from the job's checkpoint.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from support.ray_cluster import LocalCluster, wait_for_job_agent

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
REQUIRED = [
    "step", "weight_version", "time/step_s", "time/generate_s", "time/reward_s", "time/learner_s", "time/sync_s",
    "rollout/tokens", "rollout/tokens_per_s", "reward/grounded/overall", "reward/grounded/accuracy",
    "reward/grounded/format", "reward/grounded/box_iou", "reward/grounded/box_valid", "reward/textual/overall",
    "reward/textual/accuracy", "reward/textual/format", "reward/textual/consistency", "loss/policy", "loss/kl",
    "grad_norm", "sync/verified", "sync/verify_mean_abs", "logprob/mismatch_mean",
]  # fmt: skip


def _overrides(tmp: Path, model: Path, steps: int) -> list[str]:
    return [
        f"model.path={model}",
        f"data.train_files=[{tmp}/data/train.parquet]",
        f"data.val_files=[{tmp}/data/val.parquet]",
        "data.synthetic.num_records=96",
        "data.rollout_batch_size=8",
        "rollout.max_response_length=48",
        "learner.global_batch_size=8",
        "sft.steps=4",  # the main job runs the warm start first; keep it short here
        "sft.batch_size=4",
        f"trainer.output_dir={tmp}/run",
        f"trainer.max_steps={steps}",
        "trainer.save_every=1",
        "trainer.tensorboard=false",
    ]


def _check_metrics(path: Path, steps: list[int]) -> list[dict]:
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    assert [r["step"] for r in records] == steps
    for r in records:
        missing = [k for k in REQUIRED if k not in r]
        assert not missing, f"step {r['step']}: missing {missing}"
        bad = [k for k in REQUIRED if r[k] is None or not math.isfinite(r[k])]
        assert not bad, f"step {r['step']}: non-finite {bad}"
        assert r["weight_version"] == r["step"]
        assert r["sync/verified"] == 1.0 and r["sync/verify_mean_abs"] < 0.05
        assert r["rollout/tokens"] > 0 and r["logprob/mismatch_mean"] < 0.05
    return records


@pytest.fixture(scope="module")
def ray_head():
    cluster = LocalCluster.start_head(num_cpus=5)
    try:
        wait_for_job_agent(cluster.ray_bin, cluster.dashboard, cluster.env, deadline_s=180)
        yield {"gcs": cluster.gcs, "dashboard": cluster.dashboard, "env": cluster.env}
    finally:
        cluster.stop()


@pytest.mark.slow  # ~3 min; the default tier still submits jobs (test_multinode's start-up failure cases)
def test_ray_job_submit_then_resume(ray_head, tiny_model_dir, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    env = {**ray_head["env"], "RAY_ADDRESS": ray_head["dashboard"]}
    submit = ["bash", str(REPO / "cluster" / "submit.sh"), "--", *_overrides(tmp_path, model, steps=2)]
    job = subprocess.run(submit, capture_output=True, text=True, timeout=900, cwd=REPO, env=env)
    log = job.stdout[-6000:] + job.stderr[-3000:]
    assert job.returncode == 0, log
    assert "succeeded" in job.stdout.lower(), log
    _check_metrics(tmp_path / "run" / "metrics.jsonl", [1, 2])
    assert (tmp_path / "run" / "checkpoints" / "step_000002" / "COMPLETE").is_file()
    # The warm start ran first and RL started from it; the final policy is exported for eval.
    assert len((tmp_path / "run" / "sft_logs" / "metrics.jsonl").read_text().splitlines()) == 4
    assert (tmp_path / "run" / "sft_model" / "config.json").is_file()
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()

    # Resume on the same cluster from the CLI: step 3 only, weight version continues at 3.
    env_local = {**ray_head["env"], "RAY_ADDRESS": ray_head["gcs"]}
    resume = [sys.executable, "-m", "ivgr_dist.cli", "train", *_overrides(tmp_path, model, steps=3)]
    again = subprocess.run(resume, capture_output=True, text=True, timeout=900, cwd=tmp_path, env=env_local)
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-4000:]
    records = _check_metrics(tmp_path / "run" / "metrics.jsonl", [1, 2, 3])
    assert "resumed from" in again.stderr and "step_000002" in again.stderr
    assert "reusing it" in again.stderr  # the finished warm start is not trained again
    assert len((tmp_path / "run" / "sft_logs" / "metrics.jsonl").read_text().splitlines()) == 4
    assert records[-1]["data/batches"] == 3  # the sampler continued where the job stopped
    state = json.loads((tmp_path / "run" / "checkpoints" / "step_000003" / "trainer_state.json").read_text())
    assert state["weight_version"] == 3 and state["step"] == 3
