"""The cluster templates keep a run's cluster closed to strangers and give a stopped job the time to checkpoint.

``cluster/submit.sh`` runs here against a stand-in ``ray`` command (it records its arguments and the runtime-env
file it is given) to check what reaches the job and what does not; the real submission, ``ray job stop`` and the
resubmission run in ``tests/integration/test_train_job.py`` (slow tier). The SLURM and KubeRay templates cannot
run here (no scheduler); their settings are read and checked against each other.
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
SUBMIT = REPO / "cluster" / "submit.sh"
SBATCH = REPO / "cluster" / "slurm" / "ivgr_ray.sbatch"
RAYJOB = REPO / "cluster" / "kuberay" / "rayjob.yaml"

FAKE_RAY = r"""#!/usr/bin/env python3
import json, os, shutil, sys
out = os.environ["FAKE_RAY_OUT"]
args = sys.argv[1:]
record = {"args": args}
if "--runtime-env" in args:
    path = args[args.index("--runtime-env") + 1]
    record["runtime_env_path"] = path
    record["mode"] = oct(os.stat(path).st_mode & 0o777)
    record["runtime_env"] = json.load(open(path))
json.dump(record, open(out, "w"))
print("Job 'raysubmit_x' submitted successfully")
"""


def _submit(tmp_path: Path, *args: str, env: dict | None = None) -> tuple[subprocess.CompletedProcess, dict]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    ray = bin_dir / "ray"
    ray.write_text(FAKE_RAY.replace("#!/usr/bin/env python3", f"#!{sys.executable}"))
    ray.chmod(ray.stat().st_mode | stat.S_IXUSR)
    out = tmp_path / "ray_call.json"
    full_env = {
        **{k: v for k, v in os.environ.items() if k not in ("IVGR_JUDGE_API_KEY", "WANDB_API_KEY")},
        "PATH": f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}",
        "FAKE_RAY_OUT": str(out),
        **(env or {}),
    }
    proc = subprocess.run(["bash", str(SUBMIT), *args], capture_output=True, text=True, timeout=60, env=full_env)
    return proc, (json.loads(out.read_text()) if out.is_file() else {})


def test_submit_passes_the_judge_key_and_the_stop_grace_through_a_private_file_never_the_command_line(tmp_path):
    secret = "sk-test-9d8c7b6a"
    proc, call = _submit(
        tmp_path,
        "--stop-grace", "900", "--", "--config", "configs/qwen2_5_vl_7b.yaml", "trainer.max_steps=3",
        env={"IVGR_JUDGE_API_KEY": secret},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    env_vars = call["runtime_env"]["env_vars"]
    assert env_vars["IVGR_JUDGE_API_KEY"] == secret  # the reward workers get it from the job's runtime env
    assert env_vars["RAY_JOB_STOP_WAIT_TIME_S"] == "900"  # ray job stop waits this long before SIGKILL
    assert env_vars["PYTHONPATH"] == "src"  # cluster/runtime_env.yaml is the base
    assert call["runtime_env"]["worker_process_setup_hook"] == "ivgr_dist.runtime._ext_fix.install"
    assert call["mode"] == "0o600"
    assert not Path(call["runtime_env_path"]).exists()  # removed once submitted
    assert secret not in " ".join(call["args"]) and secret not in proc.stdout + proc.stderr
    assert "passing to the job: IVGR_JUDGE_API_KEY" in proc.stderr
    i = call["args"].index("--")
    assert call["args"][i + 1 :] == [
        "python", "-m", "ivgr_dist.cli", "train", "--config", "configs/qwen2_5_vl_7b.yaml", "trainer.max_steps=3",
    ]  # fmt: skip


def test_submit_defaults_give_the_job_its_grace_and_pass_only_variables_that_are_set(tmp_path):
    proc, call = _submit(tmp_path, "--env", "MY_TOKEN", "--", "trainer.max_steps=1", env={"MY_TOKEN": "x1"})
    assert proc.returncode == 0, proc.stderr
    env_vars = call["runtime_env"]["env_vars"]
    assert env_vars["RAY_JOB_STOP_WAIT_TIME_S"] == "600" and env_vars["MY_TOKEN"] == "x1"
    assert "IVGR_JUDGE_API_KEY" not in env_vars and "WANDB_API_KEY" not in env_vars


@pytest.mark.parametrize("bad", ["abc", "-5", ""])
def test_submit_refuses_a_stop_grace_that_is_not_seconds(tmp_path, bad):
    proc, call = _submit(tmp_path, "--stop-grace", bad, "--", "trainer.max_steps=1")
    assert proc.returncode == 2 and "must be a whole number of seconds" in proc.stderr
    assert not call


def test_runtime_env_gives_a_plain_ray_job_submit_its_stop_grace_too():
    env = yaml.safe_load((REPO / "cluster" / "runtime_env.yaml").read_text())
    assert int(env["env_vars"]["RAY_JOB_STOP_WAIT_TIME_S"]) >= 300


def test_slurm_template_turns_on_token_auth_and_stops_the_job_through_ray_before_the_time_limit():
    text = SBATCH.read_text()
    assert subprocess.run(["bash", "-n", str(SBATCH)]).returncode == 0
    assert "export RAY_AUTH_MODE=token" in text and "export RAY_AUTH_TOKEN" in text
    assert '--dashboard-host="$head_ip"' in text and "--dashboard-host=0.0.0.0" not in text
    signal_s = int(re.search(r"^#SBATCH --signal=B:TERM@(\d+)$", text, re.M).group(1))
    grace = int(re.search(r'grace="\$\{IVGR_JOB_STOP_GRACE_S:-(\d+)\}"', text).group(1))
    assert grace < signal_s, "the job's stop grace must end before SLURM's time limit does"
    assert "trap stop_job TERM" in text and 'ray job stop --address "$RAY_ADDRESS" "$job_id"' in text
    assert '--stop-grace "$grace"' in text


def test_kuberay_template_turns_on_token_auth_and_outlasts_the_jobs_stop_grace():
    job = yaml.safe_load(RAYJOB.read_text())
    spec = job["spec"]["rayClusterSpec"]
    assert spec["authOptions"]["mode"] == "token"
    major, minor = (int(x) for x in spec["rayVersion"].split(".")[:2])
    assert (major, minor) >= (2, 52)  # Ray's token authentication
    runtime_env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    grace = int(runtime_env["env_vars"]["RAY_JOB_STOP_WAIT_TIME_S"])
    pods = [spec["headGroupSpec"]["template"]["spec"], *(g["template"]["spec"] for g in spec["workerGroupSpecs"])]
    for pod in pods:
        assert pod["terminationGracePeriodSeconds"] > grace
        (container,) = pod["containers"]
        hook = " ".join(container["lifecycle"]["preStop"]["exec"]["command"])
        assert "ray job stop --address" in hook and job["spec"]["jobId"] in hook  # the job checkpoints first


def test_pyproject_requires_a_ray_with_token_authentication():
    text = (REPO / "pyproject.toml").read_text()
    m = re.search(r'"ray\[default\]>=(\d+)\.(\d+)', text)
    assert m and (int(m.group(1)), int(m.group(2))) >= (2, 52)
