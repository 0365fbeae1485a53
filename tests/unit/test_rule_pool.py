"""Bounded rule scoring: math-verify in spawned processes (``RulePool``), killed past ``reward.rule_timeout_s``.

``9^{99999999}`` passes the ``_math_risky`` screen and keeps SymPy in one C call (CPython's big-integer power) for
minutes, holding the GIL: outside a main thread nothing but killing a process stops it. Every scoring here runs
off the main thread (the in-process scorer's loop thread, or a helper thread for the driver's fallback).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from ivgr_dist.config import AlgorithmConfig, ConfigError, JudgeConfig, RewardConfig
from ivgr_dist.reward import rules
from ivgr_dist.reward.judge.rule import RuleJudge
from ivgr_dist.reward.rule_pool import RulePool
from ivgr_dist.reward.scorer import InProcessScorer, job_from_group, score_job
from ivgr_dist.types import Prompt, Rollout

pytestmark = pytest.mark.timeout(120)

RUNAWAY = "9^{99999999}"  # minutes of SymPy; not caught by the screen
TIMEOUT_S = 1.0
MARGIN_S = 2.5  # killing a child, handing the rest to the warm one, a shared 2-core machine


def _alive(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie left to an init that does not reap counts as dead)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _math_group(idx: int, texts: list[str], answer: str = "0.5") -> list[Rollout]:
    prompt = Prompt(
        original_idx=idx, stream="single", prompt_text="", prompt_token_ids=[1], num_prompt_tokens=1, answer=answer,
        question_type="math", datasource="t", target_boxes=[], question="What is half of one?",
    )  # fmt: skip
    return [Rollout(prompt, i, [1], f"<think>x</think><answer>{t}</answer>", [-0.1], 0) for i, t in enumerate(texts)]


def _in_thread(fn, limit_s: float):
    """``fn()`` in a helper thread (not the main thread); fails if it has not returned after ``limit_s``."""
    out: dict = {}

    def run() -> None:
        try:
            out["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            out["error"] = exc

    t0 = time.monotonic()
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(limit_s)
    assert not thread.is_alive(), f"still scoring after {limit_s:.1f} s"
    if "error" in out:
        raise out["error"]
    return out["value"], time.monotonic() - t0


def test_rule_timeout_is_validated():
    for bad in (0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match=r"reward.rule_timeout_s=.*: must be finite and > 0 \(seconds\)"):
            RewardConfig(rule_timeout_s=bad)
    with pytest.raises(ValueError, match="finite"):
        RulePool(float("nan"))


@pytest.fixture(scope="module")
def pool():
    pool = RulePool(TIMEOUT_S)
    assert pool.math_match([("\\frac{1}{2}", "0.5")]) == [1.0]  # starts (and warms) both children
    yield pool
    pool.close()


def test_pool_answers_a_group_and_loses_only_the_runaway(pool):
    before, timeouts = set(pool.pids()), pool.timeouts
    pairs = [("\\frac{1}{2}", "0.5"), (RUNAWAY, "1"), ("x+1", "1+x"), ("3", "0.5")]
    verdicts, wall = _in_thread(lambda: pool.math_match(pairs), 60)
    assert verdicts == [1.0, None, 1.0, 0.0] and pool.timeouts == timeouts + 1
    assert wall < TIMEOUT_S + MARGIN_S
    killed = before - set(pool.pids())
    assert len(killed) == 1 and not any(_alive(p) for p in killed)  # replaced, not leaked
    assert len(pool.pids()) == 2
    assert pool.math_match([("2", "2.0")]) == [1.0]  # the pool goes on


def test_zero_scores_a_runaway_rollout_0_and_keeps_it(pool):
    job = job_from_group(_math_group(5, ["\\frac{1}{2}", RUNAWAY, "7"]), step=1)
    coro = score_job(job, RuleJudge(), AlgorithmConfig(), 0.0, None, on_failure="zero", rule_pool=pool)
    result, wall = _in_thread(lambda: asyncio.run(coro), 60)
    assert wall < TIMEOUT_S + MARGIN_S
    assert [r["accuracy"] for r in result.rewards] == [1.0, 0.0, 0.0] and not any(result.excluded)
    assert result.counts["rule_timeouts"] == 1


def test_runaway_answer_off_the_main_thread_costs_one_rollout():
    # The in-process scorer runs score_job on its loop thread; on_failure=mask (the default).
    scorer = InProcessScorer(AlgorithmConfig(), JudgeConfig(), judge=RuleJudge(), rule_timeout_s=TIMEOUT_S)
    try:
        warm = _math_group(1, ["\\frac{1}{2}"])
        list(scorer.score_stream([warm], [warm[0].prompt], step=1))
        group = _math_group(2, ["\\frac{1}{2}", RUNAWAY, "0.5", "7"])
        _, wall = _in_thread(lambda: list(scorer.score_stream([group], [group[0].prompt], step=1)), 60)
        m = scorer.metrics()
        pids = scorer.rule_pool.pids()
    finally:
        scorer.close()
    assert wall < TIMEOUT_S + MARGIN_S
    assert m["reward/rule_timeouts"] == 1
    assert [r.rewards["accuracy"] for r in (group[0], group[2], group[3])] == [1.0, 1.0, 0.0]  # scored as usual
    assert not any(r.excluded for r in (group[0], group[2], group[3]))
    # unknown accuracy: left out of the group's advantage, as a failed judge request
    assert group[1].excluded and "accuracy" not in group[1].rewards
    assert m["reward/judge_excluded_rollouts"] == 1
    assert len(pids) == 2 and not any(_alive(p) for p in pids)  # close() ended the scorer's children


class _SilentJudge:
    """A judge that never answers (the driver's group deadline must fire)."""

    async def score(self, requests):
        await asyncio.sleep(3600)

    async def close(self):
        return None


def test_driver_fallback_after_a_deadline_is_bounded_too():
    scorer = InProcessScorer(AlgorithmConfig(), JudgeConfig(), judge=_SilentJudge(), rule_timeout_s=TIMEOUT_S)
    scorer.group_deadline_s = 1.0
    try:
        assert scorer.rule_pool.math_match([("1", "1")]) == [1.0]  # warm
        group = _math_group(3, ["x", RUNAWAY, "0.5"])  # "x" needs the (silent) judge
        _, wall = _in_thread(lambda: list(scorer.score_stream([group], [group[0].prompt], step=1)), 60)
        m = scorer.metrics()
    finally:
        scorer.close()
    assert m["reward/group_timeouts"] == 1 and m["reward/rule_timeouts"] == 1
    assert wall < scorer.group_deadline_s + TIMEOUT_S + MARGIN_S + 0.5  # + one _collect poll
    assert group[2].rewards["accuracy"] == 1.0 and group[1].excluded


def test_long_ground_truth_scores_zero_without_a_judge_and_is_counted():
    class Spy(RuleJudge):
        asked: list = []

        async def score(self, requests):
            self.asked.extend(requests)
            return await super().score(requests)

    spy, long_gt = Spy(), "a red car " * 101  # 1010 characters > algorithm.max_answer_chars = 1000
    scorer = InProcessScorer(AlgorithmConfig(), JudgeConfig(), judge=spy)
    try:
        group = _math_group(4, ["a red car", long_gt], answer=long_gt)
        group[0].prompt.question_type = "free_form"
        list(scorer.score_stream([group], [group[0].prompt], step=1))
        m = scorer.metrics()
    finally:
        scorer.close()
    assert [r.rewards["accuracy"] for r in group] == [0.0, 0.0]
    assert spy.asked == [] and m["reward/long_ground_truths"] == 1
    assert rules.rule_accuracy(long_gt, long_gt, "exact") == 0.0  # the rule itself, for every caller


def test_children_die_with_their_parent(tmp_path):
    # The parent holds a child busy on the runaway (one C call, GIL held) and an idle one; SIGKILL the parent.
    script = textwrap.dedent(f"""
        import sys, threading, time
        from ivgr_dist.reward.rule_pool import RulePool
        pool = RulePool(600.0)
        pool.math_match([("1", "1")])
        threading.Thread(target=pool.math_match, args=([({RUNAWAY!r}, "1")],), daemon=True).start()
        time.sleep(1.0)
        print(*pool.pids(), flush=True)
        time.sleep(600)
    """)
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(p) for p in parent.stdout.readline().split()]
        assert len(pids) == 2 and all(_alive(p) for p in pids)
    finally:
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(p) for p in pids), "rule processes outlived their parent"
