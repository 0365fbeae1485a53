"""GRPO loss maths as pure torch functions (no Ray, no process groups).

What the module computes, following docs/algorithm.md (4, "GRPO advantages"; 5, "The loss and the update"):

* :func:`group_advantages` - per-rollout advantage ``(r - mean_g) / (std_g + eps)`` over the
  rollouts of one group (one prompt instance of one stream), with ``std_g`` the unbiased sample
  standard deviation (Bessel's correction, the ``torch.std`` default). :func:`group_stats`
  exposes the per-group mean/std/count for logging.
* :func:`logprobs_from_logits` - log-probabilities of the sampled tokens, computed in fp32 in
  row chunks with a hand-written backward, so no full fp32 copy of the ``[B, T, V]`` logits is
  kept alive for autograd.
* :func:`policy_loss` - the clipped surrogate with asymmetric clipping (ratio kept within
  ``[1 - clip_low, 1 + clip_high]``, recipe 0.2 / 0.28), aggregated as a token mean.
* :func:`kl_k3` - the low-variance ("k3") estimator of KL(policy || reference), per token, with
  the recipe's (EasyR1's, as verl's) bound: the value is clamped to ``[-10, 10]``.
* :func:`grpo_loss` - policy loss plus ``kl_coef`` times the token mean of k3 (recipe 0.01).
* :func:`truncated_is_weights` - the off-policy correction of asynchronous training: per token
  ``min(exp(proximal - behaviour), cap)`` (truncated importance sampling, as in verl's rollout
  correction and AReaL's decoupled PPO). The PPO ratio is taken against the PROXIMAL policy (the
  learner's log-probs at the start of the step), and each token's surrogate is weighted by how much
  more likely the proximal policy makes it than the policy that sampled it (the engine's log-probs,
  possibly several versions older). Synchronous runs have weights ~1 (engine vs learner rounding).

Where this departs from the recipe (an EasyR1/verl fork), on purpose:

* A group with a single rollout gets advantage 0 (it has no baseline to compare with). verl
  instead uses mean 0 / std 1 there, which turns the raw reward into the advantage. Groups whose
  rewards are all equal get exactly 0 (the formula gives 0 up to rounding; we force it).
* The per-token log-ratio ``logp - old_logp`` is clamped to ``[-20, 20]`` before ``exp`` in
  :func:`policy_loss`: this keeps ``exp`` finite (no ``inf * 0 = nan`` from padded or wildly
  off-policy tokens). Inside that range the values are the textbook ones; outside it the term has
  zero gradient. (:func:`kl_k3` clamps ``ref_logp - logp`` the same way, as the recipe does.)
* No dual-clip: for a negative advantage the unclipped branch still applies at large ratios,
  exactly as in the plain asymmetric-clip objective the recipe uses.
* Padded positions are excluded with ``torch.where`` rather than a bare multiply, so a non-finite
  value at a padded position cannot turn the loss into ``nan``.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "GRPOLossConfig",
    "GroupStats",
    "group_advantages",
    "group_advantages_and_stats",
    "group_stats",
    "grpo_loss",
    "kl_k3",
    "logprobs_from_logits",
    "policy_loss",
    "token_mean",
    "truncated_is_weights",
]

# Bound on ``|log ratio|`` before exponentiating (policy ratio and k3): exp(20) ~ 4.9e8 is finite in
# fp32/bf16 and far outside any ratio the clipped objective or a sane KL term would meet.
LOG_RATIO_CLAMP = 20.0

# Bound on the per-token k3 value in :func:`kl_k3`, as in the recipe (EasyR1's and verl's ``low_var_kl``).
KL_VALUE_CLAMP = 10.0

# fp32 workspace per chunk in :func:`logprobs_from_logits` when ``chunk_size`` is not given.
_LOGPROB_CHUNK_BYTES = 256 * 1024 * 1024


# --------------------------------------------------------------------------------------------------
# Configuration and argument checks
# --------------------------------------------------------------------------------------------------


def _as_real(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}={value!r} must be a real number")
    return float(value)


def _check_clip(clip_low: object, clip_high: object) -> None:
    low = _as_real("clip_low", clip_low)
    high = _as_real("clip_high", clip_high)
    if not 0.0 < low < 1.0:
        raise ValueError(f"clip_low={clip_low!r} must be in (0, 1)")
    if not (math.isfinite(high) and high > 0.0):
        raise ValueError(f"clip_high={clip_high!r} must be finite and > 0")


def _check_kl_coef(kl_coef: object) -> None:
    coef = _as_real("kl_coef", kl_coef)
    if not (math.isfinite(coef) and coef >= 0.0):
        raise ValueError(f"kl_coef={kl_coef!r} must be finite and >= 0")


def _check_eps(eps: object) -> None:
    value = _as_real("eps", eps)
    if not (math.isfinite(value) and value > 0.0):
        raise ValueError(f"eps={eps!r} must be finite and > 0")


@dataclass(frozen=True)
class GRPOLossConfig:
    """Coefficients of the GRPO loss; defaults are the recipe's.

    ``clip_low``/``clip_high``: the ratio is clipped to ``[1 - clip_low, 1 + clip_high]``.
    ``kl_coef``: weight of the k3 KL term (0 disables it and the reference policy).
    ``eps``: added to the group std in :func:`group_advantages`.
    """

    clip_low: float = 0.2
    clip_high: float = 0.28
    kl_coef: float = 0.01
    eps: float = 1e-6

    def __post_init__(self) -> None:
        _check_clip(self.clip_low, self.clip_high)
        _check_kl_coef(self.kl_coef)
        _check_eps(self.eps)

    @property
    def uses_reference(self) -> bool:
        """Whether the loss needs reference-policy log-probabilities."""
        return self.kl_coef > 0.0

    def loss_kwargs(self) -> dict[str, float]:
        """Keyword arguments for :func:`grpo_loss` (``eps`` belongs to :func:`group_advantages`)."""
        return {"kl_coef": self.kl_coef, "clip_low": self.clip_low, "clip_high": self.clip_high}


# --------------------------------------------------------------------------------------------------
# Group advantages
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GroupStats:
    """Per-group reward statistics; group ``g`` is ``keys[g]``.

    Group order: first appearance for a sequence of ids, ascending for an integer tensor.
    ``std`` is the unbiased sample std, reported as 0 for single-rollout groups (where
    ``torch.std`` would give ``nan``). ``degenerate`` marks groups whose advantages are all 0:
    a single rollout, or all rewards equal.
    """

    keys: tuple[Hashable, ...]
    index: Tensor  # [N] long: group slot of every sample
    count: Tensor  # [G] long
    mean: Tensor  # [G], dtype of the advantages
    std: Tensor  # [G]
    degenerate: Tensor  # [G] bool

    @property
    def num_groups(self) -> int:
        return len(self.keys)

    @property
    def num_degenerate(self) -> int:
        return int(self.degenerate.sum().item())

    def metrics(self) -> dict[str, float]:
        """Scalars worth logging per step."""
        g = self.num_groups
        return {
            "groups": float(g),
            "groups_degenerate": float(self.num_degenerate),
            "groups_degenerate_frac": self.num_degenerate / g if g else 0.0,
            "group_reward_std_mean": float(self.std.double().mean().item()) if g else 0.0,
        }


def _group_index(group_ids: Sequence[Hashable] | Tensor, n: int, device: torch.device) -> tuple[tuple, Tensor]:
    if isinstance(group_ids, Tensor):
        if group_ids.dim() != 1 or group_ids.numel() != n:
            raise ValueError(f"group_ids has shape {tuple(group_ids.shape)}, expected ({n},) to match rewards")
        if group_ids.is_floating_point() or group_ids.is_complex() or group_ids.dtype == torch.bool:
            raise TypeError(f"group_ids tensor must have an integer dtype, got {group_ids.dtype}")
        keys, index = torch.unique(group_ids.to(device), sorted=True, return_inverse=True)
        return tuple(keys.tolist()), index.long()
    if isinstance(group_ids, (str, bytes)):
        raise TypeError("group_ids must be a sequence of ids or an integer tensor, not a single string")
    slots: dict[Hashable, int] = {}
    # One dict lookup per sample; all arithmetic below is vectorised over samples and groups.
    index_list = [slots.setdefault(gid, len(slots)) for gid in group_ids]
    if len(index_list) != n:
        raise ValueError(f"got {len(index_list)} group ids for {n} rewards")
    return tuple(slots), torch.tensor(index_list, dtype=torch.long, device=device)


def group_stats(rewards: Tensor, group_ids: Sequence[Hashable] | Tensor) -> GroupStats:
    """Per-group count, mean and unbiased std of ``rewards`` (see :class:`GroupStats`)."""
    if not isinstance(rewards, Tensor):
        raise TypeError(f"rewards must be a torch.Tensor, got {type(rewards).__name__}")
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [N], got shape {tuple(rewards.shape)}")
    out_dtype = rewards.dtype if rewards.is_floating_point() else torch.get_default_dtype()
    n = rewards.numel()
    keys, index = _group_index(group_ids, n, rewards.device)
    if n and not bool(torch.isfinite(rewards).all()):
        raise ValueError("rewards contain nan or inf")
    g = len(keys)
    # Moments in float64: a two-pass mean/variance that does not lose the small spreads of 0/1 rewards.
    r = rewards.to(torch.float64)
    count = torch.bincount(index, minlength=g)
    total = torch.zeros(g, dtype=torch.float64, device=r.device).index_add_(0, index, r)
    mean = total / count.clamp(min=1)
    centred = r - mean[index]
    sq = torch.zeros(g, dtype=torch.float64, device=r.device).index_add_(0, index, centred.square())
    std = torch.where(count > 1, (sq / (count - 1).clamp(min=1)).sqrt(), torch.zeros_like(sq))
    rmax = torch.zeros(g, dtype=torch.float64, device=r.device).scatter_reduce_(
        0, index, r, reduce="amax", include_self=False
    )
    rmin = torch.zeros(g, dtype=torch.float64, device=r.device).scatter_reduce_(
        0, index, r, reduce="amin", include_self=False
    )
    degenerate = (count < 2) | (rmax == rmin)
    return GroupStats(
        keys=keys,
        index=index,
        count=count,
        mean=mean.to(out_dtype),
        std=std.to(out_dtype),
        degenerate=degenerate,
    )


def group_advantages_and_stats(
    rewards: Tensor, group_ids: Sequence[Hashable] | Tensor, eps: float = 1e-6
) -> tuple[Tensor, GroupStats]:
    """:func:`group_advantages` plus the :class:`GroupStats` it was computed from."""
    _check_eps(eps)
    stats = group_stats(rewards, group_ids)
    idx = stats.index
    r = rewards.to(torch.float64)
    mean = stats.mean.to(torch.float64)[idx]
    std = stats.std.to(torch.float64)[idx]
    adv = (r - mean) / (std + eps)
    adv = torch.where(stats.degenerate[idx], torch.zeros_like(adv), adv)
    return adv.to(stats.mean.dtype), stats


def group_advantages(rewards: Tensor, group_ids: Sequence[Hashable] | Tensor, eps: float = 1e-6) -> Tensor:
    """GRPO advantage of each rollout relative to its group: ``(r - mean) / (std + eps)``.

    ``rewards``: ``[N]`` floats. ``group_ids``: ``N`` hashable ids (strings, tuples, ints...) or an
    integer tensor ``[N]``; samples with equal ids form a group, in any order. ``std`` is the unbiased
    sample std (as ``torch.std``). Degenerate groups get exactly 0: all rewards equal, or a single
    rollout (verl would use mean 0 / std 1 there, i.e. the raw reward; we give no signal instead).
    Returns ``[N]`` in the rewards' dtype (the default float dtype for integer rewards).
    """
    return group_advantages_and_stats(rewards, group_ids, eps)[0]


# --------------------------------------------------------------------------------------------------
# Token aggregation
# --------------------------------------------------------------------------------------------------


def token_mean(x: Tensor, mask: Tensor, denom: Tensor | float | None = None) -> Tensor:
    """``sum(x * mask) / denom``; ``denom`` defaults to ``mask.sum()`` clamped to at least 1.

    ``mask`` is 1 (or True) on response tokens and 0 on padding; masked-out positions are dropped
    with ``torch.where``, so non-finite values there do not leak into the result.

    ``denom`` exists for gradient accumulation: to get the token mean over a whole mini-batch that
    is processed as several micro-batches, pass the mini-batch's total token count as ``denom`` to
    every micro-batch and *sum* (do not average) the micro-batch losses. Under data parallelism that
    averages gradients over ``W`` ranks, pass ``global_tokens / W`` so the average equals the token
    mean over all ranks.
    """
    if x.shape != mask.shape:
        raise ValueError(f"x has shape {tuple(x.shape)} but mask has shape {tuple(mask.shape)}")
    keep = mask if mask.dtype == torch.bool else mask != 0
    weights = mask.to(x.dtype)
    total = torch.where(keep, x * weights, torch.zeros((), dtype=x.dtype, device=x.device)).sum()
    if denom is None:
        return total / weights.sum().clamp(min=1)
    if not isinstance(denom, Tensor):
        d = _as_real("denom", denom)
        if not (math.isfinite(d) and d > 0):
            raise ValueError(f"denom={denom!r} must be finite and > 0")
    return total / denom


# --------------------------------------------------------------------------------------------------
# Log-probabilities from logits
# --------------------------------------------------------------------------------------------------


def _row_blocks(logits: Tensor) -> list[Tensor]:
    """2-D ``[rows, V]`` views of ``logits`` that cover its rows in row-major order without copying
    (e.g. ``logits[:, :-1]`` cannot be flattened into one view, but each batch row can)."""
    v = logits.shape[-1]
    try:
        return [logits.view(-1, v)]
    except RuntimeError:
        pass
    if logits.dim() == 3:
        return [logits[b] for b in range(logits.shape[0])]
    return [logits.reshape(-1, v)]  # rare layouts: accept one copy in the input dtype


def _scaled_fp32(rows: Tensor, temperature: float) -> Tensor:
    x = rows.float()
    return x / temperature if temperature != 1.0 else x


class _TokenLogProbs(torch.autograd.Function):
    """log_softmax(logits / T).gather(labels), computed chunk by chunk in fp32.

    Saves only the input logits (already kept by the model's graph), the labels and the per-row
    logsumexp; the backward recomputes the softmax chunk by chunk.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, labels: Tensor, temperature: float, chunk_rows: int) -> Tensor:
        flat_labels = labels.reshape(-1)
        n = flat_labels.numel()
        out = torch.empty(n, dtype=torch.float32, device=logits.device)
        lse = torch.empty(n, dtype=torch.float32, device=logits.device)
        offset = 0
        for block in _row_blocks(logits):
            for start in range(0, block.shape[0], chunk_rows):
                rows = block[start : start + chunk_rows]
                end = offset + rows.shape[0]
                x = _scaled_fp32(rows, temperature)
                row_lse = torch.logsumexp(x, dim=-1)
                picked = x.gather(1, flat_labels[offset:end, None]).squeeze(1)
                lse[offset:end] = row_lse
                out[offset:end] = picked - row_lse
                offset = end
        ctx.save_for_backward(logits, flat_labels, lse)
        ctx.temperature = temperature
        ctx.chunk_rows = chunk_rows
        return out.view(labels.shape)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):
        logits, flat_labels, lse = ctx.saved_tensors
        temperature, chunk_rows = ctx.temperature, ctx.chunk_rows
        v = logits.shape[-1]
        g = grad_out.reshape(-1).float()
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        flat_grad = grad.view(-1, v)
        offset = 0
        for block in _row_blocks(logits):
            for start in range(0, block.shape[0], chunk_rows):
                rows = block[start : start + chunk_rows]
                end = offset + rows.shape[0]
                x = _scaled_fp32(rows, temperature)
                gi = g[offset:end, None]
                # d logp_i / d z_j = (1[j == label] - softmax_j) / T
                chunk = torch.exp(x - lse[offset:end, None]).mul_(-gi)
                chunk.scatter_add_(1, flat_labels[offset:end, None], gi)
                if temperature != 1.0:
                    chunk.div_(temperature)
                flat_grad[offset:end] = chunk
                offset = end
        return grad, None, None, None


