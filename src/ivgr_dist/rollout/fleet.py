"""``EngineFleet``: vLLM engine actors kept at a target number; placement, start, health, healing, kill and cleanup.

One class for both fleets of the run: the rollout pool's (:class:`~ivgr_dist.rollout.pool.RolloutPool`, settings
``rollout.*``) and the judge's (:class:`~ivgr_dist.reward.judge.fleet.JudgeFleet`, ``reward.judge.*``). Each of
them keeps its own dispatch (which engine gets the next request) and reads ``serving`` and ``actors`` from here;
everything about membership lives here. The engine actor itself is the caller's: ``launch(id, placement)``
creates it (a ``RolloutWorker`` or, in tests, a stand-in), the fleet calls its ``start``, ``probe``,
``kill_engine`` and ``shutdown``.

- **Placement**: each engine gets its own placement group (:class:`~ivgr_dist.runtime.placement.EnginePlacement`):
  ``tensor_parallel_size`` bundles of one device each, on one node, so no two engines share a device.
- **Start**: the first ``min_engines`` groups must be ready within ``placement_timeout_s``
  (:class:`~ivgr_dist.runtime.placement.PlacementError` otherwise); engines beyond them that the cluster has no room
  for yet stay pending and start in :meth:`EngineFleet.heal` when it has. An actor whose Ray worker died before
  it ran is started again (:func:`~ivgr_dist.runtime.placement.await_actor_starts`).
- **Health**: :class:`~ivgr_dist.rollout.health.HealthMonitor` probes every serving engine each ``health.interval_s`` through its
  EngineCore (``RolloutWorker.probe``) in a daemon thread; ``health.failures`` failed probes in a row, or a dead
  actor or core, mark it unhealthy. Death is read from the exception's class (``RayActorError``,
  :func:`~ivgr_dist.rollout.errors.engine_dead`), never from its text.
- **Kill**: an engine taken out gets no new work; its vLLM processes are killed through its actor
  (``kill_engine``, which also unlinks their shared memory), then the actor, and its placement group is
  released. When the actor cannot do it (dead or hung), the shared-memory segments the engine reported at
  start are unlinked on its node (:func:`unlink_engine_segments`): ``/dev/shm`` is RAM.
- **Healing** (:meth:`EngineFleet.heal`, non-blocking): retire engines above the target, request placement
  groups for missing ones, start engines whose group is ready, and hand the started ones to the caller's
  ``push`` (the rollout pool's current weights; the judge has none) before they serve. Replacements are
  bounded (``max_restarts``; growth toward a raised target is not a restart) with a back-off after a failed
  start (``restart_backoff_s``, doubling). Below ``min_engines`` with nothing that can start, ``error`` (the
  caller's exception class) says what is missing.

Synchronous and thread-safe (``_lock`` guards membership): the rollout pool calls it from the trainer's thread
and the health thread; the async judge fleet calls it from worker threads (``asyncio.to_thread``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ivgr_dist.config import HealthConfig, RolloutConfig
from ivgr_dist.rollout.health import HealthMonitor
from ivgr_dist.runtime.placement import EnginePlacement, PlacementError, await_actor_starts, shortfall

log = logging.getLogger(__name__)

__all__ = ["EngineFleet", "FleetSpec", "unlink_engine_segments"]


@dataclass(frozen=True)
class FleetSpec:
    """What a fleet keeps and how it heals, with the words its logs and errors use."""

    name: str
    """The fleet in logs ("rollout pool")."""
    what: str
    """One engine in logs and errors ("rollout engine"), followed by its id."""
    tag: str
    """One engine in :attr:`EngineFleet.failures` ("engine"), followed by its id."""
    section: str
    """The config section of the settings below ("rollout"); errors name ``section.key`` for keys in ``keys``."""
    keys: tuple[str, ...]
    """The settings below that are config keys of ``section`` (the rest are fixed by the fleet's owner)."""
    fewer: str
    """The keys to lower when an engine cannot be placed (for the placement error)."""
    num_engines: int
    use_gpus: bool
    start_timeout_s: float
    min_engines: int = 1
    max_engines: int = 0
    """0: ``num_engines``."""
    max_restarts: int = 8
    restart_backoff_s: float = 5.0
    placement_timeout_s: float = 300.0
    tensor_parallel_size: int = 1
    resources: dict[str, float] = field(default_factory=dict)
    health: HealthConfig = field(default_factory=HealthConfig)

    @classmethod
    def of_rollout(cls, cfg: RolloutConfig, use_gpus: bool, start_timeout_s: float) -> FleetSpec:
        """The rollout pool's fleet (``rollout.*``)."""
        return cls(
            name="rollout pool",
            what="rollout engine",
            tag="engine",
            section="rollout",
            keys=("min_engines", "max_engines", "max_restarts", "placement_timeout_s"),
            fewer="rollout.num_engines, rollout.min_engines, rollout.tensor_parallel_size, learner.num_ranks",
            num_engines=cfg.num_engines,
            use_gpus=use_gpus,
            start_timeout_s=start_timeout_s,
            min_engines=cfg.min_engines,
            max_engines=cfg.max_engines,
            max_restarts=cfg.max_restarts,
            restart_backoff_s=cfg.restart_backoff_s,
            placement_timeout_s=cfg.placement_timeout_s,
            tensor_parallel_size=cfg.tensor_parallel_size,
            resources=dict(cfg.resources),
            health=cfg.health,
        )

    def key(self, name: str) -> str:
        """How errors name setting ``name``: its config key where it has one."""
        return f"{self.section}.{name}" if name in self.keys else name


class EngineFleet:
    """The engines of one fleet (see the module docstring). Engine ids grow: a replacement or an added engine gets
    a new id (``actors[id]``), so an id names one engine for the whole run. ``alive``: engines in the fleet (for
    the rollout pool, those that receive every weight push); ``serving``: those that take new work (alive,
    past ``push``, healthy)."""

    def __init__(
        self,
        spec: FleetSpec,
        launch: Callable[[int, EnginePlacement], Any],
        error: type[Exception] = RuntimeError,
        storage=None,
        logger: logging.Logger = log,
        storage_check: Callable[[list[tuple[str, Any, int]]], Any] | None = None,
    ):
        """Reserve one placement group per engine, check there that every engine's node sees the shared storage
        (``storage``: an ``ivgr_dist.runtime.storage.StorageProbe``, when given), create each engine's actor with
        ``launch(id, placement)``, call its ``start()`` and wait until the first ones report ready (see the
        module docstring). ``error``: the exception class of the owner's errors; ``logger``: the owner's;
        ``storage_check``: checks the shared storage from engines placed later (in :meth:`heal`), given
        ``(label, placement group, bundle)`` targets."""
        self.spec = spec
        self.launch = launch
        self.error = error
        self.log = logger
        self._lock = threading.RLock()
        self.placements: list[EnginePlacement | None] = []
        self.actors: list = []
        self.start_info: list[dict] = []
        self.alive: list[int] = []
        self.serving: list[int] = []
        self.failures: list[str] = []  # "engine i: error" of each dropped engine, for error messages
        self.target = spec.num_engines
        self.max_engines = spec.max_engines or spec.num_engines
        self.counters = {"restarts": 0, "unhealthy": 0, "failed_starts": 0, "retired": 0, "started": 0}
        self._pending: dict[int, tuple[EnginePlacement, float]] = {}  # id -> (group asked for, when)
        self._starting: dict[int, tuple[Any, float]] = {}  # id -> (start() ref, when)
        self._joining: list[int] = []  # started, waiting for push
        self._lost: list[float] = []  # when each failure not yet replaced happened
        self._replacement_s: list[float] = []  # failure -> replacement serving, not yet reported
        self._backoff_s, self._backoff_until = spec.restart_backoff_s, 0.0
        self._short_since: float | None = None  # since when fewer than min_engines were live
        self.storage_check = storage_check
        self.monitor: HealthMonitor | None = None
        try:
            ids = [self._request() for _ in range(self.target)]
            self._await_initial_placements(ids)
            placed = [i for i in ids if i not in self._pending]
            if storage is not None:
                storage.probe([(f"{spec.what} {i}", self.placements[i].pg, 0) for i in placed])
            for i in placed:
                self._start_actor(i)
            self._await_initial_starts(placed, spec.start_timeout_s)
        except BaseException:
            self.shutdown()
            raise
        self.alive = list(placed)
        self.serving = list(placed)
        self.counters["started"] = len(placed)
        self.log.info(
            "%s: %d engines x tensor_parallel_size %d started (%s)%s",
            spec.name,
            len(placed),
            spec.tensor_parallel_size,
            ", ".join(f"{self.start_info[i]['start_s']:.1f}s" for i in placed),
            f"; {len(self._pending)} more pending placement" if self._pending else "",
        )

    # ----------------------------------------------------------------------------------------- start

    def _request(self) -> int:
        """A new engine id with its placement group requested (pending until Ray places it)."""
        i = len(self.actors)
        s = self.spec
        placement = EnginePlacement.request(i, s.tensor_parallel_size, s.use_gpus, dict(s.resources) or None)
        self.placements.append(placement)
        self.actors.append(None)
        self.start_info.append({})
        self._pending[i] = (placement, time.monotonic())
        return i

    def _await_initial_placements(self, ids: list[int]) -> None:
        """Wait for the first ``min_engines`` groups (PlacementError naming the first missing one after
        ``placement_timeout_s``), then a few seconds for the rest; those still pending wait for :meth:`heal`."""
        import ray

        s = self.spec
        timeout = s.placement_timeout_s
        deadline = time.monotonic() + timeout
        need = min(s.min_engines, len(ids))
        refs = {self.placements[i].ready_ref(): i for i in ids}
        ready, _ = ray.wait(list(refs), num_returns=need, timeout=timeout)
        if len(ready) < need:
            first = min(i for r, i in refs.items() if r not in ready)
            raise PlacementError(
                f"{s.what} {first} (tensor_parallel_size={s.tensor_parallel_size}): placement group "
                f"{self.placements[first].bundles} (STRICT_PACK) not ready within {timeout:g}s; "
                f"it {shortfall(self.placements[first].bundles, 'STRICT_PACK')}; {s.key('min_engines')}="
                f"{s.min_engines} must start. Free resources or ask for fewer ({s.fewer}), or raise "
                f"{s.key('placement_timeout_s')}"
            )
        grace = max(0.0, min(5.0, deadline - time.monotonic()))
        ray.wait(list(refs), num_returns=len(refs), timeout=grace)
        for i in ids:
            if self.placements[i].is_ready():
                self._pending.pop(i)
        if self._pending:
            self.log.warning(
                "%s: %d of %d engines have no room yet and start when the cluster has it: %s",
                s.name, len(self._pending), len(ids), self.placements[min(self._pending)].shortfall(),
            )  # fmt: skip

    def _await_initial_starts(self, ids: list[int], timeout_s: float) -> None:
        """Wait for the first engines' ``start()`` (:func:`~ivgr_dist.runtime.placement.await_actor_starts`): an engine
        whose actor died before it ran is started again in its placement group, counted in ``failed_starts``; an
        engine that raised, or whose ``__init__`` failed, fails the start."""
        import ray

        def ready(i: int):
            return self._starting[i][0]

        def restart(i: int) -> None:
            ray.kill(self.actors[i], no_restart=True)
            self._start_actor(i)

        def on_ready(i: int, info: dict) -> None:
            self.start_info[i] = info
            self._starting.pop(i)

        def on_retry(i: int, why: str) -> None:
            self.counters["failed_starts"] += 1
            self.failures.append(f"{self.spec.tag} {i}: actor died before the engine started: {why}")

        await_actor_starts(self.spec.what, ids, ready, restart, on_ready, on_retry, timeout_s, self.error)

    def _start_actor(self, i: int) -> None:
        self.actors[i] = self.launch(i, self.placements[i])
        self._starting[i] = (self.actors[i].start.remote(), time.monotonic())

    # --------------------------------------------------------------------------------------- healing

    def set_target(self, n: int) -> None:
        """Engines the fleet should have (``ivgr-dist scale``); takes effect at the next :meth:`heal`."""
        if not 1 <= n <= self.max_engines:
            raise ValueError(f"engines={n}: must be in [1, {self.spec.key('max_engines')}={self.max_engines}]")
        if n != self.target:
            self.log.info("%s: target %d -> %d engines", self.spec.name, self.target, n)
        self.target = n

    def heal(self, push: Callable[[list[int]], Any] | None = None) -> dict[str, float]:
        """Bring the fleet toward its target without blocking on Ray: retire engines above it, request placement
        groups for missing ones, start engines whose group is ready, and once started hand them to
        ``push(engine ids)`` (the rollout pool's current weights; None: they serve what they loaded) before they
        serve. Returns counters of what it did; ``error`` when the fleet is below ``min_engines`` and cannot
        recover. A ``push`` that raises with ``failed_engines`` drops those engines; any other error is raised."""
        import ray

        s = self.spec
        out = {"retired": 0.0, "joined": 0.0}
        with self._lock:
            desired = min(self.target, self.max_engines)
            extra = len(self.alive) + len(self._joining) - desired
            if extra > 0:
                # the newest first (joining ones before serving ones): they hold the least cache
                victims = sorted([*self._joining, *self.alive], key=lambda e: (e in self.serving, -e))[:extra]
                for e in victims:
                    self._remove(e, f"retired (target {self.target} engines)", failure=False)
                    self.counters["retired"] += 1
                    out["retired"] += 1
            # cancel pending requests the target no longer needs
            while (
                self._pending
                and len(self.alive) + len(self._joining) + len(self._starting) + len(self._pending) > desired
            ):
                i = max(self._pending)
                self._pending.pop(i)[0].release()
            # ask for what is missing (a replacement counts against max_restarts; growth does not)
            now = time.monotonic()
            while len(self.alive) + len(self._joining) + len(self._starting) + len(self._pending) < desired:
                replacing = bool(self._lost)
                if replacing and (self.counters["restarts"] >= s.max_restarts or now < self._backoff_until):
                    break
                i = self._request()
                self.log.info("%s %d requested (%s)", s.what, i, "replacement" if replacing else "growth")
                if replacing:
                    self.counters["restarts"] += 1
            # groups Ray has placed: start their engines
            for i, (placement, _) in list(self._pending.items()):
                if not placement.is_ready():
                    continue
                self._pending.pop(i)
                try:
                    if self.storage_check is not None:
                        self.storage_check([(f"{s.what} {i}", placement.pg, 0)])
                    self._start_actor(i)
                    self.log.info("%s %d: placement group ready, starting the engine", s.what, i)
                except Exception as exc:  # noqa: BLE001 - a node that cannot see the storage: count, back off
                    self._failed_start(i, exc)
            # engines that finished starting: they serve once pushed
            for i, (ref, t0) in list(self._starting.items()):
                done, _ = ray.wait([ref], timeout=0)
                if not done:
                    if time.monotonic() - t0 > s.start_timeout_s:
                        self._starting.pop(i)
                        self._failed_start(i, TimeoutError(f"did not start within {s.start_timeout_s:g}s"))
                    continue
                self._starting.pop(i)
                try:
                    self.start_info[i] = ray.get(ref)
                except Exception as exc:  # noqa: BLE001 - the new engine failed to start: count, back off
                    self._failed_start(i, exc)
                    continue
                self.alive.append(i)
                self._joining.append(i)
                self.log.info(
                    "%s %d started in %.1fs; %s", s.what, i, time.monotonic() - t0,
                    "loading the current weights" if push is not None else "serving",
                )  # fmt: skip
        joining = list(self._joining)
        if joining:
            try:
                if push is not None:
                    push(joining)
            except Exception as exc:  # noqa: BLE001 - the push names the engines; they are dropped below
                failed = getattr(exc, "failed_engines", None) or joining
                self.log.error("%s: engines %s could not take the current weights: %s", s.name, failed, exc)
                for e in failed:
                    if e in self.alive:
                        self._remove(e, f"could not take the current weights: {exc}", failure=True)
                joining = [e for e in joining if e not in failed]
                if not getattr(exc, "failed_engines", None):
                    raise
            with self._lock:
                now = time.monotonic()
                for e in joining:
                    if e in self._joining:
                        self._joining.remove(e)
                    if e in self.alive and e not in self.serving:
                        self.serving.append(e)
                        self.counters["started"] += 1
                        out["joined"] += 1
                        if self._lost:
                            self._replacement_s.append(now - self._lost.pop(0))
                        self.log.info(
                            "%s: engine %d serving (%d of target %d live)", s.name, e, len(self.serving), self.target
                        )
        self._check_minimum()
        return out

    def _failed_start(self, i: int, exc: BaseException) -> None:
        self.counters["failed_starts"] += 1
        first = (str(exc).splitlines() or [""])[0][:300]
        self.failures.append(f"{self.spec.tag} {i}: failed to start: {type(exc).__name__}: {first}")
        self.log.error("%s %d failed to start: %s", self.spec.what, i, exc)
        self._kill(i)
        self._backoff_until = time.monotonic() + self._backoff_s
        self._backoff_s = max(self._backoff_s * 2, 1.0)
        if not self._lost:
            self._lost.append(time.monotonic())

    def _check_minimum(self) -> None:
        """``error`` once fewer than ``min_engines`` serve and nothing can bring them back: no restarts left, or
        no room for ``placement_timeout_s``."""
        s = self.spec
        live = len(self.serving)
        if live >= s.min_engines:
            self._short_since = None
            return
        now = time.monotonic()
        self._short_since = self._short_since or now
        coming = len(self._joining) + len(self._starting) + len(self._pending)
        out_of_restarts = self.counters["restarts"] >= s.max_restarts and not coming
        if out_of_restarts or now - self._short_since > s.placement_timeout_s + s.start_timeout_s:
            why = (
                f"{s.key('max_restarts')}={s.max_restarts} replacements used"
                if out_of_restarts
                else f"none could be placed and started within {s.placement_timeout_s + s.start_timeout_s:g}s"
                + (f" ({self.placements[min(self._pending)].shortfall()})" if self._pending else "")
            )
            raise self.error(
                f"only {live} {s.what}(s) live, below {s.key('min_engines')}={s.min_engines}: {why}; "
                f"failures: {'; '.join(self.failures[-5:]) or 'none recorded'}"
            )

    # ------------------------------------------------------------------------------------------ kill

    def mark_unhealthy(self, e: int, reason: str) -> None:
        """The health monitor's verdict: no new work for ``e``; it is killed and replaced by :meth:`heal`."""
        with self._lock:
            if e not in self.alive:
                return
            self.counters["unhealthy"] += 1
        self._remove(e, f"unhealthy: {reason}", failure=True)

    def drop(self, e: int, reason: str) -> None:
        """Stop using ``e`` (dead, hung or failing): kill it, free its devices, record why (it is replaced by
        :meth:`heal`). Nothing happens when ``e`` already left the fleet."""
        if e in self.alive:
            self._remove(e, reason, failure=True)

    def _remove(self, e: int, reason: str, failure: bool) -> None:
        """Take engine ``e`` out of the fleet: no new work, vLLM processes and actor killed, group released."""
        with self._lock:
            if e not in self.alive and e not in self._joining:
                return  # two callers saw it fail (a probe and a request, say): the first takes it out
            for members in (self.serving, self.alive, self._joining):
                if e in members:
                    members.remove(e)
            if failure:
                self.failures.append(f"{self.spec.tag} {e}: {reason}")
                self._lost.append(time.monotonic())
        if failure:
            self.log.error("%s %d %s; %d engines serving", self.spec.what, e, reason, len(self.serving))
        else:
            self.log.info("%s %d %s", self.spec.what, e, reason)
        self._kill(e)

    def _kill(self, e: int) -> None:
        import ray

        actor = self.actors[e]
        if actor is not None:
            try:  # its vLLM processes first: a stopped EngineCore would outlive the actor
                ray.get(actor.kill_engine.remote(), timeout=10)
                killed = True
            except Exception:  # noqa: BLE001 - dead or hung actor (or a stand-in without it): the kill below
                killed = False
            ray.kill(actor, no_restart=True)
            if not killed:
                self._unlink_segments_of(e)
        if self.placements[e] is not None:
            self.placements[e].release()
        self._starting.pop(e, None)

    def _unlink_segments_of(self, e: int) -> None:
        """Remove the shared memory engine ``e`` reported at start, on its node (its actor could not)."""
        info = self.start_info[e]
        unlink_engine_segments(e, info.get("node", ""), info.get("segments", []), what=self.spec.what)

    # ------------------------------------------------------------------------------------ monitoring

    def fleet_metrics(self, prefix: str = "rollout") -> dict[str, float]:
        """``{prefix}/engines_*`` gauges and counters of the fleet (cumulative over the run); the longest
        failure-to-replacement time since the last call."""
        out = {
            f"{prefix}/engines_live": float(len(self.serving)),
            f"{prefix}/engines_target": float(self.target),
            f"{prefix}/engines_pending": float(len(self._pending) + len(self._starting) + len(self._joining)),
            f"{prefix}/engine_restarts": float(self.counters["restarts"]),
            f"{prefix}/engines_unhealthy": float(self.counters["unhealthy"]),
            f"{prefix}/engine_failed_starts": float(self.counters["failed_starts"]),
            f"{prefix}/engines_retired": float(self.counters["retired"]),
        }
        if self._replacement_s:
            out[f"{prefix}/replacement_s"] = max(self._replacement_s)
            self._replacement_s = []
        return out

    def start_health_checks(self) -> None:
        """Probe the serving engines in a background thread (``health``), unless ``health.enabled`` is false."""
        if self.spec.health.enabled and self.monitor is None:
            self.monitor = HealthMonitor(self)
            self.monitor.start()

    def shutdown(self, timeout_s: float = 60.0) -> None:
        """Stop every engine (vLLM's own shutdown, ``timeout_s`` for all of them), kill its actor and remove its
        placement group; safe to call twice, or after a failed start."""
        import ray

        if getattr(self, "monitor", None) is not None:
            self.monitor.stop()
            self.monitor = None
        actors = {e: a for e, a in enumerate(self.actors) if a is not None}
        refs = {}
        for e, actor in actors.items():
            try:
                refs[actor.shutdown.remote()] = e
            except Exception:  # noqa: BLE001 - best effort during teardown; the kill below is what matters
                pass
        done = set(ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)[0]) if refs else set()
        stopped = set()
        for ref in done:
            try:
                ray.get(ref, timeout=0)
                stopped.add(refs[ref])
            except Exception:  # noqa: BLE001 - a dead actor: its segments are unlinked below
                pass
        for e, actor in actors.items():
            ray.kill(actor)
            if e not in stopped:  # a dead or hung actor: its engine's processes cannot unlink their queues
                self._unlink_segments_of(e)
        for placement in self.placements:
            if placement is not None:
                placement.release()
        with self._lock:
            self.actors, self.alive, self.serving, self.placements = [], [], [], []
            self._pending, self._starting, self._joining = {}, {}, []


