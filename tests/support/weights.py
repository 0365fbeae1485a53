"""The learner's weights as tests read them and hand-made pushes, built on what production code offers: a worker's
``iter_full_tensors``, and the ``ivgr_shm`` backend's two sides (the learner group's ``push_weights`` with that
backend's plan; the engines' ``update_weights`` through ``call_engines``) with the driver's step in between left
to the test (a bucket dropped or swapped)."""

from __future__ import annotations

import shutil
import tempfile

import torch

from ivgr_dist.sync.fanout import call_engines
from ivgr_dist.sync.shm import BACKEND_NAME, merge_rank_buckets, read_sharded_bucket


def full_state(worker_or_group) -> dict[str, torch.Tensor]:
    """Every weight in checkpoint naming as a CPU copy (tied output embeddings left out): a ``LearnerWorker`` in
    this process (one rank) gathers them; a ``LearnerGroup`` writes them as shared-memory buckets (its ranks'
    shards, learner dtype), read back as an engine reads them."""
    if hasattr(worker_or_group, "iter_full_tensors"):
        return {n: t.to("cpu", copy=True) for n, t in worker_or_group.iter_full_tensors()}
    out_dir = tempfile.mkdtemp(prefix="ivgr_test_state_")
    try:
        buckets = shm_buckets(worker_or_group, out_dir, 256 << 20, None)
        return {n: t for b in buckets for n, t in read_sharded_bucket(b["names"], b["shapes"], b["dtypes"], b["files"])}
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)


def shm_buckets(learners, out_dir: str, bucket_bytes: int, dtype: str | None) -> list[dict]:
    """The learner group's current weights as ``ivgr_shm`` bucket files in ``out_dir``: the update descriptors."""
    plan = {"backend": BACKEND_NAME, "dir": str(out_dir), "bucket_bytes": bucket_bytes, "dtype": dtype}
    return merge_rank_buckets([r["buckets"] for r in learners.push_weights(None, plan)])


def load_buckets(pool, buckets: list[dict], version: int, timeout_s: float = 600.0) -> dict[int, dict]:
    """Every live engine of ``pool`` loads ``buckets`` and takes ``version`` (raises ``SyncError`` naming the
    engines that failed); per-engine timings."""
    view = pool.engine_view()
    args = {e: (buckets, version) for e in view.ids}
    return call_engines(view, "update_weights", args, timeout_s, "loading the weights", version)
