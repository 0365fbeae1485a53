"""Declared devices on CPU: a TP=2 engine started through vLLM's Ray executor, as on GPUs, and trained.

``IVGR_DECLARED_DEVICE=FAKE_GPU`` on a local Ray cluster that declares ``{"FAKE_GPU": 4}``
(:mod:`ivgr_dist.runtime.devices`): vLLM's platform is the CPU one with ``FAKE_GPU`` as its Ray device key, the
engine's placement group is the GPU path's shape (one device per bundle, the actor's CPU in bundle 0), and its
TP workers are vLLM ``RayWorkerProc`` actors in that group, not processes of the engine's actor. One run (one
engine start) serves both tests: 2 GRPO steps with gloo weight sync, then one TP worker is SIGKILLed and the fleet
replaces the engine and removes the shared memory the dead one recorded.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

DEVICE = "FAKE_GPU"
TIMEOUT_S = 300


def _entry_point_installed() -> bool:
    from importlib.metadata import entry_points

    return any(ep.name == "ivgr_declared_device" for ep in entry_points(group="vllm.platform_plugins"))


@pytest.fixture(scope="module")
def declared_cluster():
    """A local cluster with 4 declared devices; the switch set in this process (the cluster's workers inherit it)."""
    from support.ray_cluster import local_ray

    assert _entry_point_installed(), (
        "the vllm.platform_plugins entry point ivgr_declared_device is not installed: `pip install -e .` again "
        "(entry points are read from the installed metadata)"
    )
    old = os.environ.get("IVGR_DECLARED_DEVICE")
    os.environ["IVGR_DECLARED_DEVICE"] = DEVICE
    try:
        with local_ray(6, resources={DEVICE: 4}) as ray:
            yield ray
    finally:
        if old is None:
            os.environ.pop("IVGR_DECLARED_DEVICE", None)
        else:
            os.environ["IVGR_DECLARED_DEVICE"] = old


def _tp_workers(ray, pool, e: int) -> dict:
    """Engine ``e``'s TP worker pids (from its health probe), its real child processes, vLLM's worker actors
    alive in the cluster (name -> pid, from Ray's actor table) and the declared devices left free: in the cluster,
    and in this engine's placement group (Ray's ``FAKE_GPU_group_<group id>`` resource)."""
    from ray._private.state import actors as actor_table

    probe = ray.get(pool.actors[e].probe.remote(30.0), timeout=60)
    procs = ray.get(pool.actors[e].engine_processes.remote(), timeout=60)
    actors = {
        a["Name"]: a["Pid"]
        for a in actor_table().values()
        if a["ActorClassName"] == "RayWorkerProc" and a["State"] == "ALIVE"
    }
    free = ray.available_resources()
    return {
        "pids": sorted(probe["workers"]),
        "children": {p["pid"] for p in procs if not p["ray_actor"]},
        "actors": actors,
        "free": free.get(DEVICE, 0.0),
        "free_in_group": free.get(f"{DEVICE}_group_{pool.fleet.placements[e].pg.id.hex()}", 0.0),
    }


@pytest.fixture(scope="module")
def run(declared_cluster, tiny_model_dir, tmp_path_factory):
    """2 GRPO steps (1 engine, TP=2 on declared devices, gloo sync, verified); the trainer stays open."""
    from ivgr_dist.config import load_config
    from ivgr_dist.driver.trainer import Trainer

    tmp = tmp_path_factory.mktemp("declared")
    cfg = load_config(
        None,
        [
            f"model.path={tiny_model_dir}",
            f"data.train_files=[{tmp}/data/train.parquet]",
            f"data.val_files=[{tmp}/data/val.parquet]",
            "data.synthetic.num_records=32",
            "data.rollout_batch_size=4",
            "rollout.num_engines=1",
            "rollout.tensor_parallel_size=2",
            "rollout.n=4",
            "rollout.max_response_length=16",
            "rollout.restart_backoff_s=0",
            "rollout.health.interval_s=1",
            "rollout.health.timeout_s=10",
            "learner.num_ranks=1",
            "learner.global_batch_size=16",
            "sync.backend=gloo",
            f"trainer.output_dir={tmp}/run",
            "trainer.max_steps=2",
            "trainer.save_every=100",
            "trainer.loggers=[jsonl]",
        ],
    )
    trainer = Trainer.from_config(cfg)
    try:
        trainer.train()
        records = [json.loads(x) for x in (Path(cfg.trainer.output_dir) / "metrics.jsonl").read_text().splitlines()]
        yield {"trainer": trainer, "records": records, "workers": _tp_workers(declared_cluster, trainer.rollouts, 0)}
    finally:
        trainer.close()


def test_a_tp2_engine_on_declared_devices_runs_in_vllms_ray_executor_and_trains(run):
    pool = run["trainer"].rollouts
    placement = pool.fleet.placements[0]
    # the GPU path's shape: one declared device per bundle, the actor's CPU in bundle 0
    assert placement.bundles == [{DEVICE: 1.0, "CPU": 1.0}, {DEVICE: 1.0}]
    workers = run["workers"]
    assert len(workers["pids"]) == 2 and not set(workers["pids"]) & workers["children"], workers
    # vLLM's RayWorkerProc actors, one per TP rank, holding this engine's group's two declared devices: the
    # cluster's other two are free, none is free in the group
    assert sorted(workers["actors"].values()) == workers["pids"], workers
    assert sorted(n[-3:] for n in workers["actors"]) == ["TP0", "TP1"], workers
    assert workers["free"] == 2.0 and workers["free_in_group"] == 0.0, workers
    print(f"\n[declared] engine start {pool.fleet.start_info[0]['start_s']:.1f}s through vLLM's Ray executor")
    records = run["records"]
    assert [r["step"] for r in records] == [1, 2]
    assert all(r["sync/verified"] == 1.0 and r["weight_version"] == r["step"] for r in records), records


def test_a_killed_tp_worker_actor_gets_its_engine_replaced_and_its_shared_memory_removed(run, declared_cluster):
    ray = declared_cluster
    trainer = run["trainer"]
    pool = trainer.rollouts
    segments = pool.fleet.start_info[0]["segments"]
    # the TP workers' own buffers are recorded too, though they are not the engine actor's children
    assert any("-cpushm_" in s for s in segments) and any(s.startswith("psm_") for s in segments), segments
    assert all(os.path.exists(f"/dev/shm/{s}") for s in segments)
    os.kill(run["workers"]["pids"][1], signal.SIGKILL)  # TP rank 1, a Ray actor: what an OOM kill does
    deadline = time.monotonic() + TIMEOUT_S
    while not (pool.fleet.counters["unhealthy"] and pool.serving and pool.serving != [0]):
        assert time.monotonic() < deadline, f"no replacement within {TIMEOUT_S}s: {pool.fleet.failures}"
        trainer._heal()  # what the trainer does at step boundaries: start a replacement, push it the weights
        time.sleep(1)
    assert pool.serving == [1] and pool.fleet.counters["restarts"] == 1, pool.fleet.failures
    assert "EngineDeadError" in pool.fleet.failures[0], pool.fleet.failures
    assert [s for s in segments if os.path.exists(f"/dev/shm/{s}")] == []
    assert pool.versions() == [2]  # the replacement serves the current weights
    new = _tp_workers(ray, pool, 1)
    assert len(new["pids"]) == 2 and not set(new["pids"]) & new["children"], new
    assert sorted(new["actors"].values()) == new["pids"] and not set(new["pids"]) & set(run["workers"]["pids"])
    assert new["free"] == 2.0 and new["free_in_group"] == 0.0, new
