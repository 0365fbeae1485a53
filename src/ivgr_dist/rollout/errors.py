"""How a failed call on an engine actor is read: the engine is gone, or the call failed.

Imported by the rollout pool, the engine fleet, the weight sync and the judge fleet alike; it imports nothing of the
package."""

from __future__ import annotations

__all__ = ["EngineDeadError", "engine_dead", "failure_text"]


class EngineDeadError(RuntimeError):
    """An engine's vLLM EngineCore is gone while its actor lives (``RolloutWorker.probe`` raises it). Named like
    vLLM's own ``EngineDeadError`` (what a request on a dead core raises), so :func:`engine_dead` reads both."""


def engine_dead(exc: BaseException) -> bool:
    """Whether a failed call on an engine actor (``generate_group``, ``probe``) means its engine is gone: vLLM
    raises ``EngineDeadError`` for every request once its EngineCore process has died (crash, OOM kill), while the
    actor lives on. Matched by class name: importing vLLM in the driver only for the class costs seconds."""
    kinds = [*type(exc).__mro__, *type(getattr(exc, "cause", None)).__mro__]
    return any(k.__name__ == "EngineDeadError" for k in kinds)


def failure_text(exc: BaseException, limit: int | None = None) -> str:
    """``Type: first line`` of a failed call on an engine actor, for logs and ``failures`` lists: the task's own
    exception (a ``RayTaskError``'s ``cause``, e.g. ``EngineDeadError``) rather than Ray's wrapper; the line cut to
    ``limit`` characters when given."""
    cause = getattr(exc, "cause", None)
    what = cause if isinstance(cause, BaseException) else exc
    first = (str(what).splitlines() or [""])[0]
    return f"{type(what).__name__}: {first if limit is None else first[:limit]}"
