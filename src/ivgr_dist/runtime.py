"""The run's runtime services, shared by every command: joining or starting Ray, GPU detection, seeding."""

from __future__ import annotations

import logging
import math
import os

import torch

from ivgr_dist.config import Config

log = logging.getLogger(__name__)

__all__ = ["cluster_has_gpus", "init_ray", "seed_everything"]


def seed_everything(seed: int) -> None:
    """Seed the driver's ``random``, NumPy and torch generators (engines, sampler and data have their own seeds)."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def cluster_has_gpus() -> bool:
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0


def init_ray(cfg: Config) -> None:
    """Join ``trainer.ray_address`` / RAY_ADDRESS (``ray job submit`` sets it), else start a local cluster."""
    import ray

    if ray.is_initialized():
        return
    address = cfg.trainer.ray_address or os.environ.get("RAY_ADDRESS")
    from ivgr_dist.interrupts import raise_on_signals
    from ivgr_dist.logs import quiet, quiet_ray_logger

    quiet_ray_logger()
    if address:
        ray.init(address=address, log_to_driver=not quiet())
        raise_on_signals()
        return
    # one CPU per engine TP rank (their placement-group bundles), one or more per learner rank
    need = cfg.rollout.num_engines * cfg.rollout.tensor_parallel_size
    need += cfg.learner.num_ranks * max(cfg.learner.cpus_per_rank, 1)
    need += math.ceil(cfg.reward.num_workers * cfg.reward.cpus_per_worker)  # reward workers (CPU actors)
    # Logical CPUs: a laptop with fewer cores than actors still runs (the actors share cores).
    for attempt in (1, 2):
        try:
            ray.init(num_cpus=max(os.cpu_count() or 1, need), include_dashboard=False, log_to_driver=not quiet())
            break
        except Exception as exc:
            # On an overloaded machine the raylet can exit waiting for its Python dashboard agent's port file, and
            # ray.init stops waiting for the node after 30 s ("The current node timed out during startup"; seen
            # twice here with two jobs on 2 cores). One more start costs seconds; a failed job costs the run.
            if attempt == 2 or "timed out during startup" not in str(exc):
                raise
            log.warning("the local Ray cluster did not start (%s); starting it once more", exc)
            ray.shutdown()
    raise_on_signals()  # ray.init replaced the SIGTERM handler with its own sys.exit
