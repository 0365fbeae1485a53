"""A killed or shut-down rollout engine leaves no shared memory behind: vLLM's message queues (``/dev/shm/psm_*``)
and locks (``sem.mp-*``) of its processes are unlinked by ``kill_engine`` (the pool's way to drop, retire or replace
an engine; the judge fleet's way to close) and by ``shutdown`` when vLLM's own shutdown had to kill its core."""

from __future__ import annotations

import os
import signal

import pytest

pytestmark = pytest.mark.integration


def test_engines_that_go_leave_no_shared_memory_segments(tiny_model_dir, ray_cluster):
    """Three engines of one pool, three ways to go (one pool start instead of three):

    - ``dropped``: the pool drops it (``kill_engine``);
    - ``crashed_then_dropped``: the EngineCore was SIGKILLed before the pool dropped the engine (a crash, an OOM
      kill): its maps are gone by then, so the segments the engine recorded at start are the ones unlinked;
    - ``stuck_at_shutdown``: the engine's processes are stopped (SIGSTOP) when the pool shuts down, so vLLM's
      shutdown SIGKILLs them after its grace period (as a core too slow to exit on a loaded machine), before they
      could unlink their queues (it left one in a CI run)."""
    import ray

    from ivgr_dist.config import load_config
    from ivgr_dist.rollout.pool import RolloutPool
    from ivgr_dist.runtime.shm_segments import SHM_ROOT, mapped_segments

    cfg = load_config(None, [f"model.path={tiny_model_dir}", "rollout.num_engines=3"])
    pool, procs, segments = None, {}, {}
    try:
        pool = RolloutPool(cfg.model, cfg.rollout, "ivgr_shm", use_gpus=False, start_timeout_s=300)
        for i, how in enumerate(("dropped", "crashed_then_dropped", "stuck_at_shutdown")):
            procs[how] = ray.get(pool.actors[i].engine_processes.remote(), timeout=60)
            segments[how] = mapped_segments(p["pid"] for p in procs[how])
            assert any(name.startswith("psm_") for name in segments[how]), (how, procs[how], segments[how])
        pool.drop(0, "dropped by the test")
        for p in procs["crashed_then_dropped"]:
            os.kill(p["pid"], signal.SIGKILL)
        pool.drop(1, "dropped by the test")
        for p in procs["stuck_at_shutdown"]:
            if "resource_tracker" not in p["cmdline"]:
                os.kill(p["pid"], signal.SIGSTOP)
        pool.shutdown()
        left = {how: sorted(set(seg) & set(os.listdir(SHM_ROOT))) for how, seg in segments.items()}
        assert not any(left.values()), f"engines' processes left segments in {SHM_ROOT}: {left}"
    finally:
        if pool is not None:
            pool.shutdown()
        for p in (p for ps in procs.values() for p in ps):  # a stopped process that nothing killed must not outlive
            try:
                os.kill(p["pid"], signal.SIGKILL)
            except ProcessLookupError:
                pass


NODE_SCRIPT = """
import json, os, time
import ray
from ivgr_dist.rollout.fleet import unlink_engine_segments

ray.init(log_to_driver=False)

@ray.remote(num_cpus=0, resources={"far": 0.01})
def leak():
    from multiprocessing import resource_tracker, shared_memory

    shm = shared_memory.SharedMemory(create=True, size=4096)
    resource_tracker.unregister(shm._name, "shared_memory")  # as if its creator died with its tracker
    shm.close()
    return ray.get_runtime_context().get_node_id(), shm.name

@ray.remote(num_cpus=0, resources={"far": 0.01})
def present(name):
    return os.path.exists(os.path.join("/dev/shm", name))

node, name = ray.get(leak.remote(), timeout=60)
out = {"far_node": node != ray.get_runtime_context().get_node_id(), "name": name}
out["there_before"] = ray.get(present.remote(name), timeout=60)
out["on_driver_node"] = os.path.exists(os.path.join("/dev/shm", name))
out["removed"] = unlink_engine_segments(0, node, [name])
out["there_after"] = ray.get(present.remote(name), timeout=60)
t0 = time.monotonic()
out["removed_on_unknown_node"] = unlink_engine_segments(1, "ab" * 28, ["psm_none"], timeout_s=5)
out["unknown_node_s"] = time.monotonic() - t0
print("RESULT " + json.dumps(out), flush=True)
"""


def test_a_dead_engines_segments_are_removed_on_its_own_node():
    """An engine whose actor died without ``kill_engine`` (``ray.kill``, the OOM killer) leaves its queues in its
    node's ``/dev/shm``; the pool removes the names the engine recorded at start there (``unlink_engine_segments``):
    in a task pinned to that node. Here the far node runs in a mount namespace with a ``/dev/shm`` of its own, so
    only a removal that runs on it can succeed. The driver is a process of its own on the head node."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from support.ray_cluster import LocalCluster, can_unshare_mounts

    if not can_unshare_mounts():
        pytest.skip("needs `unshare -m` (a mount namespace per node)")
    cluster = LocalCluster.start_head(num_cpus=1)
    try:
        cluster.add_node(num_cpus=1, resources={"far": 1}, masked=Path("/dev/shm"))
        cluster.wait_for_nodes(2)
        env = {**cluster.env, "RAY_ADDRESS": cluster.gcs}
        proc = subprocess.run([sys.executable, "-c", NODE_SCRIPT], capture_output=True, text=True, timeout=300, env=env)
        lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        assert proc.returncode == 0 and lines, proc.stdout[-2000:] + proc.stderr[-3000:]
        out = json.loads(lines[-1][len("RESULT ") :])
    finally:
        cluster.stop()
    assert out["far_node"] and out["there_before"] and not out["on_driver_node"], out  # the far node's own /dev/shm
    assert out["removed"] == [out["name"]] and not out["there_after"], out
    # a node the cluster does not have (gone, with its /dev/shm): nothing removed, no error, no hang
    assert out["removed_on_unknown_node"] == [] and out["unknown_node_s"] < 15, out
