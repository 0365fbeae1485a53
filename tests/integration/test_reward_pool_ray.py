"""RewardPool on a local Ray cluster: every rollout rewarded, judge faults absorbed, cache restored, workers replaced."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from ivgr_dist.config import AlgorithmConfig, JudgeConfig, RewardConfig
from ivgr_dist.driver.checkpoints import latest_checkpoint
from ivgr_dist.reward.judge import JudgeUnavailable
from ivgr_dist.reward.pool import RewardPool, RewardWorker, make_scorer
from ivgr_dist.reward.reference_cache import CACHE_NAME
from ivgr_dist.types import Prompt, Rollout
from support.fault_server import Fault, FaultServer

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_reward.py"
_spec = importlib.util.spec_from_file_location("bench_reward", BENCH)
bench_reward = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_reward)
synthetic_batch = bench_reward.synthetic_batch  # the benchmark's rollouts: every reward path runs

OK = "<score>1.0</score> <verdict>yes</verdict>"


def _prompts(groups):
    return [g[0].prompt for g in groups]


def _openai(url: str, **kw) -> JudgeConfig:
    return JudgeConfig(backend="openai", urls=[url], **{"timeout_s": 2.0, "max_retries": 1, "backoff_s": 0.01, **kw})


def _score(pool, groups, step=1):
    out = list(pool.score_stream(groups, _prompts(groups), step))
    assert sorted(g[0].prompt.uid for g in out) == sorted(g[0].prompt.uid for g in groups)  # each group once
    assert all(r.rewards and "format" in r.rewards for g in out for r in g)  # every rollout rewarded
    return out


def test_pool_scores_every_rollout_with_the_rule_judge(ray_cluster):
    groups = synthetic_batch(8, 3, seed=1)
    pool = RewardPool(RewardConfig(num_workers=2), AlgorithmConfig())
    try:
        out = _score(pool, groups)
        assert all("consistency" in r.rewards for g in out if g[0].prompt.stream == "textual" for r in g)
        m = pool.metrics()
        assert m["judge/calls"] > 0 and m["judge/failures"] == 0 and m["refcache/size"] > 0
        assert ray_cluster.get_actor(CACHE_NAME, namespace=pool.namespace) is not None  # named, per-run namespace
    finally:
        pool.close()


@pytest.mark.parametrize("fault", ["timeout", "http500"])
def test_a_failing_judge_costs_bounded_time_and_no_reward(ray_cluster, fault):
    default = Fault.delay(30.0) if fault == "timeout" else Fault.status(500)
    groups = synthetic_batch(4, 3, seed=2)
    with FaultServer(default=default) as srv:
        judge = _openai(srv.url, timeout_s=0.5, fallback_consistency=0.3, on_failure="zero")
        cfg = RewardConfig(num_workers=2, judge=judge)
        pool = RewardPool(cfg, AlgorithmConfig())
        try:
            t0 = time.monotonic()
            out = _score(pool, groups)
            wall = time.monotonic() - t0
            m = pool.metrics()
        finally:
            pool.close()
    assert wall < 30
    assert m["judge/requests"] > 0 and m["judge/failures"] == m["judge/requests"]
    assert m["judge/calls"] == 2 * m["judge/requests"]  # one retry each
    if fault == "timeout":
        assert m["judge/timeouts"] == m["judge/calls"]
    textual = [r for g in out if g[0].prompt.stream == "textual" for r in g]
    judged = [r for r in textual if r.rewards["consistency"] != 0.0]
    assert judged and all(r.rewards["consistency"] == 0.3 for r in judged)  # the explicit fallback


def test_pool_masks_what_a_failing_judge_could_not_score(ray_cluster):
    groups = synthetic_batch(4, 3, seed=2)
    with FaultServer(default=Fault.status(500)) as srv:
        pool = RewardPool(RewardConfig(num_workers=2, judge=_openai(srv.url, on_failure="mask")), AlgorithmConfig())
        try:
            out = _score(pool, groups)
            m = pool.metrics()
        finally:
            pool.close()
    rollouts = [r for g in out for r in g]
    assert m["judge/requests"] > 0 and m["judge/failures"] == m["judge/requests"]
    judged = [g for g in out if g[0].prompt.stream == "textual" and g[0].consistency_reference is not None]
    assert judged and all("consistency" not in r.rewards for g in judged for r in g)  # no fallback trained on
    excluded = [r for r in rollouts if r.excluded]
    assert excluded and all("accuracy" not in r.rewards for r in excluded)
    assert m["reward/judge_excluded_rollouts"] == len(excluded)
    assert m["reward/judge_masked_groups"] == len(judged) + len(
        {r.prompt.uid for r in excluded} - {g[0].prompt.uid for g in judged}
    )


def test_reference_cache_restored_exactly_after_restart(ray_cluster):
    groups = synthetic_batch(6, 3, seed=3)
    pool = RewardPool(RewardConfig(num_workers=1), AlgorithmConfig())
    try:
        _score(pool, groups)
        state = json.loads(json.dumps(pool.state_dict()))  # as trainer_state.json holds it
        stats = ray_cluster.get(pool.cache.stats.remote())
    finally:
        pool.close()
    assert state["references"]["entries"], "the batch should have produced references"
    restarted = RewardPool(RewardConfig(num_workers=1), AlgorithmConfig())
    try:
        assert ray_cluster.get(restarted.cache.stats.remote())["size"] == 0
        restarted.load_state_dict(state)
        assert restarted.state_dict() == state
        restored = ray_cluster.get(restarted.cache.stats.remote())
        assert (restored["size"], restored["mean_box_iou"]) == (stats["size"], stats["mean_box_iou"])
    finally:
        restarted.close()


def test_killed_worker_groups_are_rescored(ray_cluster):
    groups = synthetic_batch(6, 3, seed=4)
    with FaultServer(default=Fault.delay(1.0, OK)) as srv:
        pool = RewardPool(RewardConfig(num_workers=2, judge=_openai(srv.url, timeout_s=10.0)), AlgorithmConfig())
        try:

            def arrivals():
                yield from groups
                victim = pool.workers[0]
                time.sleep(0.3)  # its groups are waiting on the judge
                ray_cluster.kill(victim)

            out = list(pool.score_stream(arrivals(), _prompts(groups), 1))
            m = pool.metrics()
        finally:
            pool.close()
    assert len(out) == len(groups) and all(r.rewards for g in out for r in g)
    assert m["reward/rescored"] >= 1 and m["reward/worker_restarts"] == 1
    assert m["judge/failures"] == 0


def test_bench_script_prints_no_missing_rewards(ray_cluster):
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    cmd = [sys.executable, str(BENCH), "--records", "32", "--schedule", "both", "--generation-s", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [x["schedule"] for x in lines] == ["after", "pipelined"]
    assert all(x["rewards_missing"] == 0 and x["rewards_total"] == 320 for x in lines)
    assert "tail_ratio_pipelined_over_after" in lines[1]


# ------------------------------------------------------------------------------ stuck and runaway scoring

STUCK_MARKER = os.path.join(tempfile.gettempdir(), f"ivgr-stuck-worker-{uuid.uuid4().hex}")


class _LoopBlockingJudge:
    """The worker's judge, except that the first batch any worker sees (``STUCK_MARKER`` does not exist yet) blocks
    the worker's event loop in a sync call, as a runaway rule or a blocking client would."""

    def __init__(self, inner):
        self.inner = inner

    async def score(self, requests):
        try:
            os.close(os.open(STUCK_MARKER, os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            return await self.inner.score(requests)
        time.sleep(300)  # the loop is blocked: the worker answers nothing until it is killed
        return await self.inner.score(requests)

    async def close(self):
        await self.inner.close()


class StuckOnceWorker(RewardWorker):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.judge = _LoopBlockingJudge(self.judge)


def test_a_stuck_worker_is_killed_replaced_and_its_groups_rescored(ray_cluster):
    ray_cluster.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the worker class lives here
    groups = synthetic_batch(4, 3, seed=5)
    pool = RewardPool(RewardConfig(num_workers=2), AlgorithmConfig(), worker_cls=StuckOnceWorker)
    pool.group_deadline_s = 3.0
    try:
        t0 = time.monotonic()
        out = _score(pool, groups)
        wall = time.monotonic() - t0
        m = pool.metrics()
    finally:
        pool.close()
        if os.path.exists(STUCK_MARKER):
            os.unlink(STUCK_MARKER)
    assert m["reward/worker_timeouts"] == 1 and m["reward/group_timeouts"] >= 1 and m["reward/rescored"] >= 1
    assert m["judge/failures"] == 0 and m["judge/calls"] > 0  # rescored by a live worker with its judge
    assert all("consistency" in r.rewards for g in out if g[0].prompt.stream == "textual" for r in g)
    assert wall < 60


class _SlowJudge:
    """The worker's judge, slower than the test's group deadline but never blocking the worker's event loop."""

    def __init__(self, inner):
        self.inner = inner

    async def score(self, requests):
        import asyncio

        await asyncio.sleep(4.0)
        return await self.inner.score(requests)

    async def close(self):
        await self.inner.close()


class SlowJudgeWorker(RewardWorker):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.judge = _SlowJudge(self.judge)


def test_a_slow_judge_scores_late_groups_rules_only_and_keeps_its_workers(ray_cluster):
    """A group past its deadline whose worker still answers (the judge is slow, the worker is not stuck): rules-only
    in the driver, no worker killed (killing it cost every group it held, and its slot's respawns)."""
    ray_cluster.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    groups = synthetic_batch(2, 2, seed=6)
    pool = RewardPool(RewardConfig(num_workers=1), AlgorithmConfig(), worker_cls=SlowJudgeWorker)
    pool.group_deadline_s = 1.5
    try:
        pid = ray_cluster.get(pool.workers[0].ping.remote(), timeout=30)
        out = _score(pool, groups)
        m = pool.metrics()
        assert ray_cluster.get(pool.workers[0].ping.remote(), timeout=30) == pid  # the same worker
    finally:
        pool.close()
    assert m["reward/group_timeouts"] >= 1 and m.get("reward/worker_timeouts", 0) == 0
    assert m.get("reward/worker_restarts", 0) == 0 and sum(len(g) for g in out) == sum(len(g) for g in groups)


RUNAWAY = "9^{99999999}"  # minutes of SymPy in one C call; passes rules._math_risky


def _math_group(idx: int, answers: list[str]) -> list[Rollout]:
    p = Prompt(original_idx=idx, stream="single", prompt_text="", prompt_token_ids=[1], num_prompt_tokens=1,
               answer="0.5", question_type="math", datasource="t", target_boxes=[],
               question="Half of one?")  # fmt: skip
    return [Rollout(p, i, [1], f"<think>x</think><answer>{a}</answer>", [0.0], 0) for i, a in enumerate(answers)]


def _rule_children(pid: int) -> list[int]:
    """PIDs of the rule processes (``rule_pool._child_main``) whose parent is ``pid``."""
    out = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if ppid == pid and b"_child_main" in f.read():
                    out.append(int(entry))
        except (ValueError, OSError, IndexError):
            continue
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_runaway_math_answer_in_a_worker_costs_one_rollout(ray_cluster):
    timeout_s = 1.0
    pool = RewardPool(RewardConfig(num_workers=1, rule_timeout_s=timeout_s), AlgorithmConfig())
    try:
        warm = _math_group(1, ["\\frac{1}{2}"])  # starts the worker's rule processes
        list(pool.score_stream([warm], _prompts([warm]), 1))
        worker_pid = ray_cluster.get(pool.workers[0].ping.remote())
        children = _rule_children(worker_pid)
        group = _math_group(2, ["\\frac{1}{2}", RUNAWAY, "0.5"])
        t0 = time.monotonic()
        list(pool.score_stream([group], _prompts([group]), 1))
        wall = time.monotonic() - t0
        m = pool.metrics()
    finally:
        pool.close()
    assert m["reward/rule_timeouts"] == 1 and wall < timeout_s + 3.0
    assert group[0].rewards["accuracy"] == group[2].rewards["accuracy"] == 1.0
    assert group[1].excluded and "accuracy" not in group[1].rewards  # on_failure=mask
    assert len(children) == 2  # the worker spawned its rule processes; they die with it
    deadline = time.monotonic() + 15
    while any(_alive(c) for c in children) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(c) for c in children)


def test_too_few_cpus_fails_fast_with_the_fix_named(ray_cluster):
    with pytest.raises(RuntimeError, match="reward.cpus_per_worker=0"):
        RewardPool(RewardConfig(num_workers=64, cpus_per_worker=1.0), AlgorithmConfig())


def test_a_worker_without_the_drivers_key_fails_at_start(ray_cluster, monkeypatch):
    """As under `ray job submit`: the driver has $VAR, the reward workers (started by a cluster that never saw
    it) do not. make_scorer fails naming the variable and both ways to get a key to the workers."""
    var = f"IVGR_TEST_KEY_{os.getpid()}"  # set after ray.init: the workers' environment never had it
    monkeypatch.setenv(var, "sk-driver-only-0123456789")
    with FaultServer(api_key="sk-driver-only-0123456789") as srv:
        t0 = time.monotonic()
        with pytest.raises(JudgeUnavailable) as err:
            make_scorer(RewardConfig(num_workers=2, judge=_openai(srv.url, api_key_env=var)), AlgorithmConfig())
        wall = time.monotonic() - t0
        assert srv.count == 0  # found before any request
    msg = str(err.value)
    assert f"${var} is set in the driver but not in this reward worker" in msg
    assert "ray job submit" in msg and "env_vars" in msg and "reward.judge.api_key_file" in msg
    assert "sk-driver-only" not in msg and "\n" not in msg and wall < 30
    _wait_cpus_free(ray_cluster)  # the workers were closed


def _wait_cpus_free(ray, timeout_s: float = 20.0) -> None:
    total = ray.cluster_resources()["CPU"]
    deadline = time.monotonic() + timeout_s
    while ray.available_resources().get("CPU", 0.0) < total:
        assert time.monotonic() < deadline, f"reward workers still hold CPUs: {ray.available_resources()}"
        time.sleep(0.2)


def test_a_404_from_the_judge_fails_at_start_from_the_workers(ray_cluster):
    with FaultServer(served_model="judge") as srv:
        with pytest.raises(JudgeUnavailable, match=r"HTTP 404.*reward.judge.model='other-model'"):
            make_scorer(RewardConfig(num_workers=2, judge=_openai(srv.url, model="other-model")), AlgorithmConfig())
        assert srv.count == 2  # one test request per worker, none retried


def _checkpoint(root, step: int, scorer_state: dict) -> None:
    """A checkpoint as Trainer.save writes it (``checkpoints.save``), the learner's part an empty directory."""
    from ivgr_dist.driver import checkpoints

    state = {"step": step, "weight_version": step, "sampler": {}, "scorer": scorer_state}
    checkpoints.save(root, step, lambda path: path.mkdir(), state, keep=0)


def test_a_lost_reference_cache_is_restored_from_the_last_checkpoint(ray_cluster, tmp_path):
    batch = synthetic_batch(6, 3, seed=3)
    textual = [g for g in batch if g[0].prompt.stream == "textual"]
    pool = RewardPool(RewardConfig(num_workers=2), AlgorithmConfig(), output_dir=tmp_path)
    try:
        _score(pool, batch)
        saved = json.loads(json.dumps(pool.state_dict()))
        assert saved["references"]["entries"], "the batch should have produced references"
        _checkpoint(tmp_path, 1, saved)
        assert pool.metrics()["refcache/restores"] == 0
        old = pool.cache
        ray_cluster.kill(old)  # mid-run: the next reads are the workers' (textual groups alone: no grounded partner)
        out = _score(pool, textual, step=2)
        m = pool.metrics()
        assert m["refcache/restores"] == 1 and m["reward/rescored"] >= 1 and m["judge/failures"] == 0
        assert m["refcache/size"] == len(saved["references"]["entries"])
        restored = {k for k, _ in saved["references"]["entries"]}
        judged = {g[0].prompt.original_idx for g in out if g[0].consistency_reference is not None}
        assert judged == restored  # every record with a saved reference was judged against it
        assert pool.cache is not old and ray_cluster.get(pool.cache.ping.remote())
        assert pool.state_dict() == saved  # a save afterwards succeeds, with the checkpoint's references
        ray_cluster.kill(pool.cache)  # lost again; now the driver is the first to ask (the save)
        assert pool.state_dict() == saved and pool.metrics()["refcache/restores"] == 1
    finally:
        pool.close()
    assert latest_checkpoint(tmp_path).step == 1


def test_judge_engines_that_cannot_start_fail_at_start(ray_cluster, tmp_path):
    """backend=engine: the fleet starts in make_scorer (it used to start at the first request, and a failed start
    turned every request into a fallback, logged only in a worker's log file)."""
    judge = JudgeConfig(backend="engine", model=str(tmp_path / "no-such-judge"))
    with pytest.raises(JudgeUnavailable, match=r"reward.judge.model='.*no-such-judge' did not start: no judge engine"):
        make_scorer(RewardConfig(num_workers=0, judge=judge), AlgorithmConfig())
    _wait_cpus_free(ray_cluster)  # the fleet and its engine's placement group were released
