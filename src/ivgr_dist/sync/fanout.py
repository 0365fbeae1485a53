"""One call on every live rollout engine, with a deadline, and an error that says which engine did what.

Weight pushes fail in three ways an engine can be in: it answered with an error (often only because a
peer broke the transfer), it died (its actor, or its vLLM EngineCore: ``EngineDeadError``), or it did not
answer by the deadline (hung: a stopped or wedged EngineCore). :class:`SyncError` keeps the three apart:
``failed_engines`` are the dead and the hung ones, the engines to drop before trying again. An engine whose call
failed otherwise is asked once more at the end whether its EngineCore is gone: a TP worker killed mid-transfer
fails the update with vLLM's "cancelled" before the core shuts down.

Weight sync sees the engines only through :class:`EngineView`, which the rollout pool hands out
(``RolloutPool.engine_view``): the live engines' actor handles, their tensor-parallel size and nodes.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ivgr_dist.rollout.errors import engine_dead, failure_text

__all__ = ["EngineView", "SyncError", "call_engines"]


@dataclass(frozen=True)
class EngineView:
    """The live rollout engines as weight sync sees them (taken once per push: membership changes between)."""

    actors: Mapping[int, Any]
    """Engine id -> its Ray actor handle (a ``RolloutWorker``), in fleet order."""
    tensor_parallel_size: int
    nodes: Mapping[int, str]
    """Engine id -> the Ray node it runs on ("?" when unknown)."""

    @property
    def ids(self) -> list[int]:
        return list(self.actors)


class SyncError(RuntimeError):
    """A weight push (or the group it needs) failed; the message names the engines and the version."""

    def __init__(
        self,
        message: str,
        version: int | None,
        failed_engines: list[int] | None = None,
        errors: dict[int, str] | None = None,
    ):
        super().__init__(message)
        self.version = version
        self.failed_engines = sorted(failed_engines or [])
        self.errors = dict(errors or {})


def call_engines(
    engines: EngineView,
    method: str,
    args: Mapping[int, tuple],
    timeout_s: float,
    what: str,
    version: int | None,
    poll_s: float = 1.0,
) -> dict[int, Any]:
    """``actor.<method>(*args[e])`` on each engine ``e`` of ``args`` (ids of ``engines``) at once; results by engine, or
    :class:`SyncError` once every call has ended (or its engine is found dead, asked every ``poll_s``) or
    ``timeout_s`` has passed."""
    import ray

    refs = {getattr(engines.actors[e], method).remote(*a): e for e, a in args.items()}
    pending = list(refs)
    deadline = time.monotonic() + timeout_s
    results: dict[int, Any] = {}
    errors: dict[int, str] = {}
    dead: list[int] = []
    while pending:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        done, pending = ray.wait(pending, num_returns=1, timeout=min(left, poll_s))
        if not done:  # a call waiting on an EngineCore that died may never return: ask the actors
            for ref in list(pending):
                e = refs[ref]
                try:
                    gone = ray.get(engines.actors[e].engine_dead.remote(), timeout=max(1.0, poll_s))
                except ray.exceptions.GetTimeoutError:
                    continue  # the actor itself is busy or stopped: the deadline decides
                except ray.exceptions.RayActorError:
                    gone = True
                if gone:
                    pending.remove(ref)
                    dead.append(e)
                    errors[e] = "EngineDeadError: its vLLM EngineCore is gone"
            continue
        for ref in done:
            e = refs[ref]
            try:
                results[e] = ray.get(ref)
            except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as exc:
                errors[e] = failure_text(exc)
                if isinstance(exc, ray.exceptions.RayActorError) or engine_dead(exc):
                    dead.append(e)
    hung = sorted(refs[r] for r in pending)
    if not errors and not hung:
        return results
    dead += _died_meanwhile(engines, [e for e in errors if e not in dead], poll_s)
    where = f"weight push to version {version}" if version is not None else "weight-transfer group"
    parts = [f"engine {e} did not answer within {timeout_s:g}s (hung)" for e in hung]
    parts += [f"engine {e} {'died' if e in dead else 'failed'}: {msg[:300]}" for e, msg in sorted(errors.items())]
    raise SyncError(f"{where}: {what}: " + "; ".join(parts), version, failed_engines=[*dead, *hung], errors=errors)


def _died_meanwhile(engines: EngineView, failed: list[int], poll_s: float) -> list[int]:
    """Those of ``failed`` (their call raised, not with ``EngineDeadError``) whose EngineCore is gone by now: a TP
    worker that died mid-transfer fails the call with vLLM's "cancelled" before the core shuts down. Asked twice,
    ``poll_s`` apart, when the first answer finds none dead (the core may be shutting down still)."""
    import ray

    def ask(e: int) -> bool:
        try:
            return bool(ray.get(engines.actors[e].engine_dead.remote(), timeout=max(1.0, poll_s)))
        except ray.exceptions.GetTimeoutError:
            return False
        except ray.exceptions.RayActorError:
            return True

    if not failed:
        return []
    gone = [e for e in failed if ask(e)]
    if not gone:
        time.sleep(poll_s)
        gone = [e for e in failed if ask(e)]
    return gone
