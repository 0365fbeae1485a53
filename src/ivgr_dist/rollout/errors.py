"""How a failed call on an engine actor is read: the engine is gone, or the call failed.

Imported by the rollout pool, the weight sync and the judge fleet alike; it imports nothing of the package."""

from __future__ import annotations

__all__ = ["engine_dead"]


def engine_dead(exc: BaseException) -> bool:
    """Whether a failed ``generate_group`` call means its engine is gone: vLLM raises ``EngineDeadError``
    for every request once its EngineCore process has died (crash, OOM kill), while the actor lives on.
    Matched by name: importing vLLM in the driver only for the class costs seconds."""
    kinds = [*type(exc).__mro__, *type(getattr(exc, "cause", None)).__mro__]
    return any(k.__name__ == "EngineDeadError" for k in kinds)
