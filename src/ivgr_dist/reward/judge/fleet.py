"""``JudgeFleet``: ONE fleet of judge vLLM engines that every reward worker shares (``reward.judge.backend=engine``).

Without it each reward worker started its own engines (``reward.num_workers x judge.num_engines`` device
actors). The fleet is a Ray actor (async, no resources of its own) created once by ``make_scorer``; reward
workers and the driver's scorer hold its handle and call :meth:`JudgeFleet.generate`. It owns
``reward.judge.num_engines`` engines (``RolloutWorker`` actors serving ``reward.judge.model`` with the engine
arguments of ``reward.judge.engine``) as an :class:`~ivgr_dist.rollout.fleet.EngineFleet`, the class that holds
the rollout pool's engines: each engine in its own placement group (``reward.judge.resources``), probed every
``reward.judge.health.interval_s`` through its EngineCore; ``health.failures`` failures in a row, or a dead actor
or core, and the engine is killed (its vLLM processes and their shared memory too), its group released and a
replacement started (at most ``reward.judge.max_restarts``, with a back-off of ``RESTART_BACKOFF_S``, doubling,
after a replacement that failed to start). What stays here is dispatch: a request goes to the serving engine
with the fewest requests in flight. A request on an engine that fails raises; an engine whose actor died
(``RayActorError``) or whose core died (``EngineDeadError``, read by :func:`~ivgr_dist.rollout.errors.engine_dead`)
is dropped first; the judge's retry loop (``run_request``) sends the request again, to a live engine.

How an async actor drives the synchronous fleet: every method of this actor runs on one event loop, which also
serves every judge request, while the fleet blocks (``ray.wait``/``ray.get`` with timeouts: minutes for the first
start, up to 10 s to kill an engine). So each fleet call that can block runs in a worker thread
(``asyncio.to_thread``): the start, :meth:`EngineFleet.drop` after a failed request, :meth:`EngineFleet.heal` every
``HEAL_INTERVAL_S`` (a task on the loop: replacements need no caller) and the shutdown. The health probes run in
the fleet's own monitor thread (``rollout.health.HealthMonitor``), as for the rollout pool. The loop only reads
``serving`` and ``actors``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from ivgr_dist.reward.judge.engine import judge_engine_setup
from ivgr_dist.rollout.errors import engine_dead, failure_text
from ivgr_dist.rollout.fleet import EngineFleet, FleetSpec
from ivgr_dist.rollout.worker import RolloutWorker
from ivgr_dist.runtime.logs import actor_env, redirect_actor_output
from ivgr_dist.runtime.placement import EnginePlacement

log = logging.getLogger(__name__)

__all__ = ["JudgeFleet", "close_fleet", "create_fleet"]

HEAL_INTERVAL_S = 1.0
"""How often the fleet is brought back to ``reward.judge.num_engines`` (a heal with nothing to do costs nothing)."""
RESTART_BACKOFF_S = 5.0
"""Wait before replacing again after a replacement failed to start (doubles each time; ``rollout.restart_backoff_s``
has the same default)."""


def judge_fleet_spec(cfg, use_gpus: bool, start_timeout_s: float) -> FleetSpec:
    """The engine fleet of ``reward.judge`` (``cfg``): one engine serving suffices, a placement group may wait as
    long as a start."""
    return FleetSpec(
        name="judge fleet",
        what="judge engine",
        tag="judge engine",
        section="reward.judge",
        keys=("max_restarts",),
        fewer="reward.judge.num_engines",
        num_engines=cfg.num_engines,
        use_gpus=use_gpus,
        start_timeout_s=start_timeout_s,
        min_engines=1,
        max_restarts=cfg.max_restarts,
        restart_backoff_s=RESTART_BACKOFF_S,
        placement_timeout_s=start_timeout_s,
        resources=dict(cfg.resources),
        health=cfg.health,
    )


class JudgeFleet:
    """The judge engines (see the module docstring); methods are awaited by many callers at once."""

    def __init__(self, cfg, use_gpus: bool | None = None, start_timeout_s: float = 600.0):
        redirect_actor_output("judge-fleet")
        self.cfg = cfg
        self.use_gpus = use_gpus
        self.start_timeout_s = start_timeout_s
        self.fleet: EngineFleet | None = None
        self.in_flight: dict[int, int] = {}
        self.requests = 0
        self.start_failures: list[str] = []  # why a start failed (the fleet of that start is gone)
        self.heal_error: str | None = None  # the fleet cannot recover: below one engine, none can start
        self._lock: asyncio.Lock | None = None
        self._healer: asyncio.Task | None = None
        self._healing: asyncio.Lock | None = None  # held while a heal runs in its thread (close waits for it)

    # ------------------------------------------------------------------------------------ engines

    async def start(self) -> dict:
        """Start the engines once (every caller awaits the same start); returns :meth:`stats`."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self.fleet is None:
                import ray

                if self.use_gpus is None:
                    self.use_gpus = ray.cluster_resources().get("GPU", 0) > 0
                spec = judge_fleet_spec(self.cfg, bool(self.use_gpus), self.start_timeout_s)
                try:
                    self.fleet = await asyncio.to_thread(EngineFleet, spec, self._launch, RuntimeError, None, log)
                except Exception as exc:
                    cause = getattr(exc, "cause", None) or exc  # a RayTaskError's own exception
                    why = f"{type(cause).__name__}: {(str(cause).strip().splitlines() or [''])[-1][:300]}"
                    self.start_failures.append(f"failed to start: {why}")
                    log.error("judge fleet: no engine started: %s", exc)
                    raise RuntimeError(f"no judge engine started: {why}") from None
                self.fleet.start_health_checks()
                self._healing = asyncio.Lock()
                self._healer = asyncio.get_running_loop().create_task(self._heal_loop())
                log.info("judge fleet: %d of %d engines serving", len(self.fleet.serving), self.cfg.num_engines)
        return await self.stats()

    def _launch(self, i: int, placement: EnginePlacement) -> Any:
        """Judge engine ``i``'s actor in its placement group (the fleet calls its ``start``)."""
        import ray

        model_cfg, rollout_cfg, env = judge_engine_setup(self.cfg, self.cfg.engine, bool(self.use_gpus))
        return (
            ray.remote(RolloutWorker)
            .options(
                **placement.actor_options(),
                max_concurrency=1024,
                runtime_env={"env_vars": {**env, **placement.env(), **actor_env(f"judge-{i}")}},
            )
            .remote(model_cfg, rollout_cfg, i, "ivgr_shm")
        )

    async def _heal_loop(self) -> None:
        """Replace engines the fleet lost (health probes, failed requests), in a worker thread."""
        while True:
            await asyncio.sleep(HEAL_INTERVAL_S)
            try:
                async with self._healing:
                    await asyncio.to_thread(self.fleet.heal)
                self.heal_error = None
            except Exception as exc:  # noqa: BLE001 - below one engine and none can start: requests fail at once
                if self.heal_error != str(exc):
                    log.error("judge fleet: %s", exc)
                self.heal_error = str(exc)

    # ----------------------------------------------------------------------------------- requests

    async def generate(self, prompt, n: int, temperature: float, max_tokens: int) -> list[str]:
        """The judge's answers (``n`` samples) to one rendered prompt, from the least loaded engine. Raises when
        that engine fails (a dead one is dropped and replaced; the caller's retry goes to another one) or none
        serves (at once when none can start any more, else after waiting up to the start timeout)."""
        import ray

        if self.fleet is None:
            await self.start()
        fleet = self.fleet
        deadline = time.monotonic() + self.start_timeout_s
        while not fleet.serving:
            if self.heal_error is not None or time.monotonic() > deadline:
                why = self.heal_error or f"failures: {'; '.join(fleet.failures[-3:]) or 'none recorded'}"
                raise RuntimeError(f"no judge engine serving; {why}")
            await asyncio.sleep(0.5)
        i = min(fleet.serving, key=lambda e: self.in_flight.get(e, 0))
        self.in_flight[i] = self.in_flight.get(i, 0) + 1
        self.requests += 1
        try:
            ref = fleet.actors[i].generate_group.remote(prompt, n=n, temperature=temperature, max_tokens=max_tokens)
            try:
                rollouts = await ref
            except asyncio.CancelledError:  # the caller's deadline: stop the engine's work too
                ray.cancel(ref)
                raise
        except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as exc:
            cause = getattr(exc, "cause", None)  # a task error's own exception (EngineDeadError), not Ray's wrapper
            what = cause if isinstance(cause, BaseException) else exc
            if isinstance(exc, ray.exceptions.RayActorError) or engine_dead(exc):
                await asyncio.to_thread(fleet.drop, i, failure_text(exc, 200))
            raise RuntimeError(f"judge engine {i}: {type(what).__name__}: {str(what)[:300]}") from None
        finally:
            self.in_flight[i] -= 1
        return [r.response_text for r in rollouts]

    async def stats(self) -> dict:
        fleet = self.fleet
        counters = fleet.counters if fleet is not None else {}
        return {
            "engines_live": len(fleet.serving) if fleet is not None else 0,
            "engines_target": self.cfg.num_engines,
            **{f"engine_{k}": counters.get(k, 0) for k in ("restarts", "unhealthy", "failed_starts")},
            "engine_requests": self.requests,
            "failures": list(((fleet.failures if fleet is not None else []) + self.start_failures)[-5:]),
        }

    async def close(self) -> None:
        if self._healer is not None:
            async with self._healing:  # a heal already in its thread finishes first: it may be starting engines
                self._healer.cancel()
        if self.fleet is not None:
            await asyncio.to_thread(self.fleet.shutdown, 30.0)


def create_fleet(cfg):
    """The shared judge fleet actor (no resources of its own; it lives as long as its creator)."""
    import ray

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
