"""Scoring finished groups: the interface the driver uses, the scoring logic, and the in-process scorer.

``Scorer`` is what the driver sees: groups go in as they finish generating, scored groups come
out, pair-aware (a record's textual group is judged only once its grounded group of this step has
been scored and the reference table updated). Two implementations share everything below:

- :class:`InProcessScorer` (``reward.num_workers=0``): the judge runs on an asyncio loop in a
  background thread of the driver; the reference table lives in the driver.
- :class:`~ivgr_dist.reward.pool.RewardPool`: Ray reward workers; the table lives in the
  :class:`~ivgr_dist.reward.reference_cache.ReferenceCache` actor.

Scoring one group (:func:`score_job`, the same code in both): rule rewards
(:mod:`ivgr_dist.reward.rules`; math-verify, the one rule that can run for minutes, in a bounded
:class:`~ivgr_dist.reward.rule_pool.RulePool`: an answer past ``reward.rule_timeout_s`` counts in
``reward/rule_timeouts`` and is a failed request for ``on_failure``), then ONE batched judge call for
the group's questions:

- consistency (stream B): a ``consistency`` request per rollout against the cached reference
  (fallback ``reward.judge.fallback_consistency``); no reference -> 0 and no judge call;
- accuracy the rules cannot decide (``rules.rule_accuracy`` -> None: free-form mismatches, math
  that math-verify rejects): an ``equivalence`` request (fallback 0.0).

A request the judge fails (every try, or the judge raised) is scored by ``reward.judge.on_failure``
(:func:`_mask_failures`): ``zero`` keeps the fallback score; ``mask`` leaves the component out: a failed
consistency removes consistency from every rollout of the group, a failed accuracy excludes that rollout
from the group's advantage (``GroupResult.excluded`` -> ``Rollout.excluded``).

Groups travel as small :class:`GroupJob` records (no images); results come back as
:class:`GroupResult` and are applied to the driver's ``Rollout`` objects. Driver-side scheduling
(:class:`StreamScorer`) never loses a group: an executor that dies gets its group resubmitted
(``reward/rescored``); a group past its deadline (``reward/group_timeouts``) is resubmitted when the
executor could replace what held it (the pool kills a stuck worker), else scored rules-only in the
driver, as after an executor error (every judge question it held counts in ``judge/failures`` and is
a failed request for ``on_failure``). The driver's rules-only scoring runs math-verify in the
scorer's own ``rule_pool``, never in the driver's threads.

A ground truth longer than ``algorithm.max_answer_chars`` is bad data: every rollout of its group
scores accuracy 0 without a judge, counted in ``reward/long_ground_truths`` and logged.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from ivgr_dist.config import AlgorithmConfig, JudgeConfig, RewardConfig
from ivgr_dist.reward import rules
from ivgr_dist.reward.judge import JudgeRequest, JudgeResult, check_judge, make_judge
from ivgr_dist.reward.reference import Reference, ReferenceTable, select_candidate
from ivgr_dist.reward.rule_pool import RulePool
from ivgr_dist.types import Prompt, Rollout

log = logging.getLogger(__name__)

JUDGE_COUNTERS = ("calls", "retries", "timeouts", "failures", "parse_failures", "requests")
MASK_COUNTERS = ("judge_masked_rollouts", "judge_masked_groups", "judge_excluded_rollouts")
"""``reward/<name>``: what ``reward.judge.on_failure=mask`` left out this step (0 with ``zero``)."""


class Scorer(Protocol):
    """What the driver needs from reward computation (in-process, or a pool of Ray actors)."""

    def score_stream(
        self, groups: Iterable[list[Rollout]], prompts: Sequence[Prompt], step: int, trace=None
    ) -> Iterator[list[Rollout]]:
        """Consume the groups of ``prompts`` as they finish; yield them scored (``rewards``, ``reward`` set).
        ``trace``: a ``metrics.Tracer`` (``trainer.trace``) where each group's scoring becomes a span, or None."""
        ...

    def metrics(self) -> dict[str, float]: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...

    def close(self) -> None: ...


# ------------------------------------------------------------------------------------- scoring logic


