"""``RewardPool``: M CPU reward workers (Ray actors) scoring whole groups while generation goes on.

Shape (docs/architecture.md, reward workers):

- ``RewardWorker`` (``num_cpus=reward.cpus_per_worker``): an async actor holding one judge from
  ``make_judge(reward.judge)``. ``score(job)`` runs :func:`~ivgr_dist.reward.scorer.score_job`;
  many groups run at once on the actor's event loop, bounded by the judge's own concurrency. A
  textual job reads its reference from the :class:`~ivgr_dist.reward.reference_cache.ReferenceCache`
  actor; a grounded job offers its candidate to the cache before it returns.
- The driver side is :class:`~ivgr_dist.reward.scorer.StreamScorer`'s pair-aware schedule: every
  group is submitted the moment it finishes generating (least-loaded worker), textual groups as
  soon as their grounded group of the batch is scored; scored groups are yielded as ``ray.wait``
  reports them.

Faults never cost a reward and never raise into the driver (a judge question left unanswered is
scored per ``reward.judge.on_failure``: its fallback, or masked):

- a worker that dies: its slot gets a fresh actor (``reward/worker_restarts``) and each of its
  groups is resubmitted elsewhere (``reward/rescored``, at most ``max_attempts`` submissions);
- a worker error (the task raised): the driver scores that group rules-only, each judge question
  counted in ``judge/failures`` (``reward/worker_errors``), logged;
- a group past ``group_deadline_s`` (``reward/group_timeouts``): its worker is pinged. One that answers
  is alive with a slow judge: the group is cancelled and scored rules-only in the driver. One that does
  not is stuck (an event loop blocked by a sync call never answers again): it is killed and replaced
  (``reward/worker_timeouts``), and the group is submitted again (``reward/rescored``); the worker's
  other groups come back as dead-worker errors and are resubmitted too;
- no worker left (respawns exhausted): groups are scored rules-only in the driver;
- the reference cache actor lost (``RayActorError`` on a read or update): the driver recreates it (pinned
  to its own node) and restores it from the last checkpoint's copy (``refcache/restores``, logged); a
  worker that finds it lost re-resolves the named actor, or hands the group back to be rescored.

Rules-only scoring in the driver runs math-verify in the scorer's own bounded
:class:`~ivgr_dist.reward.rule_pool.RulePool`, as every worker does in its own (``reward.rule_timeout_s``).

A judge that cannot work at all is the exception: :func:`make_scorer` checks it before returning (the
OpenAI judge's test request from every reward worker, the judge engines' start) and raises
:class:`~ivgr_dist.reward.judge.JudgeUnavailable`, so the run stops before its engines and learner start.
"""

from __future__ import annotations

import logging
import os
import threading
import uuid
from typing import Any

from ivgr_dist.config import AlgorithmConfig, JudgeConfig, RewardConfig
from ivgr_dist.reward.judge import JudgeUnavailable, check_judge
from ivgr_dist.reward.judge.fleet import close_fleet, create_fleet
from ivgr_dist.reward.reference import Reference
from ivgr_dist.reward.reference_cache import CACHE_NAME, CacheLost, get_reference_cache
from ivgr_dist.reward.rule_pool import RulePool
from ivgr_dist.reward.scorer import GroupJob, GroupResult, InProcessScorer, StreamScorer, score_job

__all__ = ["RewardPool", "RewardWorker"]

log = logging.getLogger(__name__)

_NO_WORKER = "__ivgr_no_reward_worker__"


