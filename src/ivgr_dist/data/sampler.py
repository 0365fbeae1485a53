"""Batches of prompts that keep each grounded/textual pair together, with exact resume.

A batch of ``batch_size`` prompts holds ``n_pairs = round(paired_ratio * batch_size / 2)`` pairs
(rounding half up, at most ``batch_size // 2``), each pair written as ``(i, "grounded"), (i, "textual")``
next to each other, followed by ``batch_size - 2 * n_pairs`` singles ``(j, "single")``.
``pair_streams`` (``data.streams``) may name one stream only, for the single-stream ablations: then
each paired record gives one prompt and the same formulas hold with 1 in place of 2.
If one pool is empty the other fills the batch: all singles, or all pairs, which needs an even
``batch_size`` (an odd one with no singles is rejected at construction).

Each pool walks through its records epoch by epoch. The order of epoch ``e`` is a permutation
seeded by ``(seed, pool, e)`` (identity when ``shuffle`` is off), so the whole state is
``(epoch, cursor)`` per pool, and :meth:`PairSampler.state_dict` / :meth:`load_state_dict` resume
exactly, mid-epoch or at a boundary. A batch that crosses an epoch boundary takes the rest of the
old epoch, then continues in the new epoch's order; records already in this batch (drawn at the end of
the old epoch) are skipped in the new one, so a record never appears twice in one batch and every
``<original_idx>:<stream>`` uid of a batch is unique. Each pool must therefore hold at least as many
records as one batch draws from it.

Records found unusable after load (an image that does not decode when its prompt is built) are
:meth:`PairSampler.exclude`-d: later draws skip them. The pools and their permutations stay as they were (the
fingerprint checked on restore is of the records at load), and the excluded records are part of the state, so a
state taken before an exclusion replays the draws that found it and a state taken after keeps the record out.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence

import numpy as np

__all__ = ["PairSampler"]

_POOLS = ("paired", "single")
_STATE_VERSION = 1


class _Pool:
    """One pool's epoch-wise order, cursor and epoch counter."""

    def __init__(self, ids: Sequence[int], seed: int, pool_id: int, shuffle: bool):
        self.ids = np.asarray(list(ids), dtype=np.int64)
        self.seed, self.pool_id, self.shuffle = seed, pool_id, shuffle
        self.epoch = 0
        self.cursor = 0
        self._order_epoch = -1
        self._order = self.ids
        self._members: set[int] | None = None

    def order(self) -> np.ndarray:
        if self._order_epoch != self.epoch:
            if self.shuffle:
                rng = np.random.default_rng([self.seed, self.pool_id, self.epoch])
                self._order = self.ids[rng.permutation(len(self.ids))]
            else:
                self._order = self.ids
            self._order_epoch = self.epoch
        return self._order

    def draw(self, k: int, excluded) -> list[int]:
        """The next ``k`` distinct records not in ``excluded``, crossing into the next epoch when this one runs
        out (the caller keeps at least ``k`` records drawable)."""
        out: list[int] = []
        taken: set[int] = set()
        while len(out) < k:
            order = self.order()
            if self.cursor >= len(order):
                self.epoch += 1
                self.cursor = 0
                continue
            item = int(order[self.cursor])
            self.cursor += 1
            if item in taken or item in excluded:  # taken: drawn at the end of the previous epoch, in this batch
                continue
            taken.add(item)
            out.append(item)
        order = self.order()
        while self.cursor < len(order) and int(order[self.cursor]) in excluded:  # so an epoch's end is seen here
            self.cursor += 1
        if self.cursor >= len(self.ids):  # an epoch that ended exactly here counts as complete
            self.epoch += 1
            self.cursor = 0
        return out

    def fingerprint(self) -> int:
        return zlib.crc32(self.ids.tobytes())

    def members(self) -> set[int]:
        if self._members is None:
            self._members = set(self.ids.tolist())
        return self._members


