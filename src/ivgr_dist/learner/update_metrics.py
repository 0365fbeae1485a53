"""An update's metrics by name: per-rank sums while the micro-batches run, one all-reduce, then the logged values.

:class:`UpdateSums` keeps one float64 0-d tensor per name on the rank's device, so a micro-batch adds its numbers
without a host sync; :meth:`UpdateSums.all_reduce` stacks them in the fixed order of :data:`SUMS` into one tensor,
reduces it once and returns the totals by name. :func:`loss_metrics` turns the totals into the ``loss/*``,
``clip/*``, ``policy/*`` and ``offpolicy/*`` values :meth:`~ivgr_dist.learner.worker.LearnerWorker.update` returns.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["SUMS", "UpdateSums", "loss_metrics"]

SUMS = (
    "pg",  # policy loss, already divided by the update's token denominator (sums to the token mean per rank)
    "kl",  # KL loss term, likewise
    "total",  # the loss that was back-propagated, likewise
    "clip",  # token-weighted clip fractions: fraction x the micro-batch's response tokens
    "clip_high",
    "clip_low",
    "approx_kl",
    "tokens",  # response tokens
    "w",  # truncated importance weights (off-policy correction): sum, sum of squares, at the cap, count
    "w2",
    "w_capped",
    "w_n",
    "slots",  # token positions of the packed rows or padded rectangles the model ran on
    "real",  # of those, real (not padding) tokens
)
"""The summed quantities, in the order they travel through the all-reduce."""

_FRACTIONS = {"clip": "pg_clipfrac", "clip_high": "pg_clipfrac_high", "clip_low": "pg_clipfrac_low"}


class UpdateSums:
    """This rank's sums of :data:`SUMS` over an update's micro-batches."""

    def __init__(self, device: torch.device | str = "cpu"):
        self._sums = {name: torch.zeros((), dtype=torch.float64, device=device) for name in SUMS}

    def add(self, **values: Tensor | float) -> None:
        """Add to the named sums (a name outside :data:`SUMS` raises ``KeyError``)."""
        for name, value in values.items():
            self._sums[name] += value

    def add_losses(self, m: dict[str, Tensor], tokens: Tensor) -> None:
        """One micro-batch's :func:`~ivgr_dist.learner.grpo.grpo_loss` metrics ``m`` (``kl_loss`` may be absent);
        the fractions are weighted by its ``tokens`` response tokens."""
        self.add(pg=m["pg_loss"], kl=m.get("kl_loss", 0.0), total=m["loss"], tokens=tokens)
        self.add(**{name: m[key] * tokens for name, key in _FRACTIONS.items()}, approx_kl=m["approx_kl"] * tokens)

    def add_is_weights(self, w: Tensor, cap: float) -> None:
        """The truncated importance weights of a micro-batch's response tokens."""
        self.add(w=w.sum(), w2=w.square().sum(), w_capped=(w >= cap).sum(), w_n=w.numel())

    def all_reduce(self, reduce: Callable[[Tensor], object]) -> dict[str, float]:
        """The sums over ranks by name: ``reduce`` sums one tensor in :data:`SUMS` order in place
        (``torch.distributed.all_reduce``; with one process, anything that leaves it as is)."""
        stacked = torch.stack([self._sums[name] for name in SUMS])
        reduce(stacked)
        return dict(zip(SUMS, stacked.tolist(), strict=True))


def loss_metrics(tot: dict[str, float], world_size: int, sft: bool = False) -> dict[str, float]:
    """The logged loss values from the global sums ``tot`` (:meth:`UpdateSums.all_reduce`).

    A rank's loss sums are its tokens' losses over ``global tokens / world_size`` (FSDP averages gradients over
    ranks), so their sum over ranks divided by ``world_size`` is the global token mean. Fractions are token means.
    ``sft``: only ``loss/nll``."""
    if sft:
        return {"loss/nll": tot["total"] / world_size}
    tokens = max(tot["tokens"], 1.0)
    return {
        "loss/policy": tot["pg"] / world_size,
        "loss/kl": tot["kl"] / world_size,
        "loss/total": tot["total"] / world_size,
        "clip/frac": tot["clip"] / tokens,
        "clip/frac_high": tot["clip_high"] / tokens,
        "clip/frac_low": tot["clip_low"] / tokens,
        "policy/approx_kl": tot["approx_kl"] / tokens,
        **_is_weight_metrics(tot),
    }


def _is_weight_metrics(tot: dict[str, float]) -> dict[str, float]:
    """``offpolicy/*`` from the global sums of the truncated importance weights (none when the correction is off)."""
    n = tot["w_n"]
    if n <= 0:
        return {}
    return {
        "offpolicy/is_weight_mean": tot["w"] / n,
        "offpolicy/is_clip_frac": tot["w_capped"] / n,
        "offpolicy/ess": tot["w"] ** 2 / (n * tot["w2"]) if tot["w2"] > 0 else 0.0,
    }
