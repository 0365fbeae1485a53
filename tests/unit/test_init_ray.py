"""``runtime.init_ray`` starts a local cluster once more when Ray's raylet gave up at start-up (an overloaded
machine), and only then. ``ray.init`` is replaced: Ray cannot be made to time out on demand."""

from __future__ import annotations

import pytest

from ivgr_dist.config import load_config
from ivgr_dist.runtime import init_ray

TIMEOUT = Exception(
    "The current node timed out during startup. This could happen because some of the raylet failed to startup "
    "or the GCS has become overloaded."
)


@pytest.fixture
def fake_ray(monkeypatch):
    import ray

    calls = {"init": 0, "shutdown": 0, "errors": []}

    def init(**kwargs):
        calls["init"] += 1
        if calls["errors"]:
            raise calls["errors"].pop(0)

    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "shutdown", lambda: calls.__setitem__("shutdown", calls["shutdown"] + 1))
    monkeypatch.setattr("ivgr_dist.interrupts.raise_on_signals", lambda: None)  # no handlers in the test process
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
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