class PairSampler:
    """Draws ``(original_idx, stream)`` batches: ``n_pairs`` adjacent A/B pairs, then singles.

    ``paired_ids`` / ``single_ids``: records of each kind (e.g. ``RecordTable.paired_ids``). Records
    must be unique within a pool. ``seed`` must be >= 0.
    """

    def __init__(
        self,
        paired_ids: Sequence[int],
        single_ids: Sequence[int],
        batch_size: int,
        paired_ratio: float,
        seed: int,
        shuffle: bool = True,
        pair_streams: Sequence[str] = ("grounded", "textual"),
    ):
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r}: must be an integer >= 1")
        if not (isinstance(paired_ratio, (int, float)) and 0.0 <= paired_ratio <= 1.0):
            raise ValueError(f"paired_ratio={paired_ratio!r}: must be in [0, 1]")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed={seed!r}: must be an integer >= 0")
        paired_ids, single_ids = list(paired_ids), list(single_ids)
        for name, ids in (("paired_ids", paired_ids), ("single_ids", single_ids)):
            if len(set(ids)) != len(ids):
                raise ValueError(f"{name}: has repeated records; each record must appear once in its pool")
        if not paired_ids and not single_ids:
            raise ValueError("paired_ids and single_ids are both empty: nothing to sample")
        pair_streams = list(pair_streams)
        if (
            not pair_streams
            or len(set(pair_streams)) != len(pair_streams)
            or set(pair_streams) - {"grounded", "textual"}
        ):
            raise ValueError(f"pair_streams={pair_streams!r}: must be grounded and/or textual, each once")
        self.pair_streams = pair_streams
        """Prompts each paired record becomes (both streams, or one of them for single-stream ablations)."""
        k = len(pair_streams)
        self.batch_size = int(batch_size)
        self.paired_ratio = float(paired_ratio)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)

        n_pairs = min(self.batch_size // k, int(math.floor(self.paired_ratio * self.batch_size / k + 0.5)))
        if not single_ids:
            if self.batch_size % k:
                raise ValueError(
                    f"batch_size={batch_size!r}: must be even when there are no single records "
                    "(a batch of A/B pairs only has an even size)"
                )
            n_pairs = self.batch_size // k
        elif not paired_ids:
            n_pairs = 0
        self.n_pairs = n_pairs
        """Paired records per batch (A/B pairs, or one stream each with a single pair stream)."""
        self.n_singles = self.batch_size - k * n_pairs
        """``single`` prompts per batch."""
        self._pools = {
            "paired": _Pool(paired_ids, self.seed, 0, self.shuffle),
            "single": _Pool(single_ids, self.seed, 1, self.shuffle),
        }
        for name, need in (("paired", self.n_pairs), ("single", self.n_singles)):
            have = len(self._pools[name].ids)
            if have < need:
                raise ValueError(
                    f"{name} pool has {have} record(s) but each batch draws {need} (batch_size={self.batch_size}, "
                    f"paired_ratio={self.paired_ratio}): a record would repeat within a batch"
                )
        self.batches = 0
        """Batches drawn so far."""
        self.excluded: dict[int, str] = {}
        """Records later draws skip (``original_idx`` -> why, e.g. ``unreadable_image``); see :meth:`exclude`."""

    def next_batch(self) -> list[tuple[int, str]]:
        """The next ``batch_size`` items: pairs first (each grounded then textual), then singles."""
        out: list[tuple[int, str]] = []
        if self.n_pairs:
            for i in self._pools["paired"].draw(self.n_pairs, self.excluded):
                out += [(i, stream) for stream in self.pair_streams]
        if self.n_singles:
            out += [(i, "single") for i in self._pools["single"].draw(self.n_singles, self.excluded)]
        self.batches += 1
        return out

    def exclude(self, original_idx: int, reason: str) -> None:
        """Keep a record out of every later draw (a record found unusable after load); ``reason`` is kept for the
        state and the logs. ``ValueError`` when its pool would then hold fewer records than a batch draws."""
        i = int(original_idx)
        pool = next((name for name, p in self._pools.items() if i in p.members()), None)
        if pool is None:
            raise ValueError(f"original_idx={original_idx!r}: not a record of this sampler")
        self._check_drawable(pool, self.excluded.keys() | {i})
        self.excluded[i] = str(reason)

    def _check_drawable(self, name: str, excluded) -> None:
        p, need = self._pools[name], self.n_pairs if name == "paired" else self.n_singles
        left = len(p.members() - set(excluded))
        if need and left < need:
            raise ValueError(
                f"{name} pool: {len(p.ids) - left} of {len(p.ids)} records excluded (unusable after load), {left} "
                f"left, but each batch draws {need}: too few usable records to fill a batch"
            )

    def __iter__(self):
        while True:
            yield self.next_batch()

    # -------------------------------------------------------------------------------------- state

    def state_dict(self) -> dict:
        """JSON-serialisable position: per pool ``(epoch, cursor)`` plus what must match on restore."""
        return {
            "version": _STATE_VERSION,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "batch_size": self.batch_size,
            "paired_ratio": self.paired_ratio,
            "pair_streams": self.pair_streams,
            "batches": self.batches,
            "excluded": [[i, why] for i, why in sorted(self.excluded.items())],
            "pools": {
                name: {"epoch": p.epoch, "cursor": p.cursor, "size": len(p.ids), "fingerprint": p.fingerprint()}
                for name, p in self._pools.items()
            },
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume from :meth:`state_dict`; ``ValueError`` when it belongs to another data set or setting."""
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"sampler state version={state.get('version')!r}: must be {_STATE_VERSION}")
        for key in ("seed", "shuffle", "batch_size", "paired_ratio", "pair_streams"):
            saved = state.get(key, ["grounded", "textual"] if key == "pair_streams" else None)  # older states: both
            if saved != getattr(self, key):
                raise ValueError(
                    f"sampler state {key}={saved!r}: must equal this sampler's {key}={getattr(self, key)!r}"
                )
        for name in _POOLS:
            saved, pool = state["pools"][name], self._pools[name]
            if saved["size"] != len(pool.ids) or saved["fingerprint"] != pool.fingerprint():
                raise ValueError(
                    f"sampler state pool {name!r} (size={saved['size']}, fingerprint={saved['fingerprint']}): must "
                    f"match this sampler's records (size={len(pool.ids)}, fingerprint={pool.fingerprint()})"
                )
            epoch, cursor = int(saved["epoch"]), int(saved["cursor"])
            if epoch < 0 or not 0 <= cursor <= len(pool.ids):
                raise ValueError(
                    f"sampler state pool {name!r} epoch={epoch}, cursor={cursor}: need epoch >= 0 and "
                    f"0 <= cursor <= {len(pool.ids)}"
                )
        excluded = {int(i): str(why) for i, why in state.get("excluded", [])}  # older states: none
        unknown = set(excluded) - self._pools["paired"].members() - self._pools["single"].members()
        if unknown:
            raise ValueError(f"sampler state excluded={sorted(unknown)[:5]}: not records of this sampler")
        for name in _POOLS:
            self._check_drawable(name, excluded)
        for name in _POOLS:
            saved, pool = state["pools"][name], self._pools[name]
            pool.epoch, pool.cursor = int(saved["epoch"]), int(saved["cursor"])
        self.batches = int(state.get("batches", 0))
        self.excluded = excluded

    def metrics(self) -> dict[str, float]:
        """Epoch counters for logging (``data/epoch/<pool>`` whole epochs, ``data/epoch_progress/<pool>``)."""
        out: dict[str, float] = {"data/batches": self.batches, "data/excluded_records": len(self.excluded)}
        for name, p in self._pools.items():
            if len(p.ids):
                out[f"data/epoch/{name}"] = p.epoch
                out[f"data/epoch_progress/{name}"] = p.epoch + p.cursor / len(p.ids)
        return out
