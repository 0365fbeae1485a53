"""Reference reasoning for the consistency reward: which grounded rollout becomes the reference, and the cache.

The spec is ``docs/algorithm.md`` (3.2, "The reference and its cache"). Among this step's stream-A (grounded) rollouts of
one record, those with accuracy 1 and ``box_iou >= 0.3`` qualify; the one with the highest ``box_iou`` is the
candidate (ties: the earliest). A per-record cache keeps one reference across steps; the candidate replaces the
cached one if its accuracy is higher, or equal with a higher ``box_iou``. Stream B is scored against the cached
reference.

Pure Python, no Ray. :class:`ReferenceTable` is training state: ``state_dict()`` returns JSON-serialisable data
that ``load_state_dict`` restores exactly (the public recipe saves its cache from the wrong process, so its
checkpoints hold an empty cache; the caller of this module is responsible for saving it from the process that owns
the table).

Departure from the recipe: a rollout whose ``<think>`` text is empty does not qualify by default
(``require_think=True``): an empty reference would give the judge nothing to compare against. Training passes
``require_think=False`` with ``reward.recipe_exact=true``, the recipe's rule.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "MIN_REFERENCE_IOU",
    "STATE_VERSION",
    "Reference",
    "ReferenceTable",
    "select_candidate",
    "should_replace",
]

#: A grounded rollout needs at least this box_iou (and accuracy 1) to become a reference.
MIN_REFERENCE_IOU = 0.3
#: Version tag written by :meth:`ReferenceTable.state_dict`.
STATE_VERSION = 1

RecordKey = str | int


@dataclass
class Reference:
    """A grounded reasoning used as the consistency reference of one record."""

    think: str
    accuracy: float
    box_iou: float
    step: int
    rollout_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "think": self.think,
            "accuracy": self.accuracy,
            "box_iou": self.box_iou,
            "step": self.step,
            "rollout_id": self.rollout_id,
        }

    @classmethod
    def from_dict(cls, d: Any, where: str = "reference") -> Reference:
        """Build from :meth:`to_dict` output, raising ``ValueError`` that names ``where`` on malformed input."""
        if not isinstance(d, Mapping):
            raise ValueError(f"{where}: expected a dict, got {type(d).__name__}")
        expected = {"think", "accuracy", "box_iou", "step", "rollout_id"}
        missing = expected - d.keys()
        extra = set(d.keys()) - expected
        if missing or extra:
            raise ValueError(f"{where}: missing keys {sorted(missing)}, unexpected keys {sorted(map(str, extra))}")
        ref = cls(d["think"], d["accuracy"], d["box_iou"], d["step"], d["rollout_id"])
        _check_reference(ref, where)
        return ref


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_reference(ref: Reference, where: str = "reference") -> None:
    if not isinstance(ref.think, str):
        raise ValueError(f"{where}: think must be a str, got {type(ref.think).__name__}")
    if not _is_number(ref.accuracy):
        raise ValueError(f"{where}: accuracy must be a finite number, got {ref.accuracy!r}")
    if not _is_number(ref.box_iou):
        raise ValueError(f"{where}: box_iou must be a finite number, got {ref.box_iou!r}")
    if not isinstance(ref.step, int) or isinstance(ref.step, bool):
        raise ValueError(f"{where}: step must be an int, got {ref.step!r}")
    if ref.rollout_id is not None and not isinstance(ref.rollout_id, str):
        raise ValueError(f"{where}: rollout_id must be a str or None, got {ref.rollout_id!r}")


def _check_key(key: Any, where: str = "record key") -> None:
    if not isinstance(key, (str, int)) or isinstance(key, bool):
        raise ValueError(f"{where} must be a str or int, got {key!r} ({type(key).__name__})")


def _rollout_fields(r: Any) -> tuple[str, float, float, str | None]:
    """(think, accuracy, box_iou, rollout_id) of a tuple ``(think, acc, iou[, id])``, a mapping or an object."""
    if isinstance(r, (tuple, list)):
        if len(r) == 3:
            return r[0], r[1], r[2], None
        if len(r) == 4:
            return r[0], r[1], r[2], r[3]
        raise ValueError(f"rollout tuple must be (think, accuracy, box_iou[, rollout_id]), got {len(r)} items")
    if isinstance(r, Mapping):
        think = r["think"] if "think" in r else r["think_text"]
        return think, r["accuracy"], r["box_iou"], r.get("rollout_id")
    think = r.think if hasattr(r, "think") else r.think_text
    return think, r.accuracy, r.box_iou, getattr(r, "rollout_id", None)


def select_candidate(
    rollouts: Iterable[Any],
    min_iou: float = MIN_REFERENCE_IOU,
    step: int = 0,
    require_think: bool = True,
) -> Reference | None:
    """The reference candidate among this step's stream-A rollouts of ONE record, or ``None`` if none qualifies.

    Each rollout is a tuple ``(think_text, accuracy, box_iou[, rollout_id])``, a mapping or an object with those
    fields (``think`` or ``think_text``). Qualifies iff ``accuracy == 1``, ``box_iou >= min_iou`` (finite) and,
    with ``require_think``, the think text is not blank. The highest ``box_iou`` wins; ties go to the earliest.
    """
    best: Reference | None = None
    for r in rollouts:
        think, acc, box_iou, rollout_id = _rollout_fields(r)
        if acc != 1 or not _is_number(box_iou) or not box_iou >= min_iou:
            continue
        if require_think and not (isinstance(think, str) and think.strip()):
            continue
        if best is None or box_iou > best.box_iou:
            best = Reference(
                think=think,
                accuracy=float(acc),
                box_iou=float(box_iou),
                step=step,
                rollout_id=None if rollout_id is None else str(rollout_id),
            )
    return best


def should_replace(cached: Reference | None, candidate: Reference | None) -> bool:
    """True iff ``candidate`` should replace ``cached``: no cached one, higher accuracy, or equal and higher box_iou."""
    if candidate is None:
        return False
    if cached is None:
        return True
    if candidate.accuracy != cached.accuracy:
        return candidate.accuracy > cached.accuracy
    return candidate.box_iou > cached.box_iou


class ReferenceTable:
    """Per-record reference cache (``record_key -> Reference``), kept across steps and checkpointed."""

    def __init__(self) -> None:
        self._refs: dict[RecordKey, Reference] = {}

    def update(self, record_key: RecordKey, candidate: Reference | None) -> bool:
        """Store ``candidate`` for ``record_key`` if :func:`should_replace` says so; returns whether it did."""
        _check_key(record_key)
        if candidate is None:
            return False
        _check_reference(candidate, f"candidate for record {record_key!r}")
        if should_replace(self._refs.get(record_key), candidate):
            self._refs[record_key] = candidate
            return True
        return False

    def get(self, record_key: RecordKey) -> Reference | None:
        return self._refs.get(record_key)

    def __len__(self) -> int:
        return len(self._refs)

    def __contains__(self, record_key: object) -> bool:
        return record_key in self._refs

    def items(self):
        return self._refs.items()

    def stats(self) -> dict[str, float]:
        """``{"size", "mean_box_iou", "mean_accuracy"}`` (means are 0.0 for an empty table)."""
        n = len(self._refs)
        if n == 0:
            return {"size": 0, "mean_box_iou": 0.0, "mean_accuracy": 0.0}
        return {
            "size": n,
            "mean_box_iou": sum(r.box_iou for r in self._refs.values()) / n,
            "mean_accuracy": sum(r.accuracy for r in self._refs.values()) / n,
        }

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state: ``{"version": 1, "entries": [[key, reference_dict], ...]}``.

        Entries are a list of pairs (not a dict) so that int keys survive a JSON round trip as ints.
        """
        return {
            "version": STATE_VERSION,
            # list(): one atomic copy (the batch producer's thread may add references meanwhile)
            "entries": [[k, ref.to_dict()] for k, ref in list(self._refs.items())],
        }

    def load_state_dict(self, state: Any) -> None:
        """Replace the contents with ``state`` from :meth:`state_dict`; ``ValueError`` on malformed state.

        The whole state is validated before anything is replaced, so a failed load leaves the table unchanged.
        """
        if not isinstance(state, Mapping):
            raise ValueError(f"reference table state must be a dict, got {type(state).__name__}")
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"reference table state: unsupported version {state.get('version')!r}")
        entries = state.get("entries")
        if not isinstance(entries, list):
            raise ValueError(f"reference table state: 'entries' must be a list, got {type(entries).__name__}")
        refs: dict[RecordKey, Reference] = {}
        for i, entry in enumerate(entries):
            if not isinstance(entry, (list, tuple)) or len(entry) != 2:
                raise ValueError(f"reference table state: entry {i} must be a [key, reference] pair, got {entry!r}")
            key, ref_d = entry
            _check_key(key, f"reference table state: key of entry {i}")
            if key in refs:
                raise ValueError(f"reference table state: duplicate key {key!r} (entry {i})")
            refs[key] = Reference.from_dict(ref_d, f"reference table state: entry {i} (key {key!r})")
        self._refs = refs
