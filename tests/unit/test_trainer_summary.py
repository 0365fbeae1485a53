"""The final summary of ``ivgr-dist train``: window means of the first vs last steps."""

from __future__ import annotations

import pytest

from ivgr_dist.config import load_config
from ivgr_dist.driver.trainer import Trainer, summarize, window_means
from support.fake_roles import FakeData, FakeLearners, FakePool, FakeScorer, fake_config


def _records(values):
    return [
        {"step": i + 1, "reward/textual/accuracy": v, "weight_version": i + 1, "sync/verified": 1.0}
        for i, v in enumerate(values)
    ]


def test_window_means_use_the_first_and_last_window():
    recs = _records([0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    assert window_means(recs, "reward/textual/accuracy", 2) == pytest.approx((0.1, 0.9))
    # A window larger than half the run shrinks to half, so the two windows never overlap.
    assert window_means(recs, "reward/textual/accuracy", 5) == pytest.approx((0.2, 0.8))
    assert window_means(recs, "reward/grounded/box_iou", 2) is None


def test_summary_reports_means_delta_and_paths(tmp_path):
    cfg = load_config(None, [f"trainer.output_dir={tmp_path}"])
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    text = summarize(cfg, _records([0.1, 0.3, 0.5, 0.7]), window=2)
    line = next(ln for ln in text.splitlines() if "reward/textual/accuracy" in ln)
    assert line.split()[1:] == ["0.200", "0.600", "(+0.400)"]
    assert "steps 1-2" in text and "steps 3-4" in text
    assert f"ivgr-dist eval --model {tmp_path / 'model'}" in text
    assert "nothing to do" in summarize(cfg, [])


class _Sync:
    """A weight sync whose pushes fail as scripted (a SyncError naming engines, or success)."""

    def __init__(self, outcomes):
        self.outcomes, self.calls = list(outcomes), []

    def push(self, learners, rollouts, version, engines=None):
        self.calls.append((version, list(rollouts.alive)))
        outcome = self.outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return {"time/sync_s": 0.1}


@pytest.fixture
def _trainer(tmp_path):
    """A Trainer over stand-ins (tests/support/fake_roles.py) with this weight sync and pool, at version 7."""

    def make(sync, pool):
        trainer = Trainer(fake_config(tmp_path), FakeData(), pool, FakeLearners(), FakeScorer(), sync)
        trainer.version = 7
        return trainer

    return make


def test_a_failed_push_drops_the_named_engines_and_pushes_again(_trainer):
    from ivgr_dist.sync.fanout import SyncError

    err = SyncError("engine 1 died", 7, failed_engines=[1], errors={1: "EngineDeadError: gone"})
    sync, pool = _Sync([err, None]), FakePool(3)
    out = _trainer(sync, pool).push_weights(step=4)
    assert sync.calls == [(7, [0, 1, 2]), (7, [0, 2])]
    assert pool.dropped == [(1, "step 4, push to version 7: EngineDeadError: gone")]
    assert out["sync/failed_pushes"] == 1.0 and out["sync/dropped_engines"] == 1.0
    # a second failure stops the run, naming the step
    sync, pool = _Sync([err, SyncError("engine 0 hung", 7, [0])]), FakePool(3)
    with pytest.raises(SyncError, match=r"^step 4: engine 0 hung"):
        _trainer(sync, pool).push_weights(step=4)
    # a clean push adds nothing
    assert _trainer(_Sync([None]), FakePool(2)).push_weights(step=1) == {"time/sync_s": 0.1}


def test_a_push_that_loses_every_engine_is_counted_not_fatal(_trainer):
    """Every engine lost at once (a crash and a hang found together): nothing to push to; the learner keeps the
    version and the replacements get it when they join (the run must not stop here)."""
    from ivgr_dist.sync.fanout import SyncError

    err = SyncError("both gone", 7, failed_engines=[0, 1], errors={0: "ActorDiedError", 1: "EngineDeadError"})
    sync, pool = _Sync([err]), FakePool(2)
    out = _trainer(sync, pool).push_weights(step=3)
    assert sync.calls == [(7, [0, 1])]  # no second push to an empty fleet
    assert [e for e, _ in pool.dropped] == [0, 1]
    assert out == {"sync/skipped_pushes": 1.0, "sync/failed_pushes": 1.0, "sync/dropped_engines": 2.0}
    # the health monitor dropped them all before the push: nothing is called
    sync, pool = _Sync([]), FakePool(0)
    assert _trainer(sync, pool).push_weights(step=3) == {"sync/skipped_pushes": 1.0}
    assert sync.calls == []
    # engines joining (the heal's push) are pushed to as before
    sync, pool = _Sync([None]), FakePool(2)
    assert _trainer(sync, pool).push_weights(step=3, engines=[1]) == {"time/sync_s": 0.1}


def test_the_weight_check_claims_nothing_without_a_live_engine():
    """No engine to score the probe: no ``sync/verified`` (a 1.0 there would say a check passed that never ran),
    and the learner is not asked to score either."""
    from types import SimpleNamespace

    from ivgr_dist.sync.fanout import EngineView
    from ivgr_dist.sync.verify import WeightVerifier

    class _Learners:
        def score(self, *args):
            raise AssertionError("the learner scored a probe no engine will be compared with")

    verifier = WeightVerifier(tolerance=0.05)
    verifier.probe = SimpleNamespace(response_ids=[1, 2])
    no_engines = SimpleNamespace(engine_view=lambda: EngineView({}, 1, {}))
    assert verifier.check(_Learners(), no_engines, version=3) == {}
    assert verifier.error() is None
