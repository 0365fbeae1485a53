"""``ReferenceCache``: the per-record reference table as one named Ray actor, shared by all reward workers.

Reward workers offer each grounded group's candidate (:meth:`ReferenceCache.update`) and read the
reference of a textual group (:meth:`ReferenceCache.get`). One actor, methods run one at a time,
so updates are serialised and ``should_replace`` sees a consistent table.

The cache is training state: the DRIVER saves it with every checkpoint (``Trainer.save`` ->
``RewardPool.state_dict`` -> :meth:`ReferenceCache.state_dict`) and restores it on resume
(:meth:`ReferenceCache.load_state_dict`); the state is the JSON-serialisable
:meth:`ReferenceTable.state_dict <ivgr_dist.reward.reference.ReferenceTable.state_dict>`, the same
as the in-process scorer's, so either mode resumes from the other's checkpoint.

The actor is named :data:`CACHE_NAME` in a namespace per run and created with ``get_if_exists``:
every process of the run that asks for it gets the same actor. The pool pins it to the driver's node
(``NodeAffinitySchedulingStrategy``, ``soft=False``): that node's loss ends the run anyway, so the cache
adds no other node whose loss would cost it. If the actor is lost nonetheless (killed, out of memory), the
pool recreates it and restores it from the last checkpoint (``RewardPool._restore_cache``); a reward worker
that finds it gone looks it up by name again, or raises :class:`CacheLost` for the driver to restore it.
"""

from __future__ import annotations

from typing import Any

from ivgr_dist.reward.reference import Reference, ReferenceTable

__all__ = ["CACHE_NAME", "CacheLost", "ReferenceCache", "get_reference_cache"]

CACHE_NAME = "ivgr_reference_cache"


class CacheLost(RuntimeError):
    """A reward worker found the cache actor dead and no live one under its name: the driver restores it."""


class ReferenceCache:
    """A :class:`ReferenceTable` behind actor methods (plain class; :func:`get_reference_cache` makes the actor)."""

    def __init__(self, state: dict[str, Any] | None = None) -> None:
        """``state``: a :meth:`state_dict` to start from (a restored cache: loaded before any call reaches it)."""
        self.table = ReferenceTable()
        if state is not None:
            self.table.load_state_dict(state)
        self.updates = 0
        self.replacements = 0

    def update(self, record_key: int | str, candidate: Reference | None) -> bool:
        """Offer ``candidate`` for ``record_key``; True when it was stored (new entry or a replacement)."""
        had = record_key in self.table
        stored = self.table.update(record_key, candidate)
        if stored:
            self.updates += 1
            self.replacements += int(had)
        return stored

    def get(self, record_key: int | str) -> Reference | None:
        return self.table.get(record_key)

    def get_many(self, record_keys: list[int | str]) -> list[Reference | None]:
        return [self.table.get(k) for k in record_keys]

    def state_dict(self) -> dict[str, Any]:
        return self.table.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.table.load_state_dict(state)

    def stats(self) -> dict[str, float]:
        """``size``, ``mean_box_iou``, ``mean_accuracy``, ``updates`` and ``replacements`` (since start)."""
        return {**self.table.stats(), "updates": self.updates, "replacements": self.replacements}

    def ping(self) -> bool:
        return True


def get_reference_cache(
    namespace: str, name: str = CACHE_NAME, node_id: str | None = None, state: dict[str, Any] | None = None
):
    """The run's cache actor (created on first use, on node ``node_id`` when given, holding ``state``; later callers
    get the same one). No Ray restarts: a restarted actor would come back empty, which the pool's restore does
    better. ``state`` goes to the constructor, so a worker that finds the new actor by name never reads it empty."""
    import ray

    options: dict[str, Any] = {"name": name, "namespace": namespace, "get_if_exists": True}
    if node_id is not None:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node_id=node_id, soft=False)
    return ray.remote(num_cpus=0, max_restarts=0)(ReferenceCache).options(**options).remote(state)
