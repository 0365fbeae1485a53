"""Weight sync from the learner group into every rollout engine: one small interface, backends by name.

A backend moves the learner's full weights into each engine through vLLM's weight-transfer
lifecycle and stamps them with a monotonically increasing version, landing in running generations
(paused, not drained); afterwards the engines' prefix and encoder caches are reset and each engine checks
that the push reached every one of its parameters (see :meth:`RolloutWorker.update_weights`). Every transfer
has a deadline (``sync.timeout_s``); a failure raises :class:`~ivgr_dist.sync.fanout.SyncError` naming the
engines that died or hung, so the caller can drop them and push again.

Each backend is one module with three parts behind the interface of :mod:`ivgr_dist.sync.base`: the
driver side (:class:`~ivgr_dist.sync.base.WeightSync`: ``setup``, ``push``, ``close``, which the trainer
calls), a sender inside every learner rank (:class:`~ivgr_dist.sync.base.WeightSender`, run by
``LearnerWorker.push_weights(version, plan)`` for the plan the driver side builds) and a receiver inside
every engine (a vLLM weight-transfer engine registered by :mod:`ivgr_dist.sync.vllm_plugin`). The driver
side reaches the learners through ``LearnerGroup.push_weights`` / ``push_weights_async`` (plus rank 0's
address and the ranks' nodes) and the engines only through the pool's
:class:`~ivgr_dist.sync.fanout.EngineView`. A new transport is a new module and one entry of
:data:`BACKENDS`.

Backends (``sync.backend``):

- ``ivgr_shm``: every learner rank writes its shards to shared-memory files, engines load them
  (:mod:`ivgr_dist.sync.shm`). Learner ranks and engines on ONE node; the fastest CPU path.
- ``gloo``: learner rank 0 broadcasts packed buckets to every engine worker over one gloo process
  group (:mod:`ivgr_dist.sync.collective`); CPU tensors over TCP, works across nodes.
- ``nccl``: the same code with the NCCL communicator and CUDA buffers (GPU clusters).
- ``auto``: ``nccl`` when the cluster has GPUs, else ``ivgr_shm``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ivgr_dist.sync import collective, shm
from ivgr_dist.sync.base import WeightSender, WeightSync

__all__ = [
    "BACKENDS",
    "Backend",
    "WeightSender",
    "WeightSync",
    "engine_backend",
    "engine_joins_group",
    "make_sender",
    "make_weight_sync",
    "resolve_backend",
]


@dataclass(frozen=True)
class Backend:
    """One transport: how its driver side and its learner-side sender are made, and its engine-side receiver."""

    driver: Callable[[int, str | None, float], WeightSync]
    """``(bucket_bytes, engine dtype, timeout_s)`` -> the driver side."""
    sender: Callable[[], WeightSender]
    """-> the sender, made in every learner rank (``LearnerWorker.push_weights``)."""
    engine: str
    """The vLLM weight-transfer engine (the receiver) the rollout engines are created with."""
    register: Callable[[], None]
    """Registers that engine with vLLM (idempotent; ``ivgr_dist.sync.vllm_plugin`` calls it in every vLLM process)."""
    joins_group: bool = False
    """Its engines join a group the driver side forms (``RolloutWorker.wt_init``) instead of starting their receiver
    when they start."""


def _shm(bucket_bytes: int, dtype: str | None, timeout_s: float) -> WeightSync:
    return shm.ShmWeightSync(bucket_bytes=bucket_bytes, dtype=dtype, timeout_s=timeout_s)


def _collective(communicator: str) -> Callable[[int, str | None, float], WeightSync]:
    def make(bucket_bytes: int, dtype: str | None, timeout_s: float) -> WeightSync:
        return collective.CollectiveWeightSync(
            communicator, bucket_bytes=bucket_bytes, dtype=dtype, timeout_s=timeout_s
        )

    return make


BACKENDS: dict[str, Backend] = {
    "ivgr_shm": Backend(_shm, shm.ShmSender, shm.BACKEND_NAME, shm.register_with_vllm),
    "gloo": Backend(
        _collective("gloo"), collective.CollectiveSender, collective.BACKEND_NAME, collective.register_with_vllm, True
    ),
    "nccl": Backend(
        _collective("nccl"), collective.CollectiveSender, collective.BACKEND_NAME, collective.register_with_vllm, True
    ),
}


def resolve_backend(name: str, use_gpus: bool) -> str:
    """``auto`` -> a concrete backend; unknown names fail with the list of valid ones."""
    if name == "auto":
        return "nccl" if use_gpus else "ivgr_shm"
    if name not in BACKENDS:
        raise ValueError(f"sync.backend={name!r}: unknown weight-sync backend; valid: {['auto', *BACKENDS]}")
    return name


def engine_backend(name: str, use_gpus: bool) -> str:
    """The vLLM weight-transfer engine that rollout engines must be built with for ``sync.backend=name``."""
    return BACKENDS[resolve_backend(name, use_gpus)].engine


def engine_joins_group(engine: str) -> bool:
    """Whether engines built with the vLLM weight-transfer engine ``engine`` wait for the driver's group
    (``wt_init``) instead of starting their receiver at start (``RolloutWorker.start``)."""
    return any(b.joins_group for b in BACKENDS.values() if b.engine == engine)


def make_weight_sync(
    name: str, use_gpus: bool, bucket_bytes: int, dtype: str | None = None, timeout_s: float = 300.0
) -> WeightSync:
    """The driver side for ``sync.backend`` (after ``auto`` is resolved); ``dtype``: the engines' dtype."""
    return BACKENDS[resolve_backend(name, use_gpus)].driver(bucket_bytes, dtype, timeout_s)


def make_sender(name: str) -> WeightSender:
    """The learner-side sender of backend ``name`` (a concrete name: the driver side puts it in every plan)."""
    if name not in BACKENDS:
        raise ValueError(f"weight-sync plan names backend {name!r}: no sender; valid: {list(BACKENDS)}")
    return BACKENDS[name].sender()
