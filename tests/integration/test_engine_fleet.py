"""``EngineFleet`` (the rollout pool's and the judge fleet's engines) with stand-in engine actors on a local Ray
cluster of CPUs: start, a failed probe -> kill -> replacement, bounded restarts with back-off, the shared memory of
an engine whose actor died removed, and death read from the exception's class, never its text. The judge fleet on
the same stand-ins: an ``EngineDeadError`` answer drops the engine, its shared memory goes, a replacement serves.
``test_fleet_pool.py`` drives the rollout pool's dispatch on stand-ins; ``test_fleet.py`` and ``test_judge_fleet.py``
(slow tier) use real vLLM engines."""

from __future__ import annotations

import asyncio
import os
import time
import uuid

import pytest

from ivgr_dist.config import HealthConfig, JudgeConfig
from ivgr_dist.runtime.shm_segments import SHM_ROOT

pytestmark = pytest.mark.integration


class EngineDeadError(RuntimeError):
    """Named like vLLM's; its text never says "dead" (vLLM's: "EngineCore encountered an issue...")."""


class StandIn:
    """What the fleet calls on a ``RolloutWorker``. ``start`` creates a file in ``/dev/shm`` and reports it as the
    engine's segment, as ``RolloutWorker.start`` reports vLLM's queues (``kill_engine`` and ``shutdown`` remove it,
    as the worker's do); ``mode`` changes the probe's answer:
    ``core_dead`` raises ``EngineDeadError``, ``says_dead`` a RuntimeError whose text says the core is dead,
    ``hung`` sleeps past the timeout; ``cannot_kill``: ``kill_engine`` fails (as on a wedged actor)."""

    fail_start = False  # set on a subclass: start() raises

    def __init__(self, *args):
        self.index = args[2] if len(args) > 2 else 0
        self.mode = ""
        self.cannot_kill = False
        self.segment = ""

    def start(self) -> dict:
        import ray

        if self.fail_start:
            raise RuntimeError(f"engine {self.index}: bad model path")
        name = f"psm_fleettest_{uuid.uuid4().hex[:12]}"
        with open(os.path.join(SHM_ROOT, name), "wb") as f:
            f.write(b"\0" * 64)
        self.segment = name
        node = ray.get_runtime_context().get_node_id()
        return {"engine": self.index, "start_s": 0.0, "pid": os.getpid(), "node": node, "segments": [name]}

    def set_mode(self, mode: str, cannot_kill: bool = False) -> None:
        self.mode, self.cannot_kill = mode, cannot_kill

    async def probe(self, timeout_s):
        if self.mode == "core_dead":
            raise EngineDeadError("EngineCore encountered an issue. See stack trace (above) for the root cause.")
        if self.mode == "says_dead":
            raise RuntimeError(f"engine {self.index}: EngineCore is dead (or so this text says)")
        if self.mode == "hung":
            await asyncio.sleep(timeout_s + 5)
        return {"engine": self.index}

    async def generate_group(self, prompt, n=None, temperature=None, max_tokens=None, *rest):
        from ivgr_dist.types import Rollout

        if self.mode == "core_dead":
            raise EngineDeadError("EngineCore encountered an issue. See stack trace (above) for the root cause.")
        return [Rollout(prompt, i, [1], f"answer {self.index}", [-0.1], 0) for i in range(n or 1)]

    def kill_engine(self) -> int:
        if self.cannot_kill:
            raise RuntimeError("wedged")
        self.shutdown()
        return 0

    def shutdown(self) -> None:
        from ivgr_dist.runtime.shm_segments import unlink_segments

        unlink_segments([self.segment] if self.segment else [])


class FailsToStart(StandIn):
    fail_start = True


@pytest.fixture(scope="module")
def ray_cluster(ray_cluster):
    """The module's local cluster (tests/conftest.py); the stand-ins live in this module, which Ray's workers cannot
    import: shipped by value."""
    import sys

    ray_cluster.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    return ray_cluster


