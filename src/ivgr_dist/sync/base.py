"""The weight-transport interface: a driver side, a sender inside every learner rank, a receiver inside every engine.

A backend (one module of ``ivgr_dist.sync``, one entry of ``ivgr_dist.sync.BACKENDS``) supplies three parts:

- :class:`WeightSync`, in the driver: builds a small ``plan`` per push (where the data goes: a folder, a
  group rendezvous, the bucket size, the wire dtype), hands it to the learner group
  (``LearnerGroup.push_weights``) and drives the engines' side of the transfer through their actors
  (:class:`~ivgr_dist.sync.fanout.EngineView`, :func:`~ivgr_dist.sync.fanout.call_engines`);
- :class:`WeightSender`, in every learner rank: ``LearnerWorker.push_weights(version, plan)`` gives it the
  rank's weights (:class:`WeightSource`) and the plan; it returns what the driver needs back;
- a receiver in every engine: a vLLM ``WeightTransferEngine`` registered by ``ivgr_dist.sync.vllm_plugin``
  (the shared lifecycle is ``ivgr_dist.sync.receive.ReceiveSession``), named by the driver's
  ``engine_backend`` so the rollout engines are created with it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

import torch

__all__ = ["WeightSender", "WeightSource", "WeightSync"]


class WeightSync(Protocol):
    """Driver side: pushes the learner group's current weights into every rollout engine."""

    engine_backend: str
    """Name of the vLLM weight-transfer engine the rollout engines must be created with."""

    def setup(self, learners, rollouts) -> None:
        """One-time checks and rendezvous between the learner group and the engines."""

    def push(self, learners, rollouts, version: int, engines: list[int] | None = None) -> dict[str, float]:
        """Send the weights, make every live engine (at least ``engines``, when given) take ``version``;
        returns ``sync/*`` metrics."""

    def close(self) -> None: ...


class WeightSource(Protocol):
    """What a sender reads from its learner rank (``LearnerWorker``)."""

    rank: int

    def device(self) -> str: ...

    def named_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """``(checkpoint name, parameter as this rank holds it: DTensor or plain tensor)``, push order."""

    def iter_full_tensors(self, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor | None]]:
        """Full tensors, gathered (collective; rank 0 gets them, the others ``None``)."""

    def weight_metadata(self, dtype: str | None = None) -> list[tuple[str, str, tuple[int, ...]]]:
        """``(checkpoint name, wire dtype, global shape)`` of every weight, push order, nothing gathered."""


class WeightSender(Protocol):
    """Learner side: one rank's part of a push. Every rank of the learner group runs it for the same plan
    (a sender may run collectives among the learner ranks)."""

    def push(self, source: WeightSource, version: int | None, plan: dict[str, Any]) -> dict[str, Any]: ...

    def close(self) -> None: ...
