"""Per-stream reward means for the metrics line: ``reward/<stream>/<component>`` and ``.../overall``.

A component is averaged over the rollouts that have it (``reward.judge.on_failure=mask`` leaves a component the
judge failed on out; a stream where every rollout lacks it reports no mean for it), ``overall`` over the rollouts
that take part in their group's advantage (not ``Rollout.excluded``): the rewards GRPO compared.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

from ivgr_dist.types import Rollout

# Components each stream reports even when a batch holds none of that stream (then they are absent).
STREAM_COMPONENTS = {
    "grounded": ("format", "accuracy", "box_valid", "box_iou"),
    "textual": ("format", "accuracy", "consistency"),
    "single": ("format", "accuracy"),
}


def reward_metrics(rollouts: Iterable[Rollout]) -> dict[str, float]:
    sums: dict[str, float] = defaultdict(float)
    present: dict[str, int] = defaultdict(int)  # metric key -> rollouts that contribute to it
    counts: dict[str, int] = defaultdict(int)
    lengths: dict[str, int] = defaultdict(int)
    for r in rollouts:
        stream = r.prompt.stream
        counts[stream] += 1
        lengths[stream] += len(r.response_ids)
        if not r.excluded:
            sums[f"reward/{stream}/overall"] += r.reward
            present[f"reward/{stream}/overall"] += 1
        for name in STREAM_COMPONENTS.get(stream, ()):
            if name in r.rewards:
                sums[f"reward/{stream}/{name}"] += r.rewards[name]
                present[f"reward/{stream}/{name}"] += 1
    out = {key: total / present[key] for key, total in sums.items()}
    for stream, n in counts.items():
        out[f"rollout/{stream}/response_length"] = lengths[stream] / n
        out[f"rollout/{stream}/count"] = float(n)
    return out