def unlink_engine_segments(
    engine: int, node: str, names: list[str], timeout_s: float = 10.0, what: str = "rollout engine"
) -> list[str]:
    """Unlink the shared-memory segments an engine recorded at start (``RolloutWorker.start``'s ``segments``) when
    its actor died without ``kill_engine`` (killed by Ray, by the OOM killer, with its node's raylet): its vLLM
    processes then die on their parent's exit without unlinking their message queues, and ``/dev/shm`` is RAM.
    ``/dev/shm`` is per node, so the unlink runs on the engine's node: here when that is the caller's, else in a
    zero-CPU task pinned to it (a node Ray no longer lists as alive is skipped at once: its raylet is gone, and
    with a lost machine its ``/dev/shm``). Never raises; returns the names removed."""
    import ray

    from ivgr_dist.runtime.shm_segments import unlink_segments

    if not names:
        return []
    try:
        if not node or node == ray.get_runtime_context().get_node_id():
            removed = unlink_segments(names)
        elif not any(n.get("NodeID") == node and n.get("Alive") for n in ray.nodes()):
            log.info("%s %d: its node %s is gone; its shared memory went with it", what, engine, node[:12])
            return []
        else:
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            task = ray.remote(num_cpus=0)(unlink_segments).options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False), max_retries=0
            )
            removed = ray.get(task.remote(names), timeout=timeout_s)
    except Exception as exc:  # noqa: BLE001 - best effort: the engine is gone either way
        log.warning("%s %d: could not remove its shared memory %s: %s", what, engine, names, exc)
        return []
    if removed:
        log.info("%s %d: removed %d shared-memory segment(s) its dead actor left", what, engine, len(removed))
    return removed
