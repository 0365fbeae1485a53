"""``JudgeFailureMonitor``: the driver's per-step watch on judge failures, and the run's stop when they dominate.

Why: a failed judge request is masked or scored by its fallback (``reward.judge.on_failure``), and a run whose
judge fails every request trains without its central reward while every step "succeeds". The start-up check
(``OpenAIJudge.check``) catches a judge that never works; this class catches one that stops working.

Per step (``Trainer.train`` calls :meth:`JudgeFailureMonitor.observe` with the step's metrics record):

- a step with any failed request logs ONE warning (not one per request): failed / asked, the last error kind;
- over the last ``reward.judge.failure_window`` steps (the window must be full, and at least one request asked),
  a failure rate above ``reward.judge.max_failure_rate`` returns the reason to stop, one line naming the rate,
  the window and the last error kind. The trainer then writes the step's checkpoint and stops, as for
  ``ivgr-dist stop``; ``ivgr-dist train`` exits 1 (resumable once the judge is mended).

Failed requests are ``judge/failures`` (every try failed, the judge raised, a reward worker erred, a group passed
its deadline) out of ``judge/requests``; steps without judge requests count in the window with none.
"""

from __future__ import annotations

import logging
from collections import deque

__all__ = ["JudgeFailureMonitor"]

log = logging.getLogger(__name__)


class JudgeFailureMonitor:
    """Counts judge requests and failures per step; says when the windowed failure rate passes the limit."""

    def __init__(self, max_rate: float, window: int):
        if not 0.0 <= max_rate <= 1.0:
            raise ValueError(f"max_rate={max_rate!r}: must be in [0, 1]")
        if window < 1:
            raise ValueError(f"window={window!r}: must be >= 1")
        self.max_rate, self.window = max_rate, window
        self._steps: deque[tuple[float, float]] = deque(maxlen=window)
        self.requests = 0.0
        """Judge requests over the steps observed (this process)."""
        self.failures = 0.0

    def observe(self, step: int, metrics: dict, last_error: str | None = None) -> str | None:
        """Take step ``step``'s ``judge/requests`` and ``judge/failures``; warn when some failed; return the reason
        to stop the run, or None. ``last_error``: the kind of the last failed try (``JudgeResult.error``)."""
        asked, failed = float(metrics.get("judge/requests") or 0.0), float(metrics.get("judge/failures") or 0.0)
        self._steps.append((asked, failed))
        self.requests += asked
        self.failures += failed
        total = sum(a for a, _ in self._steps)
        rate = sum(f for _, f in self._steps) / total if total else 0.0
        error = last_error or "unknown"
        if failed:
            log.warning(
                "step %d: the judge failed %.0f of %.0f requests (last error: %s); %.0f%% over the last %d step(s), "
                "the run stops above reward.judge.max_failure_rate=%g over %d",
                step, failed, asked, error, 100 * rate, len(self._steps), self.max_rate, self.window,
            )  # fmt: skip
        if len(self._steps) < self.window or not total or rate <= self.max_rate:
            return None
        return (
            f"the judge failed {rate:.0%} of {total:.0f} requests over the last {self.window} step(s) "
            f"(reward.judge.failure_window), above reward.judge.max_failure_rate={self.max_rate:g}; last error: {error}"
        )