@dataclass
class GroupJob:
    """One group to score, without images: what a reward worker needs."""

    key: str
    stream: str
    record_key: int
    question: str
    answer: str
    question_type: str
    target_boxes: list[list[float]]
    context: dict[str, Any]
    responses: list[str]
    step: int


@dataclass
class GroupResult:
    """Per-rollout reward components and totals of one group, and what scoring it cost."""

    key: str
    rewards: list[dict[str, float]]
    totals: list[float]
    candidate: Reference | None = None
    """Grounded groups: this step's reference candidate (``select_candidate``)."""
    reference_updated: bool | None = None
    """None: the caller still has to offer ``candidate`` to the reference table; else whether it replaced."""
    counts: dict[str, float] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)
    busy_s: float = 0.0
    reference: str | None = None
    """Textual groups: the reference reasoning the consistency judge compared against (kept on each rollout)."""
    excluded: list[bool] = field(default_factory=list)
    """Per rollout: left out of the group's advantage (``on_failure=mask``, its judged accuracy failed); empty:
    none."""
    judge_error: str = ""
    """The kind of the group's last failed judge request (``JudgeResult.error``), for the failure-rate stop."""


def job_from_group(group: list[Rollout], step: int) -> GroupJob:
    p = group[0].prompt
    objects = p.extra.get("objects") if p.extra else None
    return GroupJob(
        key=p.uid,
        stream=p.stream,
        record_key=p.original_idx,
        question=p.question,
        answer=p.answer,
        question_type=p.question_type,
        target_boxes=[list(b) for b in p.target_boxes],
        context={"objects": objects} if objects is not None else {},
        responses=[r.response_text for r in group],
        step=step,
    )


def apply_result(group: list[Rollout], result: GroupResult) -> None:
    excluded = result.excluded or [False] * len(group)
    for r, rewards, total, out in zip(group, result.rewards, result.totals, excluded, strict=True):
        r.rewards, r.reward, r.excluded = dict(rewards), float(total), bool(out)
        r.consistency_reference = result.reference


class FallbackJudge:
    """Answers every request with its fallback, counted as a failure: the rules-only path."""

    async def score(self, requests: list[JudgeRequest]) -> list[JudgeResult]:
        error = "no judge answer (a reward worker error, a lost worker or the group deadline)"
        return [JudgeResult(score=r.fallback, failed=True, error=error) for r in requests]

    async def close(self) -> None:
        return None


def _mask_failures(
    stream: str, rewards: list[dict[str, float]], failed: list[set[str]], counts: dict[str, float]
) -> list[bool]:
    """``reward.judge.on_failure=mask``: leave the components the judge failed on out of ``rewards`` (in place)
    and return which rollouts are excluded from the group's advantage.

    - accuracy failed: the rollout's reward is unknown at its core, so the rollout is excluded (GRPO compares it
      with nothing; advantage 0); its other components stay for the logs;
    - consistency failed for a rollout that is not excluded: consistency is removed from EVERY rollout of the
      group, so the group is still compared on one reward (format + accuracy) for all of its rollouts.

    Counts ``judge_masked_rollouts`` (rollouts with a failed request), ``judge_masked_groups`` (1 when there is
    one) and ``judge_excluded_rollouts``."""
    excluded = ["accuracy" in f for f in failed]
    for r, f in zip(rewards, failed, strict=True):
        for name in f:
            r.pop(name, None)
    if stream == "textual" and any("consistency" in f and not x for f, x in zip(failed, excluded, strict=True)):
        for r in rewards:
            r.pop("consistency", None)
    masked = sum(bool(f) for f in failed)
    counts["judge_masked_rollouts"] += masked
    counts["judge_masked_groups"] += float(masked > 0)
    counts["judge_excluded_rollouts"] += sum(excluded)
    return excluded


