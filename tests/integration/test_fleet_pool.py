"""The self-healing, elastic rollout pool with stand-in engines on a local Ray cluster with declared GPUs.

The real ``RolloutPool`` (placement groups, dispatch, requeue, health monitor, heal, targets); only the engine
actor is a stand-in that answers like ``RolloutWorker`` (groups of fake rollouts, a probe, a kill switch), so
every fault is injected on demand in seconds: a dead actor, a dead core, a hung core, resources that appear
later. ``test_fleet.py`` does the same with real vLLM engines in a training run.
"""

from __future__ import annotations

import re
import time
from collections import Counter

import pytest

pytestmark = pytest.mark.integration

NUM_GPUS = 4


class StandInEngine:
    """What the pool calls on a ``RolloutWorker``; ``hang()`` makes its probe and generation stall as a stopped
    EngineCore does, ``die_core()`` makes every call fail with EngineDeadError as after a core crash."""

    def __init__(self, model_cfg, rollout_cfg, index, weight_backend):
        self.index, self.version, self.hung, self.core_dead = index, 0, False, False
        self.groups = 0

    def start(self) -> dict:
        import os

        return {"engine": self.index, "start_s": 0.0, "pid": os.getpid(), "node": ""}

    async def generate_group(self, prompt, n, temperature, max_tokens, seed, ignore_eos):
        import asyncio

        from ivgr_dist.types import Rollout

        self._check()
        await asyncio.sleep(0.05)
        while self.hung:
            await asyncio.sleep(0.05)
        self._check()
        self.groups += 1
        v = self.version
        return [Rollout(prompt, i, [1, 2], "ab", [-0.1, -0.2], v, weight_version_last=v) for i in range(n or 2)]

    def _check(self) -> None:
        if self.core_dead:
            raise EngineDeadError(f"engine {self.index}: EngineCore died")

    async def probe(self, timeout_s):
        import asyncio

        self._check()
        if self.hung:
            await asyncio.sleep(timeout_s)
            raise TimeoutError(f"rollout engine {self.index}: EngineCore did not answer within {timeout_s:g}s")
        return {"engine": self.index}

    async def update_weights(self, buckets, version):
        self._check()
        self.version = version
        return {"engine": self.index, "version": version, "update_s": 0.0}

    async def engine_dead(self) -> bool:
        return self.core_dead

    def hang(self) -> None:
        self.hung = True

    def die_core(self) -> None:
        self.core_dead = True

    def kill_engine(self) -> int:
        return 0

    async def weight_version(self) -> int:
        return self.version

    def shutdown(self) -> None:
        pass


