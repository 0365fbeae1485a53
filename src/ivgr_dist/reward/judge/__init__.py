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

from dataclasses import dataclass, field
from typing import Any, Protocol

__all__ = ["check_judge", "JUDGE_BACKENDS", "Judge", "JudgeRequest", "JudgeResult", "JudgeUnavailable", "make_judge"]


@dataclass
class JudgeRequest:
    """One question for the judge."""

    kind: str
    """``consistency`` or ``equivalence``."""
    question: str
    """The visual question (without image markers)."""
    candidate: str
    """Consistency: the textual rollout's reasoning. Equivalence: the predicted answer."""
    reference: str
    """Consistency: the reference grounded reasoning. Equivalence: the ground-truth answer."""
    fallback: float = 0.0
    """Score used when the judge cannot answer (counted as a failure)."""
    context: dict[str, Any] = field(default_factory=dict)
    """Extra record data a backend may use (e.g. the synthetic set's ``objects`` for the rule judge)."""
    request_id: str = ""
    """For logs."""


@dataclass
class JudgeResult:
    """The judge's answer and what it cost."""

    score: float
    calls: int = 0
    """HTTP / engine calls made (retries included)."""
    retries: int = 0
    timeouts: int = 0
    parse_failures: int = 0
    """Answers that held no parsable score."""
    failed: bool = False
    """True when ``score`` is the fallback because every try failed."""
    latency_s: float = 0.0
    """Wall time from the first call to the answer."""
    error: str = ""
    """When ``failed``: the kind of the last failed try (``HTTP 503``, ``ConnectError``, ``timeout``, ...), no URL."""


class JudgeUnavailable(RuntimeError):
    """The judge cannot work at all, found at start (``make_scorer``, ``ivgr-dist eval``): the run stops with this
    message (one line, naming the URL, status, config key or environment variable; never the key). A judge that
    fails during a run is the failure-rate stop's (``reward.judge.monitor``), which checkpoints first."""


class Judge(Protocol):
    """``await judge.score(requests)`` -> one result per request, in order; never raises for judge faults."""

    async def score(self, requests: list[JudgeRequest]) -> list[JudgeResult]: ...

    async def close(self) -> None: ...


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
