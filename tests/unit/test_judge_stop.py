"""A judge that cannot work stops the run loudly: at start (the in-driver scorer's check), and mid-run when its
failure rate passes ``reward.judge.max_failure_rate`` (``JudgeFailureMonitor``, the trainer's loop, the summary
and the ``ivgr-dist train`` exit line). No Ray: the trainer's cluster parts are stand-ins."""

from __future__ import annotations

import logging
import socket
import time

import pytest

from ivgr_dist.config import AlgorithmConfig, ConfigError, JudgeConfig, RewardConfig
from ivgr_dist.driver.checkpoints import latest_checkpoint
from ivgr_dist.reward.judge import JudgeUnavailable
from ivgr_dist.reward.judge.monitor import JudgeFailureMonitor
from support.fake_roles import FakeData, FakeLearners, FakePool, FakeScorer, FakeSync, fake_config


def _step(asked: float, failed: float) -> dict:
    return {"judge/requests": asked, "judge/failures": failed}


def test_the_monitor_stops_only_on_a_full_window_above_the_rate(caplog):
    monitor = JudgeFailureMonitor(max_rate=0.5, window=3)
    with caplog.at_level(logging.WARNING, logger="ivgr_dist.reward.judge.monitor"):
        assert monitor.observe(1, _step(10, 0)) is None
        assert caplog.records == []  # no failure, no warning
        assert monitor.observe(2, _step(10, 10), "HTTP 503") is None  # 10 of 20: not a full window yet
        assert monitor.observe(3, _step(10, 5), "HTTP 503") is None  # 15 of 30 = 0.5: not above it
        assert len(caplog.records) == 2  # one warning per step with failures, not one per request
        assert "step 2: the judge failed 10 of 10 requests (last error: HTTP 503)" in caplog.records[0].getMessage()
        reason = monitor.observe(4, _step(10, 10), "ConnectError")  # 25 of 30 over steps 2-4
    assert reason is not None and "\n" not in reason
    assert "83% of 30 requests over the last 3 step(s)" in reason
    assert "reward.judge.failure_window" in reason and "max_failure_rate=0.5" in reason
    assert reason.endswith("last error: ConnectError")
    assert (monitor.requests, monitor.failures) == (40, 25)


def test_the_monitor_ignores_steps_without_requests_and_rate_1_never_stops():
    quiet = JudgeFailureMonitor(max_rate=0.0, window=2)
    assert quiet.observe(1, {}) is None and quiet.observe(2, _step(0, 0)) is None  # nothing asked: no rate
    never = JudgeFailureMonitor(max_rate=1.0, window=1)
    assert never.observe(1, _step(5, 5)) is None
    assert JudgeFailureMonitor(max_rate=0.0, window=1).observe(1, _step(5, 1)) is not None


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"max_failure_rate": 1.5}, r"reward.judge.max_failure_rate=1.5: must be in \[0, 1\]"),
        ({"failure_window": 0}, r"reward.judge.failure_window=0: must be >= 1"),
        ({"api_key_file": "keys/judge"}, r"reward.judge.api_key_file='keys/judge': must be an absolute path"),
    ],
)
def test_new_judge_keys_are_checked(kw, match):
    with pytest.raises(ConfigError, match=match):
        JudgeConfig(**kw)


def test_the_in_driver_scorer_fails_at_start_on_an_unreachable_judge():
    from ivgr_dist.reward.pool import make_scorer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}/v1"  # closed below: nothing listens
    judge = JudgeConfig(backend="openai", urls=[url], timeout_s=30.0, max_retries=3)
    t0 = time.monotonic()
    with pytest.raises(JudgeUnavailable, match=f"judge {url} is unreachable"):
        make_scorer(RewardConfig(num_workers=0, judge=judge), AlgorithmConfig())
    assert time.monotonic() - t0 < 5  # not timeout_s * (max_retries + 1)


def test_the_eval_scorer_checks_its_judge_at_start():
    """``ivgr-dist eval`` checks the judge before its engines start (``run_eval``): an unreachable judge is one line
    in seconds, not a table whose judged answers all scored 0."""
    from ivgr_dist.commands.evaluate import EvalScorer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    judge = JudgeConfig(backend="openai", urls=[url], timeout_s=30.0, max_retries=3)
    scorer = EvalScorer(AlgorithmConfig(), judge, rule_timeout_s=3.0)
    try:
        assert scorer.rule_pool.timeout_s == 3.0  # reward.rule_timeout_s reaches eval
        t0 = time.monotonic()
        with pytest.raises(JudgeUnavailable, match=f"judge {url} is unreachable"):
            scorer.check_judge()
        assert time.monotonic() - t0 < 5
    finally:
        scorer.close()


# ------------------------------------------------------------------------- the trainer, with stand-ins


class _Learners(FakeLearners):
    """Counts its saves (each writes one shard, as a rank confirms it)."""

    saves = 0

    def save_checkpoint(self, path: str) -> list[dict]:
        self.saves += 1
        return super().save_checkpoint(path)


