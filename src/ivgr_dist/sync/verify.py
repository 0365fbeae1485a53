"""Verify that the engines hold the learner's weights: a probe both sides score, compared token by token.

A version number says which push an engine took, not what it loaded. This check looks at what it computes:
a fixed probe (one prompt with its image, and the first tokens of a response the engines sampled for it)
is scored teacher-forced by every engine (``RolloutWorker.score``: raw log-probs, no temperature, no logit
bias) and by the learner (``LearnerGroup.score`` at temperature 1). Identical weights agree up to the engines'
bf16 rounding (~0.005 on the tiny models); a stale, skipped or corrupted bucket, or a wrong name mapping,
is off by far more. On CPU this is also the only check of the linear layers: vLLM's CPU kernels repack them,
and their digests (``compute_weight_checksums``) cover nothing (see tests/integration/test_rollout_sync.py).
"""

from __future__ import annotations

import dataclasses
import logging

from ivgr_dist.types import Rollout

log = logging.getLogger(__name__)

__all__ = ["VerificationError", "WeightVerifier"]


class VerificationError(RuntimeError):
    """An engine computes something else than the learner's weights would."""


class WeightVerifier:
    """Holds the probe and compares engines with the learner (``sync.verify_every``, ``sync.verify_tolerance``)."""

    def __init__(self, tolerance: float, probe_tokens: int = 16):
        self.tolerance, self.probe_tokens = tolerance, probe_tokens
        self.probe: Rollout | None = None

    def choose_probe(self, rollouts: list[Rollout]) -> None:
        """Fix the probe once: the first rollout with an image and a response (else the first with a response)."""
        if self.probe is not None:
            return
        candidates = [r for r in rollouts if r.response_ids]
        with_image = [r for r in candidates if r.prompt.images]
        if not candidates:
            return
        r = (with_image or candidates)[0]
        ids = list(r.response_ids[: self.probe_tokens])
        self.probe = dataclasses.replace(r, response_ids=ids, logprobs=[0.0] * len(ids), advantage=0.0)

    def check(self, learners, rollouts, version: int) -> dict[str, float]:
        """``sync/verified`` (1.0 when every live engine's mean |engine - learner| probe log-prob is within the
        tolerance), ``sync/verify_mean_abs`` (the worst engine's mean) and ``sync/verify_max_abs`` (the largest
        single token); the caller logs them and then raises :meth:`error` when verification failed. The mean,
        not the peak, is compared: a bf16 engine's single low-probability tokens can be off by 0.1 on real
        models while every token of a stale or corrupted layer is off."""
        import ray

        from ivgr_dist.learner.step_data import StepBatch

        engines = rollouts.engine_view() if self.probe is not None else None
        if engines is None or not engines.ids:
            return {}  # nothing to compare (no engine live: verified would claim a check that did not happen)
        (reference,) = learners.score(StepBatch.from_rollouts([self.probe]), "policy", 1.0)
        ids = list(self.probe.response_ids)
        refs = {e: actor.score.remote(self.probe.prompt, ids) for e, actor in engines.actors.items()}
        mean: dict[int, float] = {}
        peak = 0.0
        for e, ref in refs.items():
            diffs = [abs(s["logprob"] - r) for s, r in zip(ray.get(ref, timeout=120), reference, strict=True)]
            mean[e] = sum(diffs) / len(diffs)
            peak = max(peak, *diffs)
        bad = {e: d for e, d in mean.items() if d > self.tolerance}
        self.last = (version, mean, bad)
        return {
            "sync/verified": float(not bad),
            "sync/verify_mean_abs": max(mean.values(), default=0.0),
            "sync/verify_max_abs": peak,
        }

    def error(self) -> VerificationError | None:
        """The error for the last :meth:`check`, or None when it passed."""
        version, mean, bad = getattr(self, "last", (None, {}, {}))
        if not bad:
            return None
        detail = ", ".join(f"engine {e}: {d:.4f}" for e, d in sorted(bad.items()))
        return VerificationError(
            f"weight version {version}: engine(s) {sorted(bad)} do not hold the learner's weights: the mean "
            f"|engine - learner| log-prob on the {len(self.probe.response_ids)}-token probe is {detail} "
            f"(sync.verify_tolerance={self.tolerance}; engines that agree: "
            f"{sorted(set(mean) - set(bad)) or 'none'}). A push skipped or corrupted part of the weights"
        )
