"""The producer of training batches: sampler draws -> generation streamed into reward scoring.

One :class:`BatchProducer` serves both loops of the trainer (slime's ``train.py`` / ``train_async.py`` pair:
the loops differ by the producer, not by a second trainer):

- ``trainer.max_staleness = 0`` (synchronous, the recipe's on-policy loop): :meth:`BatchProducer.get`
  produces step ``s``'s batch when the trainer asks for it; engines idle while the learner trains.
- ``max_staleness = k >= 1``: a background thread produces batches ahead of the learner, at most
  ``k + 1`` batches ahead (AReaL / SkyRL admission: batch ``s`` starts only once the policy reached version
  ``s - k - 1``), so engines keep generating while the learner trains and weight pushes happen while
  sequences are in flight (``RolloutWorker.wt_start``). A rollout's staleness is the learner's version
  when it trains on it minus the version it was submitted under (its oldest token's at the latest);
  admission keeps it <= k, and :meth:`get` checks again: a record with a stale group is dropped whole (both
  streams stay together), counted as ``rollout/dropped_stale`` and requeued into the next batch drawn.

Scheduling unit: the record. A batch's prompts keep a record's grounded and textual prompts adjacent, they
are generated and scored in the same batch (the textual group is judged once its grounded group has
updated the reference cache), and they reach the same training step.

Prompt prefetch: a batch is first *prepared* (drawn from the sampler, its images decoded and resized in
``data.image_workers`` threads, its prompts built) and then generated. While batch ``s`` generates, is scored
and trains, a helper thread prepares batch ``s + 1``, so image decoding is off the step's critical path
(``time/prompts_wait_s`` is what the step still waited for prompts, ``time/prompts_s`` what building them took).
With ``k >= 1`` a batch is prepared ahead only once it is admitted: records requeued meanwhile still go into the
next batch drawn.

Idle hook: ``on_idle`` goes into every generation, in both modes, and generation calls it while it waits on the
engines (no group finished for a while, or no engine serving). The trainer's hook heals the rollout fleet when its
learner group is idle and nothing pushes weights, and returns at once otherwise; so with ``k = 0`` healing happens
in the trainer's thread during generation, with ``k >= 1`` in the producer's thread while the trainer waits for a
batch (never during an update). Which thread calls it does not matter.

Unreadable images: a record whose image does not decode when its prompt is built is dropped by the record
table (all its streams; counted in ``data/bad_rows/<reason>``, named in a warning) and excluded from later draws
(``PairSampler.exclude``, part of the sampler state); the batch goes on without it (``data/dropped_records``), and
a batch that loses every record is drawn again.

Exact resume: :meth:`resume_state` is the sampler's state before the first batch the learner has not
trained on, plus the requeued records not yet trained on; batches prepared or produced ahead are simply produced
again after a resume (nothing trained twice, nothing skipped), a record excluded after that state was taken is
found again and dropped again the same way. The reference cache may already hold references from such batches
(scored ahead): they are real rollouts of the policy, so they stay.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from ivgr_dist.types import Prompt, Rollout

log = logging.getLogger(__name__)

__all__ = ["Batch", "BatchProducer", "ProducerError", "stale_records"]


class ProducerError(RuntimeError):
    """The producer thread failed; raised in the trainer with the original error chained."""


@dataclass
class Batch:
    """One step's scored groups, in batch order, and what produced them."""

    step: int
    prompts: list[Prompt]
    groups: list[list[Rollout]]
    metrics: dict[str, float] = field(default_factory=dict)
    """Generation (``rollout/*``, ``time/generate_s``), reward (``reward/*``, ``judge/*``) and data counters."""
    admitted_version: int = 0
    """The policy version when its generation started."""
    requeued: list[tuple[int, str]] = field(default_factory=list)
    """Items of this batch that were requeued from an earlier batch (counted, for exact resume)."""

    @property
    def rollouts(self) -> list[Rollout]:
        return [r for g in self.groups for r in g]


@dataclass
class _Prepared:
    """A batch drawn and its prompts built, not yet generated."""

    prompts: list[Prompt]
    requeued: list[tuple[int, str]]
    metrics: dict[str, float]


def stale_records(groups: list[list[Rollout]], version: int, max_staleness: int) -> set[int]:
    """Records (``original_idx``) with a group whose oldest version is more than ``max_staleness`` behind
    ``version`` (the policy the learner is about to update)."""
    return {
        g[0].prompt.original_idx for g in groups if g and version - min(r.weight_version for r in g) > max_staleness
    }


