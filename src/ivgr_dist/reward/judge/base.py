"""The judge interface: what a backend is asked (:class:`JudgeRequest`), what it answers (:class:`JudgeResult`),
the :class:`Judge` protocol and :class:`JudgeUnavailable`. Backends import these from here; the factory
(``ivgr_dist.reward.judge.make_judge``) imports the backends."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

__all__ = ["Judge", "JudgeRequest", "JudgeResult", "JudgeUnavailable"]


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
