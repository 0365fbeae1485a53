"""Weight sync from the learner group into every rollout engine: one small interface, backends by name.

A backend moves the learner's full weights into each engine through vLLM's weight-transfer
lifecycle and stamps them with a monotonically increasing version; afterwards the engines' prefix,
encoder and multimodal caches are reset (see :meth:`RolloutWorker.update_weights`).

Backends (``sync.backend``):

- ``ivgr_shm`` (CPU default): rank 0 writes bucketed safetensors files to shared memory, engines
  load them (:mod:`ivgr_dist.sync.shm`). Same-node only.
- ``nccl`` (GPU default): vLLM's native NCCL weight-transfer engine; learner rank 0 broadcasts
  bucketed tensors to every engine's workers (:mod:`ivgr_dist.sync.nccl`).
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
        """One-time rendezvous between the learner group and the engines."""

    def push(self, learners, rollouts, version: int) -> dict[str, float]:
        """Send the weights, make every engine take ``version``; returns ``sync/*`` metrics."""

    def close(self) -> None: ...


def _shm():
    from ivgr_dist.sync.shm import ShmWeightSync

    return ShmWeightSync


def _nccl():
    from ivgr_dist.sync.nccl import NcclWeightSync

    return NcclWeightSync


BACKENDS = {"ivgr_shm": _shm, "nccl": _nccl}


def resolve_backend(name: str, use_gpus: bool) -> str:
    """``auto`` -> a concrete backend; unknown names fail with the list of valid ones."""
    if name == "auto":
        return "nccl" if use_gpus else "ivgr_shm"
    if name not in BACKENDS:
        raise ValueError(f"sync.backend={name!r}: unknown weight-sync backend; valid: {['auto', *BACKENDS]}")
    return name


def make_weight_sync(name: str, use_gpus: bool, bucket_bytes: int, dtype: str | None = None) -> WeightSync:
    """The backend object for ``sync.backend`` (after ``auto`` is resolved); ``dtype``: the engines' dtype."""
    return BACKENDS[resolve_backend(name, use_gpus)]()(bucket_bytes=bucket_bytes, dtype=dtype)