class EngineDeadError(RuntimeError):
    """Named like vLLM's: the pool recognises a dead core by the class name."""


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray cluster that declares NUM_GPUS GPUs (Ray schedules them; nothing here uses a device)."""
    import sys

    import ray

    from support.ray_cluster import local_ray

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    with local_ray(8, NUM_GPUS) as cluster:
        yield cluster


def _cfg(**over):
    from ivgr_dist.config import load_config

    base = {
        "rollout.num_engines": 2,
        "rollout.n": 2,
        "rollout.placement_timeout_s": 5,
        "rollout.restart_backoff_s": 0,
        "rollout.group_timeout_s": 60,
        "rollout.health.interval_s": 0.5,
        "rollout.health.timeout_s": 0.5,
        "rollout.health.failures": 2,
        "rollout.engine.max_num_seqs": 4,
    }
    base.update(over)
    return load_config(None, [f"{k}={v}" for k, v in base.items()])


def _prompts(n: int):
    from ivgr_dist.types import Prompt

    return [
        Prompt(original_idx=i // 2, stream=("grounded", "textual")[i % 2], prompt_text="q", prompt_token_ids=[1],
               num_prompt_tokens=1, answer="a", question_type="exact", datasource="t")
        for i in range(n)
    ]  # fmt: skip


def _pool(cfg):
    from ivgr_dist.rollout.pool import RolloutPool

    return RolloutPool(cfg.model, cfg.rollout, "nccl", use_gpus=True, start_timeout_s=30, worker_cls=StandInEngine)


class _Healer:
    """The trainer's side of healing (generation's ``on_idle``): pushes the current version to joining engines,
    records the calls."""

    def __init__(self, pool, version: int = 3):
        self.pool, self.version, self.pushes = pool, version, []

    def push(self, engines):
        import ray

        self.pushes.append(list(engines))
        ray.get([self.pool.actors[e].update_weights.remote([], self.version) for e in engines], timeout=30)

    def __call__(self):
        return self.pool.heal(self.push)


def _heal_until(pool, healer, cond, timeout_s: float = 30.0) -> float:
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout_s, (pool.serving, pool.failures, pool.fleet_metrics())
        healer()
        time.sleep(0.1)
    return time.monotonic() - t0


def _free_gpus(ray) -> float:
    return ray.available_resources().get("GPU", 0.0)


def _wait_free(ray, gpus: float, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while _free_gpus(ray) != gpus and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _free_gpus(ray) == gpus


def test_a_dead_engine_is_replaced_with_the_current_weights_and_no_group_is_lost(ray_cluster):
    ray = ray_cluster
    pool = _pool(_cfg())
    healer = _Healer(pool)
    try:
        prompts = _prompts(16)
        gen = pool.generate(prompts, on_idle=healer)
        groups = [next(gen)]
        ray.kill(pool.actors[0], no_restart=True)  # the actor (its node) is gone mid-batch
        groups += list(gen)  # generate heals (on_idle) while it waits
        assert Counter(g[0].prompt.uid for g in groups) == Counter(p.uid for p in prompts)  # none lost or twice
        _heal_until(pool, healer, lambda: len(pool.serving) == 2)
        new = [e for e in pool.serving if e >= 2]
        assert new == [2] and healer.pushes == [[2]], (pool.serving, healer.pushes)
        assert ray.get(pool.actors[2].weight_version.remote()) == 3  # the current version before any work
        m = pool.fleet_metrics()
        assert m["rollout/engines_live"] == 2 and m["rollout/engine_restarts"] == 1 and m["rollout/replacement_s"] > 0
        assert pool.failures and pool.failures[0].startswith("engine 0: ")
        # the replacement takes work; a core that dies answers EngineDeadError and is replaced the same way
        ray.get(pool.actors[1].die_core.remote())
        groups = list(pool.generate(prompts, on_idle=healer))
        assert Counter(g[0].prompt.uid for g in groups) == Counter(p.uid for p in prompts)
        _heal_until(pool, healer, lambda: len(pool.serving) == 2)
        assert sorted(pool.serving) == [2, 3] and pool.counters["restarts"] == 2
        _wait_free(ray, NUM_GPUS - 2)  # the dead engines' devices were released
    finally:
        pool.shutdown()


def test_a_hung_engine_is_found_by_the_probe_and_its_groups_finish_elsewhere(ray_cluster):
    ray = ray_cluster
    cfg = _cfg()
    pool = _pool(cfg)
    healer = _Healer(pool)
    pool.start_health_checks()
    try:
        prompts = _prompts(12)
        ray.get(pool.actors[1].hang.remote())  # a stopped core: the actor answers, the core does not
        t0 = time.monotonic()
        groups = list(pool.generate(prompts, on_idle=healer))
        assert Counter(g[0].prompt.uid for g in groups) == Counter(p.uid for p in prompts)
        h = cfg.rollout.health
        assert pool.counters["unhealthy"] == 1 and 1 not in pool.alive
        assert time.monotonic() - t0 < h.interval_s * h.failures + h.timeout_s + 10
        assert re.match(r"engine 1: unhealthy: .*(did not answer|no answer).*\(2 failed probes\)", pool.failures[0])
        _heal_until(pool, healer, lambda: len(pool.serving) == 2)
        assert pool.fleet_metrics()["rollout/engines_unhealthy"] == 1
    finally:
        pool.shutdown()


def test_the_fleet_grows_when_room_appears_and_follows_its_target(ray_cluster):
    """4 GPUs, 3 held elsewhere: of a target of 3 engines one starts, two wait; freeing the GPUs starts them.
    Then the target goes 1 -> 2 (ivgr-dist scale) and the fleet follows, and min_engines is enforced."""
    ray = ray_cluster
    from ray.util.placement_group import placement_group, remove_placement_group

    from ivgr_dist.rollout.pool import RolloutError

    hog = placement_group([{"GPU": 1}] * 3)
    ray.get(hog.ready(), timeout=30)
    pool = _pool(_cfg(**{"rollout.num_engines": 3, "rollout.max_engines": 4}))
    healer = _Healer(pool)
    try:
        assert pool.serving == [0] and pool.fleet_metrics()["rollout/engines_pending"] == 2
        healer()
        assert pool.serving == [0]  # still no room
        remove_placement_group(hog)  # "a node joins"
        _heal_until(pool, healer, lambda: len(pool.serving) == 3)
        assert healer.pushes and pool.counters["restarts"] == 0  # growth is not a restart
        pool.set_target(1)
        healer()
        assert len(pool.serving) == 1 and pool.counters["retired"] == 2
        _wait_free(ray, NUM_GPUS - 1)  # the retired engines' groups were released
        pool.set_target(2)
        _heal_until(pool, healer, lambda: len(pool.serving) == 2)
        with pytest.raises(ValueError, match=r"engines=5: must be in \[1, rollout.max_engines=4\]"):
            pool.set_target(5)
    finally:
        pool.shutdown()
    # below min_engines with no room and no restarts left: a clear error, not a hang
    pool = _pool(_cfg(**{"rollout.num_engines": 1, "rollout.max_restarts": 0}))
    healer = _Healer(pool)
    try:
        ray.kill(pool.actors[0], no_restart=True)
        with pytest.raises(RolloutError, match=r"only 0 rollout engine\(s\) live, below rollout.min_engines=1: "
                           r"rollout.max_restarts=0 replacements used"):  # fmt: skip
            list(pool.generate(_prompts(2), on_idle=healer))
    finally:
        pool.shutdown()


class DiesOnFirstStart(StandInEngine):
    """Its worker process dies (SIGKILL) the first time an engine with this index starts, as a Ray worker that
    crashes while the actor is being created does; a marker file in ``markers`` remembers it."""

    markers = ""  # set by the test before the pool ships the class (by value) to Ray

    def start(self) -> dict:
        import os
        import signal
        from pathlib import Path

        marker = Path(self.markers) / f"engine_{self.index}"
        if not marker.exists():
            marker.write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)
        return super().start()


class FailsToStart(StandInEngine):
    def start(self) -> dict:
        raise RuntimeError(f"engine {self.index}: bad model path")


def test_an_engine_whose_worker_dies_while_the_pool_starts_is_started_again(ray_cluster, tmp_path, monkeypatch):
    """Ray workers sometimes die before the actor runs ("connection error code 2"): the pool starts that engine
    again in its placement group (counted), while an engine that raises is not retried."""
    from ivgr_dist.rollout.pool import RolloutPool

    monkeypatch.setattr(DiesOnFirstStart, "markers", str(tmp_path))
    cfg = _cfg()
    pool = RolloutPool(cfg.model, cfg.rollout, "nccl", use_gpus=True, start_timeout_s=30, worker_cls=DiesOnFirstStart)
    try:
        assert sorted(pool.serving) == [0, 1]
        assert sorted(p.name for p in tmp_path.iterdir()) == ["engine_0", "engine_1"]  # each died once
        assert pool.fleet_metrics()["rollout/engine_failed_starts"] == 2
        for info in pool.start_info:  # the engine that serves runs in a new process
            assert info["pid"] != int((tmp_path / f"engine_{info['engine']}").read_text())
    finally:
        pool.shutdown()
    _wait_free(ray_cluster, NUM_GPUS)
    t0 = time.monotonic()
    with pytest.raises(Exception, match="bad model path"):
        RolloutPool(cfg.model, cfg.rollout, "nccl", use_gpus=True, start_timeout_s=30, worker_cls=FailsToStart)
    assert time.monotonic() - t0 < 20  # not retried
    _wait_free(ray_cluster, NUM_GPUS)
