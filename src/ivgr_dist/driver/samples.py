"""The sample log: a few whole rollouts per stream, every ``trainer.log_samples_every`` steps.

The metrics say how the rewards move; the samples show what the policy wrote and how each reward component
judged it: prompt, response, the answer the rules extracted and the ground truth, every component, the
advantage, the weight versions and, for a textual rollout, the grounded reasoning its consistency was judged
against. The choice is deterministic, so two runs of the same batch log the same rollouts: per stream, its
groups in batch order, those whose rewards differ first (the ones GRPO learns from; a group of equal rewards has
zero advantages), from each the best rollout (highest reward, the first of ties) and then the worst (lowest
reward, the last of ties), until ``per_stream`` are taken. A best/worst pair shows what the advantage rewarded.
With ``reward.judge.on_failure=mask`` a component the judge failed on is absent from ``rewards``, and
``excluded`` marks a rollout left out of its group's advantage (``group_reward_mean`` is over the others).
"""

from __future__ import annotations

from collections.abc import Sequence

from ivgr_dist.reward.rules import extract_answer
from ivgr_dist.types import STREAMS, Rollout


def sample_records(rollouts: Sequence[Rollout], step: int, per_stream: int) -> list[dict]:
    """Up to ``per_stream`` sample records of each stream in ``rollouts`` (grounded, textual, single order), as
    JSON-ready dicts; rewards and advantages must already be assigned."""
    groups: dict[str, dict[str, list[Rollout]]] = {}  # stream -> group key -> its rollouts, in batch order
    for r in rollouts:
        groups.setdefault(r.prompt.stream, {}).setdefault(r.group_key, []).append(r)
    streams = [s for s in STREAMS if s in groups] + [s for s in groups if s not in STREAMS]
    out: list[dict] = []
    for stream in streams:
        taken = 0
        spread = [g for g in groups[stream].values() if len({r.reward for r in g}) > 1]
        tied = [g for g in groups[stream].values() if len({r.reward for r in g}) <= 1]
        for group in spread + tied:
            for pick, r in _best_and_worst(group):
                if taken == per_stream:
                    break
                out.append(_record(r, pick, group, step))
                taken += 1
            if taken == per_stream:
                break
    return out


def _best_and_worst(group: list[Rollout]) -> list[tuple[str, Rollout]]:
    """``[("best", r), ("worst", r')]``; only the best when the group has one rollout."""
    order = range(len(group))
    best = max(order, key=lambda i: (group[i].reward, -i))
    worst = min(order, key=lambda i: (group[i].reward, -i))
    picks = [("best", group[best])]
    if worst != best:
        picks.append(("worst", group[worst]))
    return picks


def _record(r: Rollout, pick: str, group: list[Rollout], step: int) -> dict:
    p = r.prompt
    record = {
        "step": step,
        "stream": p.stream,
        "uid": p.uid,
        "original_idx": p.original_idx,
        "sample_idx": r.sample_idx,
        "pick": pick,
        "datasource": p.datasource,
        "question_type": p.question_type,
        "question": p.question,
        "prompt": p.prompt_text,
        "response": r.response_text,
        "finish_reason": r.finish_reason,
        "response_tokens": len(r.response_ids),
        "answer": extract_answer(r.response_text),
        "ground_truth": p.answer,
        "rewards": {k: float(v) for k, v in r.rewards.items()},
        "reward": float(r.reward),
        "group_reward_mean": _mean([x.reward for x in group if not x.excluded]),
        "advantage": float(r.advantage),
        "excluded": r.excluded,
        "weight_version": r.weight_version,
        "weight_version_last": r.weight_version_last,
    }
    if p.stream == "grounded":
        record["target_boxes"] = [list(b) for b in p.target_boxes]
    if p.stream == "textual":
        record["consistency_reference"] = r.consistency_reference
    return record


def _mean(values: list[float]) -> float | None:
    """Mean of the rewards the group's advantage compared (None when every rollout was excluded)."""
    return sum(values) / len(values) if values else None