async def score_job(
    job: GroupJob,
    judge,
    algo: AlgorithmConfig,
    fallback_consistency: float,
    reference: Reference | None,
    recipe_exact: bool = False,
    *,
    on_failure: str,
    rule_pool: RulePool,
) -> GroupResult:
    """Rule rewards + one batched judge call for ``job``; never raises for judge faults.

    ``recipe_exact`` (``reward.recipe_exact``): the public recipe's box rules (``rules.grounded_box_rewards(...,
    recipe_exact=True)``) and its reference rule (a blank ``<think>`` does not disqualify a candidate).
    ``on_failure`` (``reward.judge.on_failure``): ``zero`` scores a failed request with its fallback, ``mask``
    leaves the component out (:func:`_mask_failures`). ``rule_pool``: where math-verify runs, the group's math
    answers in one call (a worker thread waits on it, not the event loop); an answer past ``reward.rule_timeout_s``
    counts in ``reward/rule_timeouts`` and its accuracy is a failed request for ``on_failure``.
    """
    if on_failure not in ("zero", "mask"):
        raise ValueError(f"on_failure={on_failure!r}: must be 'zero' or 'mask'")
    t0 = time.perf_counter()
    counts: dict[str, float] = defaultdict(float)
    max_chars = algo.max_answer_chars
    answers = [rules.extract_answer(text) for text in job.responses]
    accuracy = [rules.rule_accuracy(a, job.answer, job.question_type, max_chars, math_verify=False) for a in answers]
    failed: list[set[str]] = [set() for _ in job.responses]  # per rollout: components whose request failed
    if rules.answer_too_long(job.answer, max_chars):  # bad data: rule_accuracy scored every rollout 0, no judge
        counts["long_ground_truths"] += 1
        why = "accuracy 0 for every rollout (reward/long_ground_truths)"
        log.warning("group %s: its ground truth has %d characters, over algorithm.max_answer_chars=%d; %s", job.key,
                    len(job.answer.strip()), max_chars, why)  # fmt: skip
    math_at = [i for i, acc in enumerate(accuracy) if acc is None and rules.question_kind(job.question_type) == "math"]
    if math_at:
        pairs = [(answers[i].strip(), job.answer.strip()) for i in math_at]
        for i, verdict in zip(math_at, await asyncio.to_thread(rule_pool.math_match, pairs), strict=True):
            if verdict is None:  # past reward.rule_timeout_s: unknown, as a failed judge request
                counts["rule_timeouts"] += 1
                accuracy[i] = 0.0
                failed[i].add("accuracy")
            elif verdict == 1.0:
                accuracy[i] = 1.0  # else None: the judge decides, as before
    rewards: list[dict[str, float]] = []
    requests: list[tuple[int, str, JudgeRequest]] = []  # (rollout index, reward key, request)
    for i, text in enumerate(job.responses):
        out = {"format": rules.format_reward(text)}
        acc = accuracy[i]
        if acc is None:
            req = JudgeRequest("equivalence", job.question, answers[i] or "", job.answer, 0.0, job.context, job.key)
            requests.append((i, "accuracy", req))
            acc = 0.0
        out["accuracy"] = acc
        if job.stream == "grounded":
            out["box_valid"], out["box_iou"] = rules.grounded_box_rewards(
                text, job.target_boxes, dup_iou=algo.dup_box_iou, recipe_exact=recipe_exact
            )
        elif job.stream == "textual" and algo.consistency_weight == 0:
            counts["consistency_off"] += 1  # algorithm.consistency_weight=0: no judge call, no component
        elif job.stream == "textual":
            out["consistency"] = 0.0
            if reference is None:
                counts["consistency_no_reference"] += 1
            else:
                think = rules.think_text(text)
                req = JudgeRequest(
                    "consistency", job.question, think, reference.think, fallback_consistency, job.context, job.key
                )
                requests.append((i, "consistency", req))
        rewards.append(out)
    latencies: list[float] = []
    judge_error = ""
    if requests:
        try:
            results = await judge.score([q for _, _, q in requests])
            if len(results) != len(requests):
                raise RuntimeError(f"judge returned {len(results)} results for {len(requests)} requests")
        except Exception as exc:  # noqa: BLE001 - a judge must not raise; if one does, its questions fail
            log.warning("judge raised on group %s (%s); its questions count as failed", job.key, exc)
            error = f"the judge raised {type(exc).__name__}"
            results = [JudgeResult(score=q.fallback, failed=True, error=error) for _, _, q in requests]
        for (i, name, _), res in zip(requests, results, strict=True):
            rewards[i][name] = float(res.score)
            counts["judge/calls"] += res.calls
            counts["judge/retries"] += res.retries
            counts["judge/timeouts"] += res.timeouts
            counts["judge/parse_failures"] += res.parse_failures
            counts["judge/failures"] += float(res.failed)
            counts["judge/requests"] += 1
            if res.failed:
                failed[i].add(name)
                judge_error = res.error or "unknown"
            else:
                latencies.append(res.latency_s)
    excluded = _mask_failures(job.stream, rewards, failed, counts) if on_failure == "mask" else []
    # A component left out counts as absent from the sum (the sums are plain additions of the components).
    if job.stream == "grounded":
        totals = [
            rules.grounded_overall(r["format"], r["box_valid"], r["box_iou"], r.get("accuracy", 0.0)) for r in rewards
        ]
        # An unknown accuracy is not 1: an excluded rollout never becomes the reference.
        candidate = select_candidate(
            [(rules.think_text(t), r.get("accuracy", 0.0), r["box_iou"], f"{job.key}:{i}") for i, (t, r) in
             enumerate(zip(job.responses, rewards, strict=True))],
            min_iou=algo.ref_min_iou,
            step=job.step,
            require_think=not recipe_exact,
        )  # fmt: skip
    elif job.stream == "textual":
        totals = [
            rules.textual_overall(
                r["format"], r.get("accuracy", 0.0), r.get("consistency", 0.0), algo.consistency_weight
            )
            for r in rewards
        ]
        candidate = None
    else:
        totals = [
            rules.single_overall(r["format"], r.get("accuracy", 0.0), algo.single_accuracy_weight) for r in rewards
        ]
        candidate = None
    used = reference.think if job.stream == "textual" and reference is not None else None
    busy = time.perf_counter() - t0
    return GroupResult(
        job.key, rewards, totals, candidate, None, dict(counts), latencies, busy, used, excluded, judge_error
    )


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


