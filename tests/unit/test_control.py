"""The mailbox between ``ivgr-dist scale`` and a running trainer, and the CLI's errors without a job."""

from __future__ import annotations

import pytest

from ivgr_dist.driver.control import FleetControl, actor_name


def test_a_request_is_validated_taken_once_and_reported():
    box = FleetControl("fleet:run", max_engines=4)
    with pytest.raises(ValueError, match=r"--engines 5: must be in \[1, rollout.max_engines=4\] for fleet:run"):
        box.set_target(5)
    with pytest.raises(ValueError, match=r"--engines 0"):
        box.set_target(0)
    assert box.take_request() is None
    box.report({"engines_live": 2.0, "step": 7})
    reply = box.set_target(3)
    assert reply["requested"] == 3 and reply["engines_live"] == 2.0
    assert box.status()["pending_request"] == 3
    assert box.take_request() == 3 and box.take_request() is None  # applied once, at one step boundary
    assert actor_name("/shared/runs/exp1/") == "fleet:exp1"


def test_a_stop_request_stays_set():
    box = FleetControl("fleet:run", max_engines=2)
    assert not box.stop_requested()
    assert box.request_stop()["stop_requested"] is True
    assert box.stop_requested() and box.stop_requested()  # read at every step boundary until the trainer ends
