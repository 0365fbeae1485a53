"""``runtime.startup.init_ray`` starts a local cluster once more when Ray's raylet gave up at start-up (an overloaded
machine), and only then; it gives every Ray worker of the job the import fix (a setup hook), without clashing with
the runtime env of a ``ray job submit``. ``ray.init`` is replaced: Ray cannot be made to time out on demand.
tests/integration/test_ext_fix_processes.py checks the hook in real Ray workers."""

from __future__ import annotations

import pytest

from ivgr_dist.config import load_config
from ivgr_dist.runtime.startup import WORKER_SETUP_HOOK, init_ray

TIMEOUT = Exception(
    "The current node timed out during startup. This could happen because some of the raylet failed to startup "
    "or the GCS has become overloaded."
)


@pytest.fixture
def fake_ray(monkeypatch):
    import ray

    calls = {"init": 0, "shutdown": 0, "errors": [], "kwargs": []}

    def init(**kwargs):
        calls["init"] += 1
        calls["kwargs"].append(kwargs)
        if calls["errors"]:
            raise calls["errors"].pop(0)

    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "shutdown", lambda: calls.__setitem__("shutdown", calls["shutdown"] + 1))
    monkeypatch.setattr(
        "ivgr_dist.runtime.interrupts.raise_on_signals", lambda: None
    )  # no handlers in the test process
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    return calls


def test_a_start_up_timeout_is_retried_once(fake_ray, caplog):
    fake_ray["errors"] = [TIMEOUT]
    init_ray(load_config(None))
    assert (fake_ray["init"], fake_ray["shutdown"]) == (2, 1)
    assert "did not start" in caplog.text and "starting it once more" in caplog.text


def test_a_second_timeout_and_other_errors_are_raised(fake_ray):
    fake_ray["errors"] = [TIMEOUT, TIMEOUT]
    with pytest.raises(Exception, match="timed out during startup"):
        init_ray(load_config(None))
    assert fake_ray["init"] == 2
    fake_ray.update(init=0, errors=[ValueError("bad num_cpus")])
    with pytest.raises(ValueError, match="bad num_cpus"):
        init_ray(load_config(None))
    assert fake_ray["init"] == 1


def test_a_local_cluster_and_a_joined_one_give_their_workers_the_import_fix(fake_ray, monkeypatch):
    init_ray(load_config(None))
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    init_ray(load_config(None))
    assert [k["runtime_env"] for k in fake_ray["kwargs"]] == [{"worker_process_setup_hook": WORKER_SETUP_HOOK}] * 2
    assert "address" not in fake_ray["kwargs"][0] and fake_ray["kwargs"][1]["address"] == "127.0.0.1:6379"


@pytest.mark.parametrize(
    "job_env",
    [
        {"worker_process_setup_hook": WORKER_SETUP_HOOK, "env_vars": {"PYTHONPATH": "src"}},  # cluster/runtime_env.yaml
        {"env_vars": {"__RAY_WORKER_PROCESS_SETUP_HOOK_ENV_VAR": WORKER_SETUP_HOOK}},  # the hook as Ray stores it
    ],
)
def test_under_a_submitted_job_that_names_the_hook_it_is_not_given_twice(fake_ray, monkeypatch, caplog, job_env):
    import json

    # Ray refuses to merge a driver's runtime env with the job's when both set the same field
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": job_env, "metadata": {}}))
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    init_ray(load_config(None))
    assert fake_ray["kwargs"][0]["runtime_env"] == {} and "worker_process_setup_hook" not in caplog.text


def test_a_job_with_a_setup_hook_of_its_own_keeps_it_with_a_warning(fake_ray, monkeypatch, caplog):
    import json

    job_env = {"worker_process_setup_hook": "mylab.setup"}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": job_env}))
    init_ray(load_config(None))
    assert fake_ray["kwargs"][0]["runtime_env"] == {}
    assert "worker_process_setup_hook='mylab.setup'" in caplog.text and WORKER_SETUP_HOOK in caplog.text