def _spec(**over):
    from ivgr_dist.rollout.fleet import FleetSpec

    base = dict(
        name="test fleet", what="test engine", tag="engine", section="test", keys=("max_restarts",),
        fewer="test.num_engines", num_engines=2, use_gpus=False, start_timeout_s=30, placement_timeout_s=10,
        restart_backoff_s=0, health=HealthConfig(interval_s=0.3, timeout_s=0.5, failures=2),
    )  # fmt: skip
    base.update(over)
    return FleetSpec(**base)


def _launcher(ray, cls=StandIn, log=None):
    remote = ray.remote(cls)

    def launch(i, placement):
        if log is not None:
            log.append(i)
        return remote.options(**placement.actor_options()).remote(None, None, i)

    return launch


def _until(cond, timeout_s: float = 20.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def _heal_until(fleet, cond, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, (fleet.serving, fleet.failures, fleet.fleet_metrics())
        fleet.heal()
        time.sleep(0.1)


def _present(names) -> list[str]:
    return [n for n in names if os.path.exists(os.path.join(SHM_ROOT, n))]


def test_a_hung_engine_is_killed_and_replaced_and_death_is_read_from_the_class(ray_cluster):
    from ivgr_dist.rollout.fleet import EngineFleet

    ray = ray_cluster
    launched: list[int] = []
    fleet = EngineFleet(_spec(), _launcher(ray, log=launched))
    try:
        assert fleet.serving == [0, 1] and launched == [0, 1] and fleet.counters["started"] == 2
        fleet.start_health_checks()
        # hung: two failed probes in a row, then killed and (by heal) replaced in a new placement group
        ray.get(fleet.actors[0].set_mode.remote("hung"))
        _until(lambda: 0 not in fleet.alive, what="the hung engine was not marked")
        assert (
            fleet.failures[-1].startswith("engine 0: unhealthy: no answer")
            and "(2 failed probes)" in fleet.failures[-1]
        )
        _heal_until(fleet, lambda: len(fleet.serving) == 2)
        assert sorted(fleet.serving) == [1, 2] and fleet.counters["restarts"] == 1 and fleet.placements[2] is not None
        # a probe whose text says "dead" is one failed probe; an EngineDeadError, whatever its text, is death
        ray.get(fleet.actors[1].set_mode.remote("says_dead"))
        ray.get(fleet.actors[2].set_mode.remote("core_dead"))
        _until(lambda: not fleet.alive, what="engines 1 and 2 were not marked")
        why = {f.split(":")[0]: f for f in fleet.failures}
        assert why["engine 2"].startswith("engine 2: unhealthy: EngineDeadError") and why["engine 2"].endswith("(dead)")
        assert why["engine 1"].endswith("(2 failed probes)"), fleet.failures  # not "(dead)": text is not a class
        assert fleet.fleet_metrics("test")["test/engines_unhealthy"] == 3
    finally:
        fleet.shutdown()


def test_a_dead_engines_shared_memory_is_removed_and_restarts_are_bounded(ray_cluster):
    from ivgr_dist.rollout.fleet import EngineFleet

    ray = ray_cluster
    fleet = EngineFleet(_spec(num_engines=1, max_restarts=1), _launcher(ray))
    segments = []
    try:
        segments += fleet.start_info[0]["segments"]
        assert _present(segments) == segments
        ray.kill(fleet.actors[0], no_restart=True)  # its actor died: it cannot unlink its engine's segments
        fleet.drop(0, "its actor died")
        assert _present(segments) == [], "the dead engine's shared memory was left in /dev/shm"
        _heal_until(fleet, lambda: fleet.serving == [1])
        segments += fleet.start_info[1]["segments"]
        ray.get(fleet.actors[1].set_mode.remote("", True))  # alive, but its kill_engine fails
        fleet.drop(1, "wedged")
        assert _present(segments) == []
        # the one restart is used: no replacement, and an error that says so
        with pytest.raises(
            RuntimeError, match=r"only 0 test engine\(s\) live, below min_engines=1: test.max_restarts=1"
        ):
            fleet.heal()
        assert fleet.counters["restarts"] == 1 and len(fleet.failures) == 2
    finally:
        fleet.shutdown()
        for name in _present(segments):
            os.unlink(os.path.join(SHM_ROOT, name))


def test_a_replacement_that_fails_to_start_backs_off(ray_cluster):
    from ivgr_dist.rollout.fleet import EngineFleet

    ray = ray_cluster
    good, bad = ray.remote(StandIn), ray.remote(FailsToStart)

    def launch(i, placement):  # the first engine starts; every replacement fails
        return (good if i == 0 else bad).options(**placement.actor_options()).remote(None, None, i)

    fleet = EngineFleet(_spec(num_engines=1, max_restarts=5, restart_backoff_s=30), launch)
    try:
        fleet.drop(0, "lost")
        _heal_until(fleet, lambda: fleet.counters["failed_starts"] == 1)
        assert fleet.failures[-1].startswith("engine 1: failed to start: RayTaskError(RuntimeError)"), fleet.failures
        for _ in range(5):  # within the back-off nothing more is requested
            fleet.heal()
            time.sleep(0.05)
        assert fleet.counters["restarts"] == 1 and fleet.fleet_metrics("t")["t/engines_pending"] == 0
    finally:
        for info in fleet.start_info:
            for name in _present(info.get("segments", [])):
                os.unlink(os.path.join(SHM_ROOT, name))
        fleet.shutdown()


class JudgeStandIn(StandIn):
    """A judge engine stand-in: its core dies when told to and the actor then cannot kill its processes."""


def test_the_judge_fleet_drops_an_engine_dead_engine_and_removes_its_shared_memory(ray_cluster, monkeypatch):
    from ivgr_dist.reward.judge import fleet as judge_fleet

    ray = ray_cluster
    remote = ray.remote(JudgeStandIn)
    monkeypatch.setattr(judge_fleet, "HEAL_INTERVAL_S", 0.2)
    monkeypatch.setattr(
        judge_fleet.JudgeFleet,
        "_launch",
        lambda self, i, placement: remote.options(**placement.actor_options()).remote(None, None, i),
    )
    cfg = JudgeConfig(
        backend="engine", model="unused", num_engines=1, max_restarts=2,
        health=HealthConfig(interval_s=60.0, timeout_s=5.0, failures=3),  # only the failed request finds it
    )  # fmt: skip

    async def scenario():
        fleet = judge_fleet.JudgeFleet(cfg, use_gpus=False, start_timeout_s=30)
        try:
            s = await fleet.start()
            assert s["engines_live"] == 1 and s["engine_restarts"] == 0
            assert await fleet.generate("prompt", 2, 0.5, 8) == ["answer 0", "answer 0"]
            first = fleet.fleet.start_info[0]["segments"]
            await asyncio.to_thread(ray.get, fleet.fleet.actors[0].set_mode.remote("core_dead", True))
            with pytest.raises(RuntimeError, match="judge engine 0: EngineDeadError"):
                await fleet.generate("prompt", 2, 0.5, 8)
            assert 0 not in fleet.fleet.alive and _present(first) == []  # dropped, its shared memory removed
            deadline = time.monotonic() + 20
            while (await fleet.stats())["engines_live"] < 1:  # the heal task replaces it
                assert time.monotonic() < deadline, await fleet.stats()
                await asyncio.sleep(0.1)
            assert await fleet.generate("prompt", 1, 0.5, 8) == ["answer 1"]
            s = await fleet.stats()
            assert s["engine_restarts"] == 1 and s["engine_requests"] == 3
            assert s["failures"] and s["failures"][0].startswith("judge engine 0: EngineDeadError")
            return fleet.fleet.start_info
        finally:
            await fleet.close()

    infos = asyncio.run(asyncio.wait_for(scenario(), timeout=120))
    assert all(_present(i.get("segments", [])) == [] for i in infos)  # the close removed the rest