class RewardWorker:
    """One reward actor: rule rewards + a judge client; scores whole groups, many at once."""

    def __init__(
        self,
        judge_cfg: JudgeConfig,
        algo: AlgorithmConfig,
        cache,
        fleet=None,
        recipe_exact: bool = False,
        cache_namespace: str | None = None,
        rule_timeout_s: float = RewardConfig.rule_timeout_s,
    ):
        import os

        from ivgr_dist.runtime.logs import redirect_actor_output

        redirect_actor_output(f"reward-{os.getpid()}")
        from ivgr_dist.reward.judge import make_judge

        self.judge_cfg, self.algo, self.cache = judge_cfg, algo, cache
        self.cache_namespace = cache_namespace  # where to find the cache again after the driver recreated it
        self.recipe_exact = recipe_exact  # reward.recipe_exact
        self.judge = make_judge(judge_cfg, fleet=fleet)  # fleet: the shared judge engines (backend=engine)
        self.rule_pool = RulePool(rule_timeout_s, max_chars=algo.max_answer_chars)  # math-verify, bounded

    async def check_judge(self, driver_has_key: bool | None) -> None:
        """The judge's start-up check in THIS worker (its environment, its node): raises ``JudgeUnavailable``."""
        await check_judge(self.judge, driver_has_key)

    async def _cache_call(self, call):
        """``await call(cache)``; a lost cache actor is looked up again by name (the driver recreates it) and,
        when there is none yet, ``CacheLost`` goes to the driver, which restores the cache and resubmits."""
        import ray

        try:
            return await call(self.cache)
        except ray.exceptions.RayActorError:
            try:
                self.cache = ray.get_actor(CACHE_NAME, namespace=self.cache_namespace)
                return await call(self.cache)
            except (ValueError, ray.exceptions.RayActorError) as exc:
                raise CacheLost(f"reference cache actor lost ({type(exc).__name__})") from None

    async def score(self, job: GroupJob) -> GroupResult:
        if job.stream == "textual":
            reference = await self._cache_call(lambda c: c.get.remote(job.record_key))
        else:
            reference = None
        cfg = self.judge_cfg
        result = await score_job(
            job,
            self.judge,
            self.algo,
            cfg.fallback_consistency,
            reference,
            self.recipe_exact,
            on_failure=cfg.on_failure,
            rule_pool=self.rule_pool,
        )
        if job.stream == "grounded" and result.candidate is None:
            result.reference_updated = False
        elif job.stream == "grounded":
            try:
                updated = await self._cache_call(lambda c: c.update.remote(job.record_key, result.candidate))
                result.reference_updated = bool(updated)
            except CacheLost:  # None: the driver offers the candidate itself, restoring the cache first
                result.reference_updated = None
        return result

    async def ping(self) -> int:
        return os.getpid()

    async def close(self) -> None:
        self.rule_pool.close()
        await self.judge.close()


