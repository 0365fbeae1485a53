"""Weight sync from the learner group into every rollout engine: one small interface, backends by name.

A backend moves the learner's full weights into each engine through vLLM's weight-transfer
lifecycle and stamps them with a monotonically increasing version, landing in running generations
(paused, not drained); afterwards the engines' prefix and encoder caches are reset and each engine checks that the push reached every one of
its parameters (see :meth:`RolloutWorker.update_weights`). Every transfer has a deadline
(``sync.timeout_s``); a failure raises :class:`~ivgr_dist.sync.fanout.SyncError` naming the engines
that died or hung, so the caller can drop them and push again.

Backends (``sync.backend``):

- ``ivgr_shm``: every learner rank writes its shards to shared-memory files, engines load them
  (:mod:`ivgr_dist.sync.shm`). Learner ranks and engines on ONE node; the fastest CPU path.
- ``gloo``: learner rank 0 broadcasts packed buckets to every engine worker over one gloo process
  group (:mod:`ivgr_dist.sync.collective`); CPU tensors over TCP, works across nodes.
- ``nccl``: the same code with the NCCL communicator and CUDA buffers (GPU clusters).
- ``auto``: ``nccl`` when the cluster has GPUs, else ``ivgr_shm``.
"""

from __future__ import annotations

from typing import Protocol

__all__ = ["BACKENDS", "WeightSync", "make_weight_sync", "resolve_backend"]


class WeightSync(Protocol):
    """Pushes the learner group's current weights into every rollout engine."""

    engine_backend: str
    """Name of the vLLM weight-transfer engine the rollout engines must be created with."""

    def setup(self, learners, rollouts) -> None:
        """One-time checks and rendezvous between the learner group and the engines."""

    def push(self, learners, rollouts, version: int, engines: list[int] | None = None) -> dict[str, float]:
        """Send the weights, make every live engine (at least ``engines``, when given) take ``version``;
        returns ``sync/*`` metrics."""

    def close(self) -> None: ...


def _shm(bucket_bytes: int, dtype: str | None, timeout_s: float):
    from ivgr_dist.sync.shm import ShmWeightSync

    return ShmWeightSync(bucket_bytes=bucket_bytes, dtype=dtype, timeout_s=timeout_s)


def _collective(communicator: str):
    def make(bucket_bytes: int, dtype: str | None, timeout_s: float):
        from ivgr_dist.sync.collective import CollectiveWeightSync

        return CollectiveWeightSync(communicator, bucket_bytes=bucket_bytes, dtype=dtype, timeout_s=timeout_s)

    return make


BACKENDS = {"ivgr_shm": _shm, "gloo": _collective("gloo"), "nccl": _collective("nccl")}


def resolve_backend(name: str, use_gpus: bool) -> str:
    """``auto`` -> a concrete backend; unknown names fail with the list of valid ones."""
    if name == "auto":
        return "nccl" if use_gpus else "ivgr_shm"
    if name not in BACKENDS:
        raise ValueError(f"sync.backend={name!r}: unknown weight-sync backend; valid: {['auto', *BACKENDS]}")
    return name


def engine_backend(name: str, use_gpus: bool) -> str:
    """The vLLM weight-transfer engine that rollout engines must be built with for ``sync.backend=name``."""
    return "ivgr_shm" if resolve_backend(name, use_gpus) == "ivgr_shm" else "ivgr_collective"


def make_weight_sync(
    name: str, use_gpus: bool, bucket_bytes: int, dtype: str | None = None, timeout_s: float = 300.0
) -> WeightSync:
    """The backend object for ``sync.backend`` (after ``auto`` is resolved); ``dtype``: the engines' dtype."""
    return BACKENDS[resolve_backend(name, use_gpus)](bucket_bytes, dtype, timeout_s)
