"""Scoring finished groups: the interface the driver uses, and its in-process rule implementation.

``Scorer`` is what the driver sees: groups go in as they finish generating, scored groups come
out, pair-aware (a record's textual group is scored only once its grounded group of this step has
updated the reference table). ``RuleScorer`` implements it in the driver process with the rule
rewards of :mod:`ivgr_dist.reward.rules` and a deterministic consistency stand-in:

- consistency (stream B): 0 without a reference; otherwise the word-set overlap (Jaccard) of the
  textual ``<think>`` and the reference ``<think>``, mapped onto the judge's rubric values
  (>= 0.8 -> 1.0, >= 0.5 -> 0.7, >= 0.2 -> 0.3, else 0.0). This is NOT the paper's LLM judge; it
  keeps the loop runnable until the reward worker pool (judges, Ray actors) lands behind the
  same interface.
- accuracy: :func:`~ivgr_dist.reward.rules.rule_accuracy`; answers only a judge could decide
  (free-form mismatches, math that math-verify rejects) score 0 and are counted in
  ``reward/judge_fallbacks``.
"""

from __future__ import annotations

import re
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from typing import Protocol

from ivgr_dist.config import AlgorithmConfig
from ivgr_dist.reward import rules
from ivgr_dist.reward.reference import ReferenceTable, select_candidate
from ivgr_dist.types import Prompt, Rollout

RUBRIC = (0.0, 0.3, 0.7, 1.0)


class Scorer(Protocol):
    """What the driver needs from reward computation (in-process rules, or a pool of Ray actors)."""

    def score_stream(
        self, groups: Iterable[list[Rollout]], prompts: Sequence[Prompt], step: int
    ) -> Iterator[list[Rollout]]:
        """Consume the groups of ``prompts`` as they finish; yield them scored (``rewards``, ``reward`` set)."""
        ...

    def metrics(self) -> dict[str, float]: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


_WORD = re.compile(r"[a-z0-9]+")


def overlap_consistency(think: str, reference: str) -> float:
    """Deterministic stand-in for the consistency judge: word-set Jaccard bucketed onto the rubric."""
    a, b = set(_WORD.findall(think.lower())), set(_WORD.findall(reference.lower()))
    if not a or not b:
        return 0.0
    j = len(a & b) / len(a | b)
    return 1.0 if j >= 0.8 else 0.7 if j >= 0.5 else 0.3 if j >= 0.2 else 0.0


class RuleScorer:
    """Rule rewards + reference table + consistency stand-in, in the calling process."""

    def __init__(self, algo: AlgorithmConfig):
        self.algo = algo
        self.references = ReferenceTable()
        self._counts: dict[str, float] = defaultdict(float)

    # ---------------------------------------------------------------------------------- scoring

    def _accuracy(self, rollout: Rollout) -> float:
        answer = rules.extract_answer(rollout.response_text)
        if answer is not None and len(answer) > self.algo.max_answer_chars:
            return 0.0
        acc = rules.rule_accuracy(answer, rollout.prompt.answer, rollout.prompt.question_type)
        if acc is None:
            self._counts["judge_fallbacks"] += 1
            return 0.0
        return acc

    def _score_grounded(self, group: list[Rollout], step: int) -> None:
        for r in group:
            fmt = rules.format_reward(r.response_text)
            acc = self._accuracy(r)
            valid, iou = rules.grounded_box_rewards(
                r.response_text, r.prompt.target_boxes, dup_iou=self.algo.dup_box_iou
            )
            r.rewards = {"format": fmt, "accuracy": acc, "box_valid": valid, "box_iou": iou}
            r.reward = rules.grounded_overall(fmt, valid, iou, acc)
        candidate = select_candidate(
            [
                (rules.think_text(r.response_text), r.rewards["accuracy"], r.rewards["box_iou"], r.group_key)
                for r in group
            ],
            min_iou=self.algo.ref_min_iou,
            step=step,
        )
        if candidate is not None and self.references.update(group[0].prompt.original_idx, candidate):
            self._counts["reference_updates"] += 1

    def _score_textual(self, group: list[Rollout]) -> None:
        ref = self.references.get(group[0].prompt.original_idx)
        for r in group:
            fmt = rules.format_reward(r.response_text)
            acc = self._accuracy(r)
            if ref is None:
                cons = 0.0
                self._counts["consistency_no_reference"] += 1
            else:
                cons = overlap_consistency(rules.think_text(r.response_text), ref.think)
            r.rewards = {"format": fmt, "accuracy": acc, "consistency": cons}
            r.reward = rules.textual_overall(fmt, acc, cons)

    def _score_single(self, group: list[Rollout]) -> None:
        for r in group:
            fmt = rules.format_reward(r.response_text)
            acc = self._accuracy(r)
            r.rewards = {"format": fmt, "accuracy": acc}
            r.reward = rules.single_overall(fmt, acc, self.algo.single_accuracy_weight)

    def score_stream(
        self, groups: Iterable[list[Rollout]], prompts: Sequence[Prompt], step: int
    ) -> Iterator[list[Rollout]]:
        """Pair-aware: a textual group whose grounded partner is in ``prompts`` waits until that is scored."""
        grounded_due = {p.original_idx for p in prompts if p.stream == "grounded"}
        waiting: dict[int, list[list[Rollout]]] = defaultdict(list)
        for group in groups:
            t0 = time.perf_counter()
            prompt = group[0].prompt
            idx = prompt.original_idx
            ready: list[list[Rollout]] = []
            if prompt.stream == "grounded":
                self._score_grounded(group, step)
                grounded_due.discard(idx)
                ready.append(group)
                for textual in waiting.pop(idx, []):
                    self._score_textual(textual)
                    ready.append(textual)
            elif prompt.stream == "textual" and idx in grounded_due:
                waiting[idx].append(group)
            elif prompt.stream == "textual":
                self._score_textual(group)
                ready.append(group)
            else:
                self._score_single(group)
                ready.append(group)
            self._counts["busy_s"] += time.perf_counter() - t0
            yield from ready
        # A textual group whose grounded partner never arrived (its generation failed) is still scored,
        # against whatever reference the table holds, and counted.
        for textual in (g for gs in waiting.values() for g in gs):
            self._counts["textual_without_partner"] += 1
            self._score_textual(textual)
            yield textual

    # ---------------------------------------------------------------------------------- state

    def metrics(self) -> dict[str, float]:
        out = {f"reward/{k}": v for k, v in self._counts.items()}
        stats = self.references.stats()
        out["refcache/size"] = float(stats["size"])
        out["refcache/mean_box_iou"] = float(stats["mean_box_iou"])
        self._counts.clear()
        return out

    def state_dict(self) -> dict:
        return {"references": self.references.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.references.load_state_dict(state["references"])