class BatchProducer:
    """Draws, generates and scores batches; inline (k = 0) or ahead in a thread (k >= 1)."""

    def __init__(
        self,
        data,
        rollouts,
        scorer,
        max_staleness: int,
        trace=None,
        seed_for: Callable[[int], int | None] | None = None,
        prefetch: bool = True,
        on_idle: Callable[[], object] | None = None,
    ):
        """``data``: the train ``DataPipeline``; ``rollouts``: the ``RolloutPool``; ``scorer``: a ``StreamScorer``;
        ``seed_for(step)``: the sampling seed of a step (``RolloutPool.sampling_seed``); ``trace``: a
        ``metrics.Tracer`` or None (generation and scoring record spans in it); ``prefetch``: prepare the next
        batch's prompts while this one generates; ``on_idle``: passed to every ``rollouts.generate``, which calls
        it while it waits on the engines (the trainer heals the fleet there; see "Idle hook" above)."""
        self.data, self.rollouts, self.scorer = data, rollouts, scorer
        self.k = max_staleness
        self.trace = trace
        self.on_idle = on_idle
        self.seed_for = seed_for or rollouts.sampling_seed
        self._cond = threading.Condition()
        self._ready: dict[int, Batch] = {}
        self._resume: dict[int, dict] = {}  # step -> sampler state before that step's batch was drawn
        self._requeue: list[tuple[int, str]] = []  # records to draw again (dropped as stale)
        self._pending_requeue: list[tuple[int, str]] = []  # requeued and not yet trained on
        self._version = 0
        self._trained_step = 0
        self._next_step = 1
        self._last_step = 0
        self._error: BaseException | None = None
        self._stop = False
        self._thread: threading.Thread | None = None
        self._prefetcher = ThreadPoolExecutor(1, thread_name_prefix="prompt-prefetch") if prefetch else None
        self._next: tuple[int, Future] | None = None  # (step, its preparation), touched by the producing thread only

    # ------------------------------------------------------------------------------- the trainer's side

    def start(self, first_step: int, last_step: int, version: int) -> None:
        """Begin at ``first_step`` (after a resume: the step after the checkpoint) with the policy at ``version``;
        with ``max_staleness >= 1`` the thread starts producing ahead now."""
        self._next_step, self._last_step = first_step, last_step
        self._trained_step, self._version = first_step - 1, version
        if self.k > 0 and first_step <= last_step:
            self._thread = threading.Thread(target=self._run, name="batch-producer", daemon=True)
            self._thread.start()

    def get(self, step: int) -> Batch:
        """Step ``step``'s batch (blocks until it is produced); stale records are dropped and requeued."""
        if self._thread is None:
            batch = self._produce(step)
        else:
            with self._cond:
                while step not in self._ready:
                    if self._error is not None:
                        raise ProducerError(
                            f"producing the batch of step {step} failed: {self._error}"
                        ) from self._error
                    if not self._thread.is_alive():
                        raise ProducerError(f"the producer thread stopped before step {step}'s batch")
                    self._cond.wait(timeout=1.0)
                batch = self._ready.pop(step)
        stale = stale_records(batch.groups, self._version, self.k)
        if stale:
            keep = [g for g in batch.groups if g[0].prompt.original_idx not in stale]
            dropped = [
                (g[0].prompt.original_idx, g[0].prompt.stream)
                for g in batch.groups
                if g[0].prompt.original_idx in stale
            ]
            log.warning(
                "step %d: %d record(s) generated more than trainer.max_staleness=%d versions ago dropped and requeued",
                step, len(stale), self.k,
            )  # fmt: skip
            with self._cond:
                self._requeue.extend(dropped)
                self._pending_requeue.extend(dropped)
            batch.groups = keep
        batch.metrics["rollout/dropped_stale"] = float(len(stale))
        return batch

    def trained(self, step: int, version: int, batch: Batch) -> None:
        """The learner trained on step ``step``'s batch and the engines hold ``version``: admit more."""
        with self._cond:
            self._trained_step, self._version = step, version
            done = set(batch.requeued)  # every copy: a record requeued twice was generated once
            self._pending_requeue = [x for x in self._pending_requeue if x not in done]
            self._resume.pop(step, None)
            self._cond.notify_all()

    def resume_state(self, step: int) -> dict:
        """What a checkpoint after step ``step`` must hold so that a resume draws exactly the batches not yet
        trained on: the sampler state before batch ``step + 1`` was drawn (now, if it was not), and the
        requeued records not yet trained on."""
        with self._cond:
            sampler = self._resume.get(step + 1)
            if sampler is None:
                sampler = self.data.sampler.state_dict()
            return {"sampler": sampler, "requeue": [list(x) for x in self._pending_requeue]}

    def load_state(self, state: dict) -> None:
        self.data.sampler.load_state_dict(state["sampler"])
        for i, why in self.data.sampler.excluded.items():  # dropped before the checkpoint: counted, not re-read
            self.data.records.drop(i, why, restored=True)
        self._requeue = [tuple(x) for x in state.get("requeue", [])]
        self._pending_requeue = list(self._requeue)

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._prefetcher is not None:
            self._prefetcher.shutdown(wait=False, cancel_futures=True)
        if self._thread is not None:
            # a thread inside a generation ends when the engines go (the trainer shuts them down next)
            self._thread.join(timeout=10.0)

    # -------------------------------------------------------------------------------------- producing

    def _run(self) -> None:
        try:
            for step in range(self._next_step, self._last_step + 1):
                with self._cond:
                    # admission: batch `step` may start once the policy is at version step - k - 1
                    while not self._stop and step > self._trained_step + self.k + 1:
                        self._cond.wait()
                    if self._stop:
                        return
                batch = self._produce(step)
                with self._cond:
                    self._ready[step] = batch
                    self._cond.notify_all()
        except BaseException as exc:  # noqa: BLE001 - handed to the trainer, which raises it
            log.exception("batch producer failed")
            with self._cond:
                self._error = exc
                self._cond.notify_all()

    def _prepare(self, step: int) -> _Prepared:
        """Draw step ``step``'s batch (requeued records first) and build its prompts; records dropped for an
        unreadable image are excluded from later draws, and a batch left with none is drawn again."""
        t0 = time.perf_counter()
        with self._cond:
            self._resume[step] = self.data.sampler.state_dict()
            requeued, self._requeue = list(dict.fromkeys(self._requeue)), []
            drawn = self.data.sampler.next_batch()
        # A requeued record the sampler draws again (a new epoch began) is generated once: two copies would
        # share a uid, hence a group seed, and train the same rollouts twice. It stays in `requeued`, so
        # training this batch still clears it from the resume state.
        fresh = set(drawn)
        items = [x for x in requeued if x not in fresh] + drawn
        dropped = 0
        while True:
            prompts = self.data.records.prompts(items)
            lost = sorted({i for i, _ in items} - {p.original_idx for p in prompts})
            dropped += len(lost)
            with self._cond:
                for i in lost:
                    self.data.sampler.exclude(i, self.data.records.dropped.get(i, "unreadable_image"))
                if prompts:
                    sampler_metrics = self.data.sampler.metrics()  # this batch's draws and exclusions
                    break
                items = self.data.sampler.next_batch()  # every record was dropped; they are excluded now
            fresh |= set(items)
        metrics = {
            **sampler_metrics,
            "data/dropped_records": float(dropped),
            "time/prompts_s": time.perf_counter() - t0,
            "rollout/requeued_records": float(len({i for i, _ in requeued})),
            "rollout/requeued_drawn_again": float(len({item[0] for item in requeued if item in fresh})),
        }
        return _Prepared(prompts, requeued, metrics)

    def _take_prepared(self, step: int) -> tuple[_Prepared, float]:
        """Step ``step``'s prepared batch (prefetched, or prepared now) and how long this waited for it."""
        t0 = time.perf_counter()
        ahead, self._next = self._next, None
        if ahead is not None and ahead[0] != step:
            raise RuntimeError(f"batch of step {ahead[0]} was prepared ahead, but step {step} came next")
        prepared = ahead[1].result() if ahead is not None else self._prepare(step)
        return prepared, time.perf_counter() - t0

    def _prefetch(self, step: int) -> None:
        """Start preparing step ``step``'s batch in the prefetch thread, when it is needed and (``k >= 1``)
        admitted: drawn earlier, records requeued by the trainer meanwhile would wait a batch longer."""
        if self._prefetcher is None or step > self._last_step:
            return
        with self._cond:
            if self._stop or (self.k > 0 and step > self._trained_step + self.k + 1):
                return
        self._next = (step, self._prefetcher.submit(self._prepare, step))

    def _produce(self, step: int) -> Batch:
        from ivgr_dist.rollout.pool import PoolStats

        prepared, waited = self._take_prepared(step)
        self._prefetch(step + 1)
        with self._cond:
            version = self._version
        prompts = prepared.prompts
        stats = PoolStats()
        timing = {"generate": 0.0}
        t0 = time.perf_counter()
        generated = self.rollouts.generate(
            prompts, stats=stats, seed=self.seed_for(step), trace=self.trace, on_idle=self.on_idle
        )
        groups = list(self.scorer.score_stream(_timed(generated, timing, t0), prompts, step, trace=self.trace))
        # Back to batch order: which groups share a mini-batch must not depend on which finished first.
        position = {p.uid: i for i, p in enumerate(prompts)}
        groups.sort(key=lambda g: position[g[0].prompt.uid])
        scored = time.perf_counter() - t0
        reward = self.scorer.metrics()
        metrics = {
            **stats.metrics(),
            **reward,
            "time/generate_s": timing["generate"],
            "time/reward_s": reward.get("reward/busy_s", 0.0),
            "reward/tail_s": scored - timing["generate"],
            "rollout/tokens_per_s": stats.tokens / max(timing["generate"], 1e-9),
            **self.data.records.metrics(),
            **prepared.metrics,
            "time/prompts_wait_s": waited,
        }
        return Batch(step, prompts, groups, metrics, admitted_version=version, requeued=prepared.requeued)


def _timed(groups: Iterator[list[Rollout]], timing: dict, t0: float) -> Iterator[list[Rollout]]:
    """Pass groups through, recording when the last one arrived (generation end; the consumer's scoring time
    between groups is not counted)."""
    for group in groups:
        timing["generate"] = time.perf_counter() - t0
        yield group