class RewardPool(StreamScorer):
    """Driver-side handle of the reward workers and the reference cache (implements ``Scorer``)."""

    max_respawns = 3
    """Fresh actors per worker slot before the slot is given up."""

    def __init__(
        self,
        cfg: RewardConfig,
        algo: AlgorithmConfig,
        namespace: str | None = None,
        ready_timeout_s: float = 120.0,
        rpc_timeout_s: float = 60.0,
        fleet=None,
        output_dir: str | os.PathLike | None = None,
        worker_cls: type = RewardWorker,
    ):
        """``output_dir``: the run's ``trainer.output_dir``, whose latest checkpoint restores a lost reference cache
        (None: a lost cache restarts empty, logged and counted as well)."""
        import ray

        if cfg.num_workers < 1:
            raise ValueError(f"reward.num_workers={cfg.num_workers}: RewardPool needs >= 1 (0 = in-process scorer)")
        need, free = cfg.num_workers * cfg.cpus_per_worker, ray.available_resources().get("CPU", 0.0)
        if need > free + 1e-9:  # fail now, not after ready_timeout_s of unschedulable actors
            raise RuntimeError(
                f"reward pool needs reward.num_workers={cfg.num_workers} x reward.cpus_per_worker="
                f"{cfg.cpus_per_worker} = {need:g} CPUs but the cluster has {free:g} free: add CPUs, or set "
                "reward.cpus_per_worker=0 (workers mostly wait on the judge) or reward.num_workers=0 (in the driver)"
            )
        super().__init__(algo, cfg.judge, cfg.recipe_exact, cfg.rule_timeout_s)
        self.cfg, self.rpc_timeout_s = cfg, rpc_timeout_s
        self.judge_fleet = fleet  # one fleet of judge engines for every worker (closed with the pool)
        self.namespace = namespace or f"ivgr-{uuid.uuid4().hex[:12]}"
        self.output_dir = output_dir
        self._restores_unreported = 0
        # the producer thread (scoring) and the trainer (a save) may both find the cache lost: one restore
        self._restore_lock = threading.Lock()
        # pinned to the driver's node: losing that node ends the run anyway, so the cache adds no node to lose
        self._driver_node = ray.get_runtime_context().get_node_id()
        self.cache = get_reference_cache(self.namespace, node_id=self._driver_node)
        self._actor = ray.remote(
            num_cpus=cfg.cpus_per_worker,
            resources=dict(cfg.resources) or None,
            max_restarts=0,
            max_concurrency=1000,
        )(worker_cls)  # tests: a subclass that injects a fault
        self.workers: list[Any | None] = [self._spawn() for _ in range(cfg.num_workers)]
        self._gen = [0] * cfg.num_workers
        self._respawns = [0] * cfg.num_workers
        self._load = [0] * cfg.num_workers
        self._where: dict[Any, tuple[int, int]] = {}  # ref -> (slot, generation)
        try:
            ray.get([w.ping.remote() for w in self.workers] + [self.cache.ping.remote()], timeout=ready_timeout_s)
        except ray.exceptions.GetTimeoutError:
            self.close()
            raise RuntimeError(
                f"reward workers not ready after {ready_timeout_s:.0f} s: the cluster may lack "
                f"{cfg.num_workers} x reward.cpus_per_worker={cfg.cpus_per_worker} free CPUs "
                f"(cluster: {ray.cluster_resources().get('CPU', 0)} CPUs)"
            ) from None

    def _spawn(self):
        from ivgr_dist.runtime.logs import actor_env

        env = actor_env()
        options = {"runtime_env": {"env_vars": env}} if env else {}
        return self._actor.options(**options).remote(
            self.cfg.judge,
            self.algo,
            self.cache,
            self.judge_fleet,
            self.cfg.recipe_exact,
            cache_namespace=self.namespace,
            rule_timeout_s=self.cfg.rule_timeout_s,
        )

    def check_judge(self) -> None:
        """Every worker runs the judge's start-up check (each has its own environment and node); the first
        failure raises ``JudgeUnavailable`` with that worker's message."""
        import ray

        judge = self.cfg.judge
        has_key = driver_has_key(judge)
        refs = [w.check_judge.remote(has_key) for w in self.workers if w is not None]
        deadline = judge.timeout_s + self.rpc_timeout_s
        ready, late = ray.wait(refs, num_returns=len(refs), timeout=deadline)
        errors = []
        for ref in ready:  # every answer is taken: an error left unread would be printed again at exit
            try:
                ray.get(ref)
            except ray.exceptions.RayError as exc:  # the check raised, or the worker died during it
                errors.append(exc)
        if errors:
            err = errors[0]
            cause = getattr(err, "cause", None)
            if isinstance(cause, JudgeUnavailable):
                raise JudgeUnavailable(str(cause)) from None
            detail = (str(cause or err).strip().splitlines() or [""])[-1][:300]
            raise JudgeUnavailable(
                f"a reward worker failed the judge's start-up check ({type(err).__name__}): {detail}"
            ) from None
        if late:
            raise JudgeUnavailable(
                f"{len(late)} reward worker(s) did not finish the judge's start-up check within {deadline:.0f} s "
                f"(reward.judge.urls={list(judge.urls)})"
            )

    # executor hooks -----------------------------------------------------------------------------
    def _submit(self, job: GroupJob):
        import ray

        live = [i for i, w in enumerate(self.workers) if w is not None]
        if not live:
            ref = ray.put(_NO_WORKER)
            self._where[ref] = (-1, -1)
            return ref
        slot = min(live, key=lambda i: self._load[i])
        ref = self.workers[slot].score.remote(job)
        self._load[slot] += 1
        self._where[ref] = (slot, self._gen[slot])
        return ref

    def _track(self, ref) -> str:
        slot = self._where.get(ref, (-1, -1))[0]
        return f"reward worker {slot}" if slot >= 0 else "reward (driver)"

    def _wait(self, handles: list, timeout: float) -> list:
        import ray

        ready, rest = ray.wait(handles, num_returns=1, timeout=timeout)
        if ready and rest:
            more, _ = ray.wait(rest, num_returns=len(rest), timeout=0)
            ready += more
        return ready

    def _release(self, ref) -> tuple[int, int]:
        slot, gen = self._where.pop(ref, (-1, -1))
        if slot >= 0:
            self._load[slot] -= 1
        return slot, gen

    def _take(self, ref) -> tuple[str, GroupResult | None]:
        import ray

        slot, gen = self._release(ref)
        try:
            value = ray.get(ref, timeout=self.rpc_timeout_s)
        except ray.exceptions.RayTaskError as exc:  # the task ran and raised: a worker error
            if isinstance(exc.cause, CacheLost):  # restore the cache, then score the group again
                try:
                    self._restore_cache(exc.cause)
                except Exception as err:  # noqa: BLE001 - never raise into the producer: rules-only
                    log.error("reference cache could not be restored (%s); scoring the group rules-only", err)
                    return "fallback", None
                return "retry", None
            log.warning("reward worker %d failed a group (%s); scoring it rules-only", slot, exc)
            return "fallback", None
        except ray.exceptions.RayActorError as exc:  # the worker died
            self._worker_died(slot, gen, exc)
            return "retry", None
        except Exception as exc:  # noqa: BLE001 - any other fault: rules-only, never raise
            log.warning("reward group lost (%r); scoring it rules-only", exc)
            return "fallback", None
        if isinstance(value, str) and value == _NO_WORKER:
            return "fallback", None
        return "ok", value

    def _worker_died(self, slot: int, gen: int, exc: Exception) -> None:
        if slot < 0 or gen != self._gen[slot]:
            return  # already replaced
        self._replace(slot, f"died ({type(exc).__name__})", "worker_restarts")

    ping_timeout_s = 10.0
    """How long a worker has to answer a ping when one of its groups passed its deadline."""

    def _abandon(self, ref) -> bool:
        """A group past its deadline. Its worker is pinged: a worker that answers is alive and only its judge slow
        (the group waited on the judge's concurrency, or the judge takes long), so the group is cancelled and scored
        rules-only in the driver (False), the worker kept. A worker that does not answer is stuck (a blocked event
        loop never answers again): it is killed and replaced (``reward/worker_timeouts``), its other groups then
        fail as from a dead worker and are resubmitted, and True while a worker is left to score the group again."""
        import ray

        slot, gen = self._release(ref)
        if slot >= 0 and gen == self._gen[slot]:
            try:
                ray.get(self.workers[slot].ping.remote(), timeout=self.ping_timeout_s)
            except Exception:  # noqa: BLE001 - no answer (stuck) or dead: replace it
                self._replace(slot, f"missed a group deadline of {self.group_deadline_s:.0f} s", "worker_timeouts")
            else:
                try:
                    ray.cancel(ref)
                except Exception as exc:  # noqa: BLE001 - it may have finished meanwhile
                    log.debug("cancel: %s", exc)
                return False
        return any(w is not None for w in self.workers)

    def _replace(self, slot: int, why: str, counter: str) -> None:
        """Kill the worker of ``slot`` (if alive) and start a fresh one, at most ``max_respawns`` times a slot."""
        import ray

        old, self._gen[slot] = self.workers[slot], self._gen[slot] + 1
        if old is not None:
            try:
                ray.kill(old, no_restart=True)
            except Exception as exc:  # noqa: BLE001 - it may be gone already
                log.debug("kill reward worker %d: %s", slot, exc)
        if self._respawns[slot] >= self.max_respawns:
            log.error("reward worker %d %s again; giving the slot up", slot, why)
            self.workers[slot] = None
            return
        log.warning("reward worker %d %s; starting a fresh one (reward/%s)", slot, why, counter)
        self._respawns[slot] += 1
        self._counts[counter] += 1
        self.workers[slot] = self._spawn()

    def _reference(self, record_key: int) -> Reference | None:
        try:
            return self._cache_call(lambda c: c.get.remote(record_key))
        except Exception as exc:  # noqa: BLE001 - a rules-only fallback must still come out
            log.warning("reference cache read failed (%s); consistency without reference", exc)
            return None

    def _offer_reference(self, record_key: int, candidate: Reference) -> bool:
        try:
            return bool(self._cache_call(lambda c: c.update.remote(record_key, candidate)))
        except Exception as exc:  # noqa: BLE001
            log.warning("reference cache update failed (%s)", exc)
            return False

    def _cache_stats(self) -> dict[str, float]:
        return self._cache_call(lambda c: c.stats.remote())

    # the reference cache's survival -------------------------------------------------------------
    def _cache_call(self, call):
        """``ray.get(call(cache))``; a lost cache actor is restored (:meth:`_restore_cache`) and asked once more."""
        import ray

        try:
            return ray.get(call(self.cache), timeout=self.rpc_timeout_s)
        except ray.exceptions.RayActorError as exc:
            self._restore_cache(exc)
            return ray.get(call(self.cache), timeout=self.rpc_timeout_s)

    def _restore_cache(self, exc: Exception) -> None:
        """Recreate the cache actor (same name, the driver's node) and load the last checkpoint's copy of the
        references into it; a no-op when the current actor answers (another caller restored it already)."""
        import ray

        with self._restore_lock:
            try:
                ray.get(self.cache.ping.remote(), timeout=self.rpc_timeout_s)
                return
            except ray.exceptions.RayActorError:
                pass
            state, source = self._saved_references()
            self.cache = get_reference_cache(self.namespace, node_id=self._driver_node, state=state)
            self._restores_unreported += 1
        log.warning(
            "reference cache actor lost (%s); recreated and restored from %s (%d references); updates since then "
            "are rebuilt as grounded groups are scored (refcache/restores)",
            type(exc).__name__, source, len((state or {}).get("entries", {})),
        )  # fmt: skip

    def _saved_references(self) -> tuple[dict | None, str]:
        """The references in the latest complete checkpoint of ``output_dir`` and where they came from."""
        from ivgr_dist.driver.checkpoints import latest_checkpoint

        found = latest_checkpoint(self.output_dir) if self.output_dir is not None else None
        if found is None:
            return None, "nothing (no checkpoint yet: it starts empty)"
        return found.state["scorer"]["references"], f"checkpoint {found.path}"

    def metrics(self) -> dict[str, float]:
        out = super().metrics()  # may itself restore the cache (its stats)
        out["refcache/restores"] = float(self._restores_unreported)
        self._restores_unreported = 0
        return out

    # state and lifecycle ------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"references": self._cache_call(lambda c: c.state_dict.remote())}

    def load_state_dict(self, state: dict) -> None:
        self._cache_call(lambda c: c.load_state_dict.remote(state["references"]))

    def close(self) -> None:
        import ray

        live = [w for w in getattr(self, "workers", []) if w is not None]
        try:
            ray.get([w.close.remote() for w in live], timeout=10)
        except Exception as exc:  # noqa: BLE001 - closing must not raise
            log.debug("closing reward workers: %s", exc)
        for actor in [*live, getattr(self, "cache", None)]:
            if actor is not None:
                try:
                    ray.kill(actor)
                except Exception as exc:  # noqa: BLE001
                    log.debug("kill: %s", exc)
        self.workers = []
        close_fleet(getattr(self, "judge_fleet", None))
        self.judge_fleet = None
        if getattr(self, "rule_pool", None) is not None:
            self.rule_pool.close()


