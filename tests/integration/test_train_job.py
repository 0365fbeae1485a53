"""End to end on a real local Ray cluster (token authentication on): ``ray start --head`` + ``ray job submit`` of
the tiny job through ``cluster/submit.sh``, ``ray job stop`` while it trains, and the same submission again.

The job runs the real stack (2 vLLM CPU engines, 2 FSDP2 gloo learner ranks, shared-memory weight
sync), exactly as a user submits to a GPU cluster; the stop is what a scheduler's preemption does through Ray.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
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
        "trainer.loggers=[jsonl]",
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
        yield {"gcs": cluster.gcs, "dashboard": cluster.dashboard, "env": cluster.env, "ray_bin": cluster.ray_bin}
    finally:
        cluster.stop()


def _wait_for(what: str, ok, timeout_s: float, every_s: float = 2.0):
    import time

    end = time.monotonic() + timeout_s
    while True:
        value = ok()
        if value:
            return value
        assert time.monotonic() < end, f"{what} not within {timeout_s:.0f} s"
        time.sleep(every_s)


def _steps(path: Path) -> list[int]:
    if not path.is_file():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.slow  # ~4 min; the default tier still submits jobs (test_multinode's start-up failure cases)
def test_ray_job_stop_checkpoints_and_a_resubmission_resumes_exactly(ray_head, tiny_model_dir, tmp_path):
    """What a scheduler's preemption does through Ray: ``ray job stop`` sends SIGTERM, then SIGKILL after
    ``RAY_JOB_STOP_WAIT_TIME_S`` (Ray's default, 3 s, killed the job before its checkpoint). The job submitted by
    ``cluster/submit.sh`` (which gives it the grace) finishes its step, writes the checkpoint and stops; the same
    submission again resumes after that step, and every step is trained once. The judge key set in the submitting
    shell reaches the job's environment without being printed."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    secret = "sk-test-4f1c9e2b7a"
    env = {**ray_head["env"], "RAY_ADDRESS": ray_head["dashboard"], "IVGR_JUDGE_API_KEY": secret}
    # enough steps that the stop, sent once step 1 is logged, lands before the last one (with 3, a loaded machine saw
    # the SIGTERM arrive during step 3: the job had finished and nothing was tested)
    steps = 6
    overrides = [*_overrides(tmp_path, model, steps=steps), "trainer.save_every=0"]  # only the stop writes one
    submit = ["bash", str(REPO / "cluster" / "submit.sh"), "--no-wait", "--submission-id", "ivgr-stop-test"]
    first = subprocess.run([*submit, "--", *overrides], capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert secret not in first.stdout + first.stderr
    assert "passing to the job: IVGR_JUDGE_API_KEY" in first.stderr
    client = JobSubmissionClient(ray_head["dashboard"], headers={"Authorization": f"Bearer {_token(ray_head)}"})
    assert client.get_job_info("ivgr-stop-test").runtime_env["env_vars"]["IVGR_JUDGE_API_KEY"] == secret

    metrics = tmp_path / "run" / "metrics.jsonl"
    try:
        _wait_for("step 1 of the submitted job", lambda: _steps(metrics), timeout_s=900)
    except AssertionError:
        client.stop_job("ivgr-stop-test")  # not left running into the cluster's teardown (its engines' memory)
        _wait_for("the job to stop", lambda: client.get_job_status("ivgr-stop-test").is_terminal(), timeout_s=120)
        raise
    stop = subprocess.run(
        [ray_head["ray_bin"], "job", "stop", "--address", ray_head["dashboard"], "ivgr-stop-test"],
        capture_output=True, text=True, timeout=700, env=env,
    )  # fmt: skip
    assert stop.returncode == 0, stop.stdout[-2000:] + stop.stderr[-2000:]
    assert client.get_job_status("ivgr-stop-test") == JobStatus.STOPPED
    logs = client.get_job_logs("ivgr-stop-test")
    done = _steps(metrics)
    stopped_at = done[-1]
    assert done == list(range(1, stopped_at + 1)), done
    assert f"stopped by SIGTERM after step {stopped_at}" in logs, logs[-3000:]
    assert (tmp_path / "run" / "checkpoints" / f"step_{stopped_at:06d}" / "COMPLETE").is_file()
    assert stopped_at < steps, "the job finished before the stop: nothing was tested"

    # The same submission again: it resumes after the stopped step, with the warm start reused.
    again = subprocess.run(["bash", str(REPO / "cluster" / "submit.sh"), "--", *overrides],
                           capture_output=True, text=True, timeout=900, cwd=REPO, env=env)  # fmt: skip
    log = again.stdout[-6000:] + again.stderr[-3000:]
    assert again.returncode == 0 and "succeeded" in again.stdout.lower(), log
    assert f"resumed from {tmp_path / 'run' / 'checkpoints' / f'step_{stopped_at:06d}'}" in again.stdout, log
    assert "reusing it" in again.stdout, log  # the finished warm start is not trained again
    records = _check_metrics(metrics, list(range(1, steps + 1)))
    assert records[-1]["data/batches"] == steps  # the sampler continued where the stopped job left it
    trained = [json.loads(line) for line in (tmp_path / "run" / "trained.jsonl").read_text().splitlines()]
    assert [t["step"] for t in trained] == list(range(1, steps + 1))  # every step trained once: none lost, none twice
    assert len((tmp_path / "run" / "sft_logs" / "metrics.jsonl").read_text().splitlines()) == 4
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()
    state = json.loads((tmp_path / "run" / "checkpoints" / f"step_{steps:06d}" / "trainer_state.json").read_text())
    assert state["weight_version"] == steps and state["step"] == steps


def _token(ray_head) -> str:
    return Path(ray_head["env"]["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