def logprobs_from_logits(
    logits: Tensor, labels: Tensor, temperature: float = 1.0, chunk_size: int | None = None
) -> Tensor:
    """Log-probability of ``labels`` under ``softmax(logits / temperature)``, in fp32.

    ``logits``: ``[B, T, V]`` (any leading shape, any float dtype, bf16 included); ``labels``: the
    leading shape, integer ids in ``[0, V)``. Returns fp32 with the labels' shape, equal to
    ``log_softmax(logits.float() / temperature, -1).gather(-1, labels[..., None])[..., 0]``.

    Memory: rows are processed ``chunk_size`` at a time (default: about 256 MiB of fp32 per chunk),
    and autograd keeps only ``logits`` and a per-row logsumexp, never a full fp32 ``[B, T, V]`` copy.
    The gradient has the logits' dtype. Double backward is not supported.
    """
    t = _as_real("temperature", temperature)
    if not (math.isfinite(t) and t > 0):
        raise ValueError(f"temperature={temperature!r} must be finite and > 0")
    if logits.dim() < 2 or not logits.is_floating_point():
        raise ValueError(f"logits must be a float tensor [..., V], got {logits.dtype} {tuple(logits.shape)}")
    if tuple(labels.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"labels shape {tuple(labels.shape)} must equal logits shape without V {tuple(logits.shape[:-1])}"
        )
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise TypeError(f"labels must have an integer dtype, got {labels.dtype}")
    v = logits.shape[-1]
    labels = labels.to(device=logits.device, dtype=torch.long)
    if labels.numel() and (bool(labels.min() < 0) or bool(labels.max() >= v)):
        raise ValueError(f"labels must be token ids in [0, {v}); replace ignore ids (e.g. -100) and mask them instead")
    if chunk_size is None:
        chunk_size = max(1, _LOGPROB_CHUNK_BYTES // (4 * v))
    elif isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size!r} must be a positive int")
    return _TokenLogProbs.apply(logits, labels, t, chunk_size)


