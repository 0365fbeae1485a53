"""A killed rollout engine leaves no shared memory behind: vLLM's message queues (``/dev/shm/psm_*``) and locks
(``sem.mp-*``) of its processes are unlinked by ``kill_engine`` (the pool's way to drop, retire or replace an engine;
the judge fleet's way to close)."""

from __future__ import annotations

import os

import pytest

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("core_crashed_first", [False, True])
def test_a_dropped_engine_leaves_no_shared_memory_segments(tiny_model_dir, core_crashed_first):
    """``core_crashed_first``: the EngineCore was SIGKILLed before the pool dropped the engine (a crash, an OOM
    kill): its maps are gone by then, so the segments the engine recorded at start are the ones unlinked."""
    import signal

    import ray

    from ivgr_dist.config import load_config
    from ivgr_dist.rollout.pool import RolloutPool
    from ivgr_dist.shm_segments import SHM_ROOT, mapped_segments

    cfg = load_config(None, [f"model.path={tiny_model_dir}", "rollout.num_engines=1"])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    pool = None
    try:
        pool = RolloutPool(cfg.model, cfg.rollout, "ivgr_shm", use_gpus=False, start_timeout_s=300)
        procs = ray.get(pool.actors[0].engine_processes.remote(), timeout=60)
        segments = mapped_segments(p["pid"] for p in procs)
        assert any(name.startswith("psm_") for name in segments), (procs, segments)  # vLLM's message queues
        if core_crashed_first:
            for p in procs:
                os.kill(p["pid"], signal.SIGKILL)
        pool.drop(0, "dropped by the test")
        left = sorted(set(segments) & set(os.listdir(SHM_ROOT)))
        assert not left, f"the killed engine's processes left {left} in {SHM_ROOT}"
    finally:
        if pool is not None:
            pool.shutdown()
        ray.shutdown()
