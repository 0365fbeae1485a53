"""Per-stream reward means for the metrics line: ``reward/<stream>/<component>`` and ``.../overall``."""

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
    counts: dict[str, int] = defaultdict(int)
    lengths: dict[str, int] = defaultdict(int)
    for r in rollouts:
        stream = r.prompt.stream
        counts[stream] += 1
        lengths[stream] += len(r.response_ids)
        sums[f"reward/{stream}/overall"] += r.reward
        for name in STREAM_COMPONENTS.get(stream, ()):
            sums[f"reward/{stream}/{name}"] += r.rewards.get(name, 0.0)
    out = {}
    for key, total in sums.items():
        out[key] = total / counts[key.split("/")[1]]
    for stream, n in counts.items():
        out[f"rollout/{stream}/response_length"] = lengths[stream] / n
        out[f"rollout/{stream}/count"] = float(n)
    return out