# --------------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------------


def _masked_max(x: Tensor, keep: Tensor) -> Tensor:
    if x.numel() == 0:
        return torch.zeros((), dtype=x.dtype, device=x.device)
    top = torch.where(keep, x, torch.full((), -math.inf, dtype=x.dtype, device=x.device)).amax()
    return torch.where(keep.any(), top, torch.zeros_like(top))


def truncated_is_weights(proximal_logp: Tensor, behaviour_logp: Tensor, cap: float) -> Tensor:
    """Per-token importance weights ``min(exp(proximal_logp - behaviour_logp), cap)`` (detached, fp32).

    The log-ratio is clamped to [-20, 20] before ``exp`` (a token the behaviour policy found nearly
    impossible cannot overflow to inf, and ``inf * 0`` cannot turn a masked position into nan).
    ``cap > 0``; weights below the cap are left as they are (no lower truncation)."""
    c = _as_real("cap", cap)
    if not (math.isfinite(c) and c > 0):
        raise ValueError(f"cap={cap!r} must be finite and > 0 (0 turns the correction off: pass no weights)")
    if proximal_logp.shape != behaviour_logp.shape:
        raise ValueError(
            f"proximal_logp {tuple(proximal_logp.shape)} and behaviour_logp {tuple(behaviour_logp.shape)} must match"
        )
    log_w = (proximal_logp.detach().float() - behaviour_logp.detach().float()).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return torch.exp(log_w).clamp(max=c)


def policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    denom: Tensor | float | None = None,
    is_weights: Tensor | None = None,
    is_cap: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped surrogate with asymmetric clipping, aggregated as a token mean.

    ``ratio = exp(logp - old_logp)`` (log-ratio clamped to [-20, 20]); per token
    ``max(-A * ratio, -A * clamp(ratio, 1 - clip_low, 1 + clip_high))``; then
    :func:`token_mean` over ``mask`` with ``denom``. ``logp``/``old_logp``/``mask`` are ``[B, T]``;
    ``advantages`` is ``[B]`` (broadcast over tokens) or ``[B, T]``. ``old_logp`` and ``advantages``
    are treated as constants (detached).

    Metrics (detached 0-dim tensors): ``pg_loss`` (the returned loss, so with ``denom``); token means
    over this call's ``mask``, whatever ``denom`` is: ``pg_clipfrac_high`` (A > 0 and ratio > 1 + clip_high, i.e. clipping
    removed the token's gradient), ``pg_clipfrac_low`` (A < 0 and ratio < 1 - clip_low),
    ``pg_clipfrac`` (their sum); ``approx_kl`` (mean of old_logp - logp); ``ratio_mean``,
    ``ratio_max`` (0 when no token is unmasked).

    ``is_weights`` (``[B, T]``, from :func:`truncated_is_weights`) multiply each token's surrogate (off-policy
    correction); with them the metrics add ``is_weight_mean``, ``is_clip_frac`` (share of tokens at
    ``is_cap``) and ``is_ess`` (effective sample size of the weights as a share of the tokens,
    ``(sum w)^2 / (N sum w^2)``; 1 when all weights are equal).
    """
    _check_clip(clip_low, clip_high)
    if logp.shape != old_logp.shape or logp.shape != mask.shape:
        raise ValueError(
            f"logp {tuple(logp.shape)}, old_logp {tuple(old_logp.shape)} and mask {tuple(mask.shape)} must match"
        )
    old_logp = old_logp.detach()
    adv = advantages.detach().to(logp.dtype)
    if adv.shape == logp.shape[:1] and logp.dim() == 2:
        adv = adv[:, None]
    elif adv.shape != logp.shape:
        raise ValueError(
            f"advantages shape {tuple(advantages.shape)} must be [B] or [B, T] for logp {tuple(logp.shape)}"
        )
    adv = adv.expand_as(logp)

    log_ratio = (logp - old_logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    per_token = torch.maximum(unclipped, clipped)
    if is_weights is not None:
        if is_weights.shape != logp.shape:
            raise ValueError(f"is_weights {tuple(is_weights.shape)} must match logp {tuple(logp.shape)}")
        per_token = per_token * is_weights.detach().to(per_token.dtype)
    loss = token_mean(per_token, mask, denom)

    with torch.no_grad():
        keep = mask if mask.dtype == torch.bool else mask != 0
        fmask = keep.to(torch.float32)
        r = ratio.detach().float()
        high = ((adv > 0) & (r > 1.0 + clip_high)).float()
        low = ((adv < 0) & (r < 1.0 - clip_low)).float()
        clip_high_frac = token_mean(high, fmask)
        clip_low_frac = token_mean(low, fmask)
        metrics = {
            "pg_loss": loss.detach(),
            "pg_clipfrac": clip_high_frac + clip_low_frac,
            "pg_clipfrac_high": clip_high_frac,
            "pg_clipfrac_low": clip_low_frac,
            "approx_kl": token_mean((old_logp - logp.detach()).float(), fmask),
            "ratio_mean": token_mean(r, fmask),
            "ratio_max": _masked_max(r, keep),
        }
        if is_weights is not None:
            w = torch.where(keep, is_weights.detach().float(), torch.zeros((), device=logp.device))
            n = fmask.sum()
            metrics["is_weight_mean"] = token_mean(w, fmask)
            at_cap = (w >= is_cap) & keep if is_cap is not None else torch.zeros_like(keep)
            metrics["is_clip_frac"] = token_mean(at_cap.float(), fmask)
            metrics["is_ess"] = torch.where(n > 0, w.sum().square() / (n * w.square().sum()).clamp(min=1e-30), n)
    return loss, metrics


def kl_k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Per-token k3 estimate of KL(policy || reference), clamped as in the recipe (EasyR1's ``low_var_kl``).

    With ``d = clamp(ref_logp - logp, -20, 20)`` the value is ``clamp(exp(d) - d - 1, -10, 10)``:

    * ``exp(d) - d - 1`` is unbiased for the KL when tokens are sampled from the policy, never negative
      and of low variance; its gradient with respect to ``logp`` is ``1 - exp(d)``.
    * Clamping ``d`` to [-20, 20] keeps ``exp`` finite; a token whose ``d`` is clamped has gradient 0.
    * Clamping the value to [-10, 10] bounds what one far-off token can add: a token whose k3 exceeds 10
      contributes exactly 10 and has gradient 0 (e.g. ``logp = -0.01``, ``ref_logp = -12``: k3 would be
      10.99). The lower bound does not bind, since k3 >= 0.

    ``exp(d) - d - 1`` is evaluated as ``expm1(d) - d``: mathematically the same value and gradient, without the
    cancellation near ``d = 0``. ``ref_logp`` is treated as a constant.
    """
    if logp.shape != ref_logp.shape:
        raise ValueError(f"logp {tuple(logp.shape)} and ref_logp {tuple(ref_logp.shape)} must match")
    d = (ref_logp.detach() - logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return (torch.expm1(d) - d).clamp(-KL_VALUE_CLAMP, KL_VALUE_CLAMP)


def grpo_loss(
    logp: Tensor,
    old_logp: Tensor,
    ref_logp: Tensor | None,
    advantages: Tensor,
    mask: Tensor,
    kl_coef: float = 0.01,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    denom: Tensor | float | None = None,
    is_weights: Tensor | None = None,
    is_cap: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """:func:`policy_loss` (with its off-policy ``is_weights``) + ``kl_coef * token_mean(kl_k3(logp, ref_logp),
    mask, denom)``.

    ``ref_logp`` may be ``None`` only when ``kl_coef == 0``; if it is given with ``kl_coef == 0`` the
    KL is still reported in the metrics but adds nothing to the loss. Metrics: those of
    :func:`policy_loss`, plus ``kl_loss`` (the token-mean k3, with ``denom``; absent without a
    reference) and ``loss``.
    """
    _check_kl_coef(kl_coef)
    if kl_coef > 0 and ref_logp is None:
        raise ValueError(f"kl_coef={kl_coef!r} > 0 needs ref_logp; pass reference log-probs or set kl_coef=0")
    loss, metrics = policy_loss(
        logp, old_logp, advantages, mask, clip_low, clip_high, denom=denom, is_weights=is_weights, is_cap=is_cap
    )
    if ref_logp is not None:
        if kl_coef > 0:
            kl = token_mean(kl_k3(logp, ref_logp), mask, denom)
            loss = loss + kl_coef * kl
        else:
            with torch.no_grad():
                kl = token_mean(kl_k3(logp.detach(), ref_logp), mask, denom)
        metrics["kl_loss"] = kl.detach()
    metrics["loss"] = loss.detach()
    return loss, metrics