# ------------------------------------------------------------------------------ driver-side schedule


@dataclass
class _Entry:
    group: list[Rollout]
    job: GroupJob
    deadline: float
    attempts: int = 1
    submitted: float = 0.0
    track: str = "reward (driver)"


class StreamScorer:
    """Pair-aware streaming over an executor (subclasses: submit / wait / take / references)."""

    max_attempts = 3
    """Times a group is submitted before the driver scores it rules-only."""
    last_judge_error: str | None = None
    """The kind of the last failed judge request scored (``GroupResult.judge_error``), for the failure-rate stop."""

    def __init__(
        self,
        algo: AlgorithmConfig,
        judge_cfg: JudgeConfig,
        recipe_exact: bool = False,
        rule_timeout_s: float = RewardConfig.rule_timeout_s,
    ):
        self.algo, self.judge_cfg = algo, judge_cfg
        self.recipe_exact = bool(recipe_exact)  # reward.recipe_exact, passed to every score_job
        # math-verify of the driver's own scoring (in-process scorer, rules-only fallbacks); processes start on use
        self.rule_pool = RulePool(rule_timeout_s, max_chars=algo.max_answer_chars)
        # A group's judge questions run concurrently; past this the executor is asked to let go of it (``_abandon``:
        # the pool replaces a worker that no longer answers and scores the group again) or the driver scores it
        # rules-only.
        self.group_deadline_s = max(120.0, 4.0 * judge_cfg.timeout_s * (judge_cfg.max_retries + 1))
        self._counts: dict[str, float] = defaultdict(float)
        self._latencies: list[float] = []

    # executor hooks -----------------------------------------------------------------------------
    def _submit(self, job: GroupJob) -> Any:
        raise NotImplementedError

    def _wait(self, handles: list, timeout: float) -> list:
        raise NotImplementedError

    def _take(self, handle) -> tuple[str, GroupResult | None]:
        raise NotImplementedError

    def _abandon(self, handle) -> bool:
        """Stop waiting for a group past its deadline. True: the executor replaced whatever held the group, so
        submitting it again can succeed; False: score it rules-only in the driver."""
        return False

    def _reference(self, record_key: int) -> Reference | None:
        raise NotImplementedError

    def _offer_reference(self, record_key: int, candidate: Reference) -> bool:
        raise NotImplementedError

    def _cache_stats(self) -> dict[str, float]:
        raise NotImplementedError

    # the stream ---------------------------------------------------------------------------------
    def score_stream(
        self, groups: Iterable[list[Rollout]], prompts: Sequence[Prompt], step: int, trace=None
    ) -> Iterator[list[Rollout]]:
        """Submit each group as it arrives; B waits for its A of this batch; yield groups as they are scored.
        ``trace``: see :class:`Scorer`."""
        self._trace = trace
        self._due = {p.original_idx for p in prompts if p.stream == "grounded"}  # grounded not yet scored
        self._arrived: set[int] = set()
        self._waiting: dict[int, list[list[Rollout]]] = defaultdict(list)
        self._pending: dict[Any, _Entry] = {}
        self._step = step
        for group in groups:
            if not group:
                continue
            idx, stream = group[0].prompt.original_idx, group[0].prompt.stream
            if stream == "textual" and idx in self._due:
                self._waiting[idx].append(group)
            else:
                if stream == "grounded":
                    self._arrived.add(idx)
                self._start(group)
            yield from self._collect(0.0)
        for idx in [i for i in self._waiting if i not in self._arrived]:  # partner never generated
            for group in self._waiting.pop(idx):
                self._counts["textual_without_partner"] += 1
                self._start(group)
        while self._pending:
            yield from self._collect(0.5)

    def _start(self, group: list[Rollout], job: GroupJob | None = None, attempts: int = 1) -> None:
        job = job or job_from_group(group, self._step)
        handle = self._submit(job)
        entry = _Entry(group, job, time.monotonic() + self.group_deadline_s, attempts, time.perf_counter())
        entry.track = self._track(handle)
        self._pending[handle] = entry

    def _collect(self, timeout: float) -> Iterator[list[Rollout]]:
        if not self._pending:
            return
        ready = self._wait(list(self._pending), timeout)
        for handle in ready:
            entry = self._pending.pop(handle)
            kind, result = self._take(handle)
            if kind == "retry" and entry.attempts < self.max_attempts:
                self._counts["rescored"] += 1
                self._start(entry.group, entry.job, entry.attempts + 1)
                continue
            if result is None:
                self._counts["worker_errors" if kind == "fallback" else "retries_exhausted"] += 1
                result = self._fallback(entry.job)
            yield from self._finish(entry, result)
        now = time.monotonic()
        for handle in [h for h, e in self._pending.items() if now > e.deadline]:
            entry = self._pending.pop(handle)
            self._counts["group_timeouts"] += 1
            if self._abandon(handle) and entry.attempts < self.max_attempts:
                log.warning("reward group %s passed its %.0f s deadline; its worker was replaced, scoring it again",
                            entry.job.key, self.group_deadline_s)  # fmt: skip
                self._counts["rescored"] += 1
                self._start(entry.group, entry.job, entry.attempts + 1)
                continue
            log.warning("reward group %s passed its %.0f s deadline; scoring it rules-only", entry.job.key,
                        self.group_deadline_s)  # fmt: skip
            yield from self._finish(entry, self._fallback(entry.job))

    def _fallback(self, job: GroupJob) -> GroupResult:
        """Rules-only score in the driver (this thread); math-verify still runs in the bounded ``rule_pool``."""
        ref = self._reference(job.record_key) if job.stream == "textual" else None
        return asyncio.run(self._score_job(job, FallbackJudge(), ref))

    def _score_job(self, job: GroupJob, judge, reference: Reference | None):
        """:func:`score_job` of ``job`` with this scorer's settings (a coroutine)."""
        cfg = self.judge_cfg
        return score_job(
            job,
            judge,
            self.algo,
            cfg.fallback_consistency,
            reference,
            self.recipe_exact,
            on_failure=cfg.on_failure,
            rule_pool=self.rule_pool,
        )

    def _track(self, handle) -> str:
        """The trace track of a submitted group (the pool names its worker)."""
        return "reward (driver)"

    def _finish(self, entry: _Entry, result: GroupResult) -> Iterator[list[Rollout]]:
        if self._trace is not None:
            self._trace.span(entry.track, entry.job.key, entry.submitted, time.perf_counter())
        apply_result(entry.group, result)
        if result.judge_error:
            self.last_judge_error = result.judge_error
        for k, v in result.counts.items():
            self._counts[k] += v
        self._latencies.extend(result.latencies)
        self._counts["busy_s"] += result.busy_s
        if entry.job.stream == "grounded":
            updated = result.reference_updated
            if updated is None and result.candidate is not None:
                updated = self._offer_reference(entry.job.record_key, result.candidate)
            self._counts["reference_updates"] += float(bool(updated))
            idx = entry.job.record_key
            self._due.discard(idx)
            for group in self._waiting.pop(idx, []):
                self._start(group)
        yield entry.group

    # metrics and state ---------------------------------------------------------------------------
    def metrics(self) -> dict[str, float]:
        out = {f"judge/{k}": 0.0 for k in JUDGE_COUNTERS}
        out.update({f"reward/{k}": 0.0 for k in MASK_COUNTERS})
        for k, v in self._counts.items():
            out[k if k.startswith("judge/") else f"reward/{k}"] = v
        out["judge/latency_p50_s"] = _percentile(self._latencies, 0.5)
        out["judge/latency_p99_s"] = _percentile(self._latencies, 0.99)
        try:
            stats = self._cache_stats()
            out["refcache/size"] = float(stats["size"])
            out["refcache/mean_box_iou"] = float(stats["mean_box_iou"])
        except Exception as exc:  # noqa: BLE001 - metrics must not stop training
            log.warning("reference cache stats unavailable: %s", exc)
        self._counts.clear()
        self._latencies.clear()
        return out


