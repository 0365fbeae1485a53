"""``JudgeFleet``: ONE fleet of judge vLLM engines that every reward worker shares (``reward.judge.backend=engine``).

Without it each reward worker started its own engines (``reward.num_workers x judge.num_engines`` device
actors). The fleet is a Ray actor (async, no resources of its own) created once by ``make_scorer``; reward
workers and the driver's scorer hold its handle and call :meth:`JudgeFleet.generate`. It owns
``reward.judge.num_engines`` engines (``RolloutWorker`` actors serving ``reward.judge.model`` with the engine
arguments of ``reward.judge.engine``), each in its own placement group, and keeps them healthy the way the
rollout pool does: every ``reward.judge.health.interval_s`` each engine answers a probe through its
EngineCore (``RolloutWorker.probe``); ``health.failures`` failures in a row, or a dead actor or core, and
the engine is killed (its vLLM processes too), its group released and a replacement started (at most
``reward.judge.max_restarts``). A request on an engine that fails raises; the judge's retry loop
(``run_request``) sends it again, to a live engine.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

log = logging.getLogger(__name__)

__all__ = ["JudgeFleet", "close_fleet", "create_fleet"]


class JudgeFleet:
    """The judge engines (see the module docstring); methods are awaited by many callers at once."""

    def __init__(self, cfg, use_gpus: bool | None = None, start_timeout_s: float = 600.0):
        from ivgr_dist.logs import redirect_actor_output

        redirect_actor_output("judge-fleet")
        self.cfg = cfg
        self.use_gpus = use_gpus
        self.start_timeout_s = start_timeout_s
        self.actors: dict[int, Any] = {}
        self.placements: dict[int, Any] = {}
        self.in_flight: dict[int, int] = {}
        self.serving: list[int] = []
        self.fails: dict[int, int] = {}
        self.failures: list[str] = []
        self.counters = {"restarts": 0, "unhealthy": 0, "failed_starts": 0, "requests": 0}
        self._next = 0
        self._lock: asyncio.Lock | None = None
        self._started = False
        self._health: asyncio.Task | None = None
        self._replacing: set[asyncio.Task] = set()

    # ------------------------------------------------------------------------------------ engines

    async def start(self) -> dict:
        """Start the engines once (every caller awaits the same start); returns :meth:`stats`."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if not self._started:
                import ray

                if self.use_gpus is None:
                    self.use_gpus = ray.cluster_resources().get("GPU", 0) > 0
                ids = [self._next + i for i in range(self.cfg.num_engines)]
                self._next += len(ids)
                results = await asyncio.gather(*(self._start_engine(i) for i in ids), return_exceptions=True)
                errors = [r for r in results if isinstance(r, BaseException)]
                if not self.serving:
                    cause = getattr(errors[0], "cause", None) or errors[0]  # a RayTaskError's own exception
                    why = (str(cause).strip().splitlines() or [""])[-1][:300]
                    raise RuntimeError(f"no judge engine started: {type(cause).__name__}: {why}")
                self._started = True
                self._health = asyncio.get_running_loop().create_task(self._health_loop())
                log.info("judge fleet: %d of %d engines serving", len(self.serving), self.cfg.num_engines)
        return await self.stats()

    async def _start_engine(self, i: int) -> None:
        import ray

        from ivgr_dist.logs import actor_env
        from ivgr_dist.placement import EnginePlacement
        from ivgr_dist.reward.judge.engine import judge_engine_setup
        from ivgr_dist.rollout.worker import RolloutWorker

        placement = EnginePlacement.request(i, 1, bool(self.use_gpus), dict(self.cfg.resources) or None)
        self.placements[i] = placement
        try:
            await asyncio.wait_for(placement.ready_ref(), timeout=self.start_timeout_s)
            model_cfg, rollout_cfg, env = judge_engine_setup(self.cfg, self.cfg.engine, bool(self.use_gpus))
            actor = (
                ray.remote(RolloutWorker)
                .options(
                    **placement.actor_options(),
                    max_concurrency=1024,
                    runtime_env={"env_vars": {**env, **actor_env(f"judge-{i}")}},
                )
                .remote(model_cfg, rollout_cfg, i, "ivgr_shm")
            )
            self.actors[i] = actor
            info = await asyncio.wait_for(actor.start.remote(), timeout=self.start_timeout_s)
        except BaseException as exc:
            self.counters["failed_starts"] += 1
            self.failures.append(f"judge engine {i}: failed to start: {type(exc).__name__}: {str(exc)[:200]}")
            log.error("judge engine %d failed to start: %s", i, exc)
            await self._kill(i)
            raise
        self.in_flight[i] = 0
        self.serving.append(i)
        log.info("judge engine %d serving (started in %.1fs)", i, info.get("start_s", 0.0))

    async def _kill(self, i: int) -> None:
        import ray

        actor = self.actors.pop(i, None)
        if actor is not None:
            try:  # its vLLM processes first: a stopped EngineCore would outlive the actor
                await asyncio.wait_for(actor.kill_engine.remote(), timeout=10)
            except Exception:  # noqa: BLE001 - dead or hung actor: the kill below
                pass
            ray.kill(actor, no_restart=True)
        placement = self.placements.pop(i, None)
        if placement is not None:
            placement.release()

    async def _lose(self, i: int, reason: str, unhealthy: bool = False) -> None:
        """Take engine ``i`` out (no new requests), kill it, start a replacement (bounded)."""
        if i not in self.serving:
            return
        self.serving.remove(i)
        self.failures.append(f"judge engine {i}: {reason}")
        if unhealthy:
            self.counters["unhealthy"] += 1
        log.error("judge engine %d %s; %d serving", i, reason, len(self.serving))
        await self._kill(i)
        if self.counters["restarts"] >= self.cfg.max_restarts:
            log.error("judge fleet: reward.judge.max_restarts=%d used; not replacing", self.cfg.max_restarts)
            return
        self.counters["restarts"] += 1
        new = self._next
        self._next += 1
        task = asyncio.get_running_loop().create_task(self._start_engine(new))
        self._replacing.add(task)
        task.add_done_callback(self._replacing.discard)
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # logged in _start_engine

    async def _health_loop(self) -> None:
        h = self.cfg.health
        if not h.enabled:
            return
        while True:
            await asyncio.sleep(h.interval_s)
            engines = list(self.serving)

            async def probe(i: int) -> tuple[int, str | None, bool]:
                try:
                    await asyncio.wait_for(self.actors[i].probe.remote(h.timeout_s), timeout=h.timeout_s + 2)
                    return i, None, False
                except asyncio.TimeoutError:
                    return i, f"no answer to the health probe within {h.timeout_s:g}s", False
                except Exception as exc:  # noqa: BLE001 - a dead actor or core fails at once
                    cause = getattr(exc, "cause", None) or exc
                    dead = "dead" in str(cause).lower() or "ActorDied" in type(exc).__name__
                    return i, f"{type(cause).__name__}: {(str(cause).splitlines() or [''])[0][:200]}", dead

            for i, reason, fatal in await asyncio.gather(*(probe(i) for i in engines)):
                if reason is None:
                    self.fails.pop(i, None)
                    continue
                self.fails[i] = self.fails.get(i, 0) + 1
                log.warning("judge engine %d: health probe failed (%d/%d): %s", i, self.fails[i], h.failures, reason)
                if fatal or self.fails[i] >= h.failures:
                    self.fails.pop(i, None)
                    await self._lose(i, f"unhealthy: {reason}", unhealthy=True)

    # ----------------------------------------------------------------------------------- requests

    async def generate(self, prompt, n: int, temperature: float, max_tokens: int) -> list[str]:
        """The judge's answers (``n`` samples) to one rendered prompt, from the least loaded engine. Raises when
        that engine fails (it is replaced; the caller's retry goes to another one) or none serves (for up to
        the start timeout, while replacements start)."""
        import ray

        if not self._started:
            await self.start()
        deadline = time.monotonic() + self.start_timeout_s
        while not self.serving:
            if time.monotonic() > deadline:
                raise RuntimeError(f"no judge engine serving; failures: {'; '.join(self.failures[-3:])}")
            await asyncio.sleep(0.5)
        i = min(self.serving, key=lambda e: self.in_flight.get(e, 0))
        self.in_flight[i] = self.in_flight.get(i, 0) + 1
        self.counters["requests"] += 1
        try:
            ref = self.actors[i].generate_group.remote(prompt, n=n, temperature=temperature, max_tokens=max_tokens)
            try:
                rollouts = await ref
            except asyncio.CancelledError:  # the caller's deadline: stop the engine's work too
                ray.cancel(ref)
                raise
        except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as exc:
            cause = getattr(exc, "cause", None)
            if isinstance(exc, ray.exceptions.RayActorError) or type(cause).__name__ == "EngineDeadError":
                await self._lose(
                    i, f"{type(cause or exc).__name__}: {(str(cause or exc).splitlines() or [''])[0][:200]}"
                )
            raise RuntimeError(f"judge engine {i}: {type(cause or exc).__name__}: {str(cause or exc)[:300]}") from None
        finally:
            if i in self.in_flight:
                self.in_flight[i] -= 1
        return [r.response_text for r in rollouts]

    async def stats(self) -> dict:
        return {
            "engines_live": len(self.serving),
            "engines_target": self.cfg.num_engines,
            **{f"engine_{k}": v for k, v in self.counters.items()},
            "failures": list(self.failures[-5:]),
        }

    async def close(self) -> None:
        if self._health is not None:
            self._health.cancel()
        for task in list(self._replacing):
            task.cancel()
        for i in list(self.actors):
            await self._kill(i)
        self.serving = []


def create_fleet(cfg):
    """The shared judge fleet actor (no resources of its own; it lives as long as its creator)."""
    import ray

    from ivgr_dist.logs import actor_env

    env = actor_env("judge-fleet")
    options = {"runtime_env": {"env_vars": env}} if env else {}
    return ray.remote(num_cpus=0, max_concurrency=4096)(JudgeFleet).options(**options).remote(cfg)


def close_fleet(fleet) -> None:
    """Stop the shared judge engines (best effort, bounded) and the fleet actor."""
    if fleet is None:
        return
    import ray

    try:
        ray.get(fleet.close.remote(), timeout=60)
    except Exception as exc:  # noqa: BLE001 - teardown
        log.debug("closing the judge fleet: %s", exc)
    ray.kill(fleet)