def make_scorer(
    reward_cfg: RewardConfig,
    algo: AlgorithmConfig,
    namespace: str | None = None,
    output_dir: str | os.PathLike | None = None,
) -> StreamScorer:
    """``reward.num_workers == 0``: the in-driver :class:`~ivgr_dist.reward.scorer.InProcessScorer`; else a
    :class:`RewardPool` of that many workers (``output_dir``: see ``RewardPool``). The judge is checked before
    this returns (``JudgeUnavailable``: module docstring). (Here, not in ``scorer``: the pool builds on the scorer,
    not the other way round.)"""
    fleet, scorer = None, None
    try:
        if reward_cfg.judge.backend == "engine":  # one shared fleet of judge engines, not one per worker
            fleet = create_fleet(reward_cfg.judge)
            _start_fleet(fleet, reward_cfg.judge)
        if reward_cfg.num_workers == 0:
            from ivgr_dist.reward.judge import make_judge

            judge = make_judge(reward_cfg.judge, fleet=fleet)
            scorer = InProcessScorer(
                algo, reward_cfg.judge, judge, reward_cfg.recipe_exact, rule_timeout_s=reward_cfg.rule_timeout_s
            )
            scorer.judge_fleet = fleet
            scorer.check_judge()
        else:
            scorer = RewardPool(reward_cfg, algo, namespace=namespace, fleet=fleet, output_dir=output_dir)
            scorer.check_judge()
        return scorer
    except BaseException:
        if scorer is not None:
            scorer.close()  # closes the fleet too
        else:
            close_fleet(fleet)
        raise


def driver_has_key(judge_cfg: JudgeConfig) -> bool | None:
    """Whether the driver has ``$reward.judge.api_key_env`` (None where that does not apply: another backend, or
    the key comes from ``api_key_file``), so a worker without it can say the key did not reach it."""
    if judge_cfg.backend != "openai" or judge_cfg.api_key_file or not judge_cfg.api_key_env:
        return None
    return bool(os.environ.get(judge_cfg.api_key_env))


def _start_fleet(fleet, judge_cfg: JudgeConfig) -> None:
    """Start the judge engines now, not at the first request: one that cannot start stops the run here."""
    import ray

    try:
        ray.get(fleet.start.remote())  # bounded by the fleet's own per-engine start deadline
    except ray.exceptions.RayError as exc:
        cause = getattr(exc, "cause", None) or exc
        raise JudgeUnavailable(
            f"reward.judge.backend=engine: the judge engines for reward.judge.model={judge_cfg.model!r} did not "
            f"start: {(str(cause).strip().splitlines() or [type(cause).__name__])[-1][:300]}"
        ) from None