class InProcessScorer(StreamScorer):
    """Scoring in the driver: the judge on an asyncio loop in a background thread, the table in the driver."""

    def __init__(
        self,
        algo: AlgorithmConfig,
        judge_cfg: JudgeConfig | None = None,
        judge=None,
        recipe_exact: bool = False,
        rule_timeout_s: float = RewardConfig.rule_timeout_s,
    ):
        super().__init__(algo, judge_cfg or JudgeConfig(), recipe_exact, rule_timeout_s)
        self.references = ReferenceTable()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="ivgr-reward-loop", daemon=True)
        self._thread.start()
        self.judge = judge if judge is not None else make_judge(self.judge_cfg)

    def check_judge(self) -> None:
        """The judge's start-up check, run on the scorer's loop (``JudgeUnavailable`` when it cannot work)."""
        coro = check_judge(self.judge)
        asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=self.judge_cfg.timeout_s + 30.0)

    def _submit(self, job: GroupJob) -> cf.Future:
        ref = self.references.get(job.record_key) if job.stream == "textual" else None
        return asyncio.run_coroutine_threadsafe(self._score_job(job, self.judge, ref), self._loop)

    def _wait(self, handles: list, timeout: float) -> list:
        done, _ = cf.wait(handles, timeout=timeout, return_when=cf.FIRST_COMPLETED)
        return [h for h in handles if h in done]

    def _take(self, handle: cf.Future) -> tuple[str, GroupResult | None]:
        exc = handle.exception()
        if exc is not None:
            log.warning("in-process reward scoring failed (%r); scoring the group rules-only", exc)
            return "fallback", None
        return "ok", handle.result()

    def _abandon(self, handle: cf.Future) -> bool:
        handle.cancel()  # a coroutine stuck in a blocking call cannot be stopped: rules-only in the driver
        return False

    def _reference(self, record_key: int) -> Reference | None:
        return self.references.get(record_key)

    def _offer_reference(self, record_key: int, candidate: Reference) -> bool:
        return self.references.update(record_key, candidate)

    def _cache_stats(self) -> dict[str, float]:
        return self.references.stats()

    def state_dict(self) -> dict:
        return {"references": self.references.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.references.load_state_dict(state["references"])

    def close(self) -> None:
        self.rule_pool.close()
        if not self._loop.is_running():
            return
        try:
            asyncio.run_coroutine_threadsafe(self.judge.close(), self._loop).result(timeout=10)
        except Exception as exc:  # noqa: BLE001
            log.warning("closing the judge: %s", exc)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        if getattr(self, "judge_fleet", None) is not None:  # make_scorer's shared judge engines
            from ivgr_dist.reward.judge.fleet import close_fleet

            close_fleet(self.judge_fleet)
            self.judge_fleet = None
