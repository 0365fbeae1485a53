"""Judges: the slow, unreliable part of iVGR's reward, behind one small async interface.

A judge answers two kinds of questions (``JudgeRequest.kind``):

- ``consistency`` (stream B): does the textual reasoning agree with the reference grounded
  reasoning? Score on the rubric 0.0 / 0.3 / 0.7 / 1.0 (docs/algorithm.md).
- ``equivalence`` (accuracy of free-form and math answers the rules could not accept): is the
  predicted answer equivalent to the ground truth? Score 0.0 or 1.0.

Every backend bounds its own concurrency, puts a deadline on each call, retries a bounded number
of times and, when every try fails, returns the request's explicit ``fallback`` with
``failed=True``; it never raises for a bad or absent judge and never hangs. Counters per result
feed the ``judge/*`` metrics.

Backends (``reward.judge.backend``): ``rule`` (deterministic, CPU default and tests), ``openai``
(OpenAI-compatible HTTP endpoints), ``engine`` (in-cluster vLLM judge actors).

The one place a judge DOES raise is its start-up check (``OpenAIJudge.check``, run by ``make_scorer`` before
the engines and the learner start): a judge that cannot work at all (unreachable, a rejected or missing API
key, a wrong URL or model name) raises :class:`JudgeUnavailable`, and the run stops with that one line.
"""

from __future__ import annotations

from ivgr_dist.reward.judge.base import Judge, JudgeRequest, JudgeResult, JudgeUnavailable

__all__ = ["check_judge", "JUDGE_BACKENDS", "Judge", "JudgeRequest", "JudgeResult", "JudgeUnavailable", "make_judge"]


JUDGE_BACKENDS = ("rule", "openai", "engine")


def make_judge(cfg, fleet=None) -> Judge:
    """The judge for ``reward.judge`` (a ``JudgeConfig``); unknown backends list the valid names. ``fleet``:
    the shared judge-engine fleet (``backend=engine``; see ``reward.judge.fleet``)."""
    if cfg.backend == "rule":
        from ivgr_dist.reward.judge.rule import RuleJudge

        return RuleJudge(cfg)
    if cfg.backend == "openai":
        from ivgr_dist.reward.judge.openai import OpenAIJudge

        return OpenAIJudge(cfg)
    if cfg.backend == "engine":
        from ivgr_dist.reward.judge.engine import EngineJudge

        return EngineJudge(cfg, fleet=fleet)
    raise ValueError(f"reward.judge.backend={cfg.backend!r}: unknown judge; valid: {list(JUDGE_BACKENDS)}")


async def check_judge(judge, driver_has_key: bool | None = None) -> None:
    """The judge's start-up check, where it has one (the OpenAI judge: one request per endpoint; the rule judge has
    nothing to check); raises :class:`JudgeUnavailable`. ``driver_has_key``: see ``OpenAIJudge.check``."""
    check = getattr(judge, "check", None)
    if check is not None:
        await check(driver_has_key)