class _Scorer(FakeScorer):
    """Each step asks the judge 10 questions, ``failures[step - 1]`` of which fail."""

    def __init__(self, failures: list[float], fail_state: bool = False):
        super().__init__()
        self.failures, self.fail_state = failures, fail_state
        self.step = 0

    def score_stream(self, groups, prompts, step, trace=None):
        self.step = step
        if self.failures[step - 1]:
            self.last_judge_error = "ConnectError"
        yield from super().score_stream(groups, prompts, step, trace)

    def metrics(self) -> dict[str, float]:
        return _step(10, self.failures[self.step - 1])

    def state_dict(self) -> dict:
        if self.fail_state:
            raise RuntimeError("reference cache lost")
        return {"references": {"version": 1, "entries": [[3, {"think": "t"}]]}}


def _trainer(tmp_path, judge_failures: list[float], fail_state: bool = False, **overrides):
    """A Trainer over in-process stand-ins (tests/support/fake_roles.py) whose judge fails
    ``judge_failures[i]`` of 10 requests at step i + 1."""
    from ivgr_dist.driver.trainer import Trainer

    cfg = fake_config(tmp_path, **{"trainer.max_steps": 10, "trainer.save_every": 0, **overrides})
    learners = _Learners()
    return Trainer(cfg, FakeData(), FakePool(), learners, _Scorer(judge_failures, fail_state), FakeSync())


def test_a_judge_failing_mid_run_stops_it_after_the_window_with_a_checkpoint(tmp_path, caplog):
    from ivgr_dist.driver.trainer import summarize

    trainer = _trainer(tmp_path, [0, 0, 10, 10, 10, 10, 10, 10, 10, 10], **{"reward.judge.failure_window": 2})
    with caplog.at_level(logging.WARNING):
        records = trainer.train()
    assert [r["step"] for r in records] == [1, 2, 3, 4]  # steps 3-4 failed 20 of 20 > 0.5: stop after step 4
    found = latest_checkpoint(tmp_path)
    assert found is not None and found.step == 4 and trainer.last_checkpoint == found.path  # resumable
    assert found.state["scorer"] == trainer.scorer.state_dict()
    assert "100% of 20 requests over the last 2 step(s)" in trainer.judge_stop
    assert trainer.judge_stop.endswith("last error: ConnectError")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert [w.split(":")[0] for w in warnings] == ["step 3", "step 4"]  # one console warning per failing step
    assert any(r.levelno == logging.ERROR and "stopped after step 4" in r.getMessage() for r in caplog.records)
    summary = summarize(trainer.cfg, records)
    assert "judge: 40 requests, 20 failed (50.0%)" in summary
    assert trainer.learners.exported == []  # a run stopped by its judge exports no policy


def test_a_healthy_judge_runs_to_the_end(tmp_path):
    trainer = _trainer(tmp_path, [0, 1, 0, 0, 0, 0, 0, 0, 0, 2], **{"trainer.max_steps": 10})
    assert len(trainer.train()) == 10 and trainer.judge_stop is None and latest_checkpoint(tmp_path).step == 10


def test_the_scorer_state_is_taken_before_the_shards(tmp_path):
    """A reference cache that cannot be read fails the save BEFORE the learner writes its shards (not after)."""
    trainer = _trainer(tmp_path, [0], fail_state=True)
    with pytest.raises(RuntimeError, match="reference cache lost"):
        trainer.save(1)
    assert trainer.learners.saves == 0 and latest_checkpoint(tmp_path) is None


def test_train_exits_1_with_one_line_when_the_judge_stopped_it(tmp_path, monkeypatch, capsys):
    from ivgr_dist.cli import main

    class StoppedByJudge:
        @classmethod
        def from_config(cls, cfg, scorer=None):
            return cls(cfg, scorer)

        def __init__(self, cfg, scorer=None):
            scorer.close()
            self.step, self.stop_signal = 0, None
            self.judge_stop = "the judge failed 100% of 30 requests over the last 3 step(s); last error: HTTP 503"
            self.last_checkpoint = tmp_path / "run" / "checkpoints" / "step_000003"

        def train(self):
            return [{"step": s, "weight_version": s, **_step(10, 10)} for s in (1, 2, 3)]

        def close(self):
            pass

    monkeypatch.setattr("ivgr_dist.runtime.startup.init_ray", lambda cfg: None)
    monkeypatch.setattr("ivgr_dist.driver.trainer.Trainer", StoppedByJudge)
    monkeypatch.setattr("ivgr_dist.commands.report.write_report", lambda out: out)
    argv = ["train", f"trainer.output_dir={tmp_path / 'run'}", "sft.enabled=false", "reward.num_workers=0"]
    assert main(argv) == 1
    out, err = capsys.readouterr()
    assert "judge: 30 requests, 30 failed (100.0%)" in out
    [line] = [ln for ln in err.splitlines() if ln.startswith("ivgr-dist train:")]
    assert line.startswith("ivgr-dist train: stopped after step 3: the judge failed 100%")
    assert "checkpoint " + str(tmp_path / "run" / "checkpoints" / "step_000003") in line and "resume" in line
