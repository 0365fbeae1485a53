"""Placement of the rollout fleet and the learner group on a Ray cluster with declared GPUs (no GPU needed).

Ray schedules declared resources: a local cluster started with ``num_gpus=8`` on this CPU machine places
``{"GPU": 1}`` bundles and sets ``ray.get_gpu_ids()``. The pool and the learner group are the real ones;
only their actors are stand-ins. The engine stand-in does what vLLM 0.32's Ray executor does with
``tensor_parallel_size > 1`` (``vllm/v1/executor/ray_executor.py::_init_workers_ray``): it takes the
placement group of the actor that builds the engine, the bundles named by ``VLLM_RAY_BUNDLE_INDICES``
(else the first ``tp`` bundles with a device), and starts one ``num_gpus=1, num_cpus=0`` worker in each.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.integration

NUM_GPUS = 8


class StandInEngine:
    """Reports where it and its TP workers landed, as a vLLM engine built in this actor would."""

    def __init__(self, model_cfg, rollout_cfg, index, weight_backend):
        self.tp, self.index = rollout_cfg.tensor_parallel_size, index
        self.workers = []

    def start(self) -> dict:
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        pg = ray.util.get_current_placement_group()
        node = ray.get_runtime_context().get_node_id()
        subprocess_gcs = None
        if self.tp == 1:  # vLLM runs in this actor's own processes on the device the actor holds
            bundles, gpus, nodes = [0], [list(map(int, ray.get_gpu_ids()))], [node]
        elif not any(b.get("GPU", 0) for b in pg.bundle_specs):
            # CPU: vLLM's TP workers are processes of this actor (mp executor), no Ray workers and no ray.init()
            # in the EngineCore (a bare ray.init() there would start a second local cluster)
            bundles, gpus, nodes = list(range(len(pg.bundle_specs))), [[] for _ in pg.bundle_specs], [node]
        else:
            env = os.environ.get("VLLM_RAY_BUNDLE_INDICES")
            if env:
                bundles = [int(i) for i in env.split(",")]
            else:
                bundles = [i for i, b in enumerate(pg.bundle_specs) if b.get("GPU", 0)][: self.tp]

            @ray.remote
            class TPWorker:
                def where(self):
                    return list(map(int, ray.get_gpu_ids())), ray.get_runtime_context().get_node_id()

            self.workers = [
                TPWorker.options(
                    num_cpus=0,
                    num_gpus=1,
                    scheduling_strategy=PlacementGroupSchedulingStrategy(
                        placement_group=pg, placement_group_capture_child_tasks=True, placement_group_bundle_index=b
                    ),
                ).remote()
                for b in bundles
            ]
            got = ray.get([w.where.remote() for w in self.workers], timeout=60)
            gpus, nodes = [g for g, _ in got], [n for _, n in got]
            # vLLM's EngineCore is a subprocess of this actor and calls a bare ray.init(): it must join THIS
            # cluster (the placement group lives here), not start one of its own.
            code = "import ray; ray.init(); print(ray.get_runtime_context().gcs_address)"
            proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
            subprocess_gcs = proc.stdout.strip().splitlines()[-1] if proc.returncode == 0 else proc.stderr[-500:]
        return {
            "engine": self.index,
            "start_s": 0.0,
            "pid": os.getpid(),
            "pg": pg.id.hex(),
            "bundle_specs": pg.bundle_specs,
            "bundles": bundles,
            "gpus": gpus,
            "nodes": nodes,
            "actor_gpus": list(map(int, ray.get_gpu_ids())),
            "env": os.environ.get("VLLM_RAY_BUNDLE_INDICES"),
            "gcs": ray.get_runtime_context().gcs_address,
            "subprocess_gcs": subprocess_gcs,
        }

    def shutdown(self) -> None:
        pass


class StandInLearner:
    def __init__(self, model_cfg, learner_cfg, algo_cfg, rank, world_size, total_steps):
        self.rank = rank

    def master_address(self):
        return "127.0.0.1", 0

    def init_distributed(self, addr, port):
        return None

    def where(self) -> dict:
        import ray

        return {"rank": self.rank, "gpus": list(map(int, ray.get_gpu_ids()))}


@pytest.fixture(scope="module")
def fake_gpu_cluster():
    """A local Ray cluster that declares NUM_GPUS GPUs (Ray schedules them; nothing here uses a device)."""
    import sys

    import ray

    from support.ray_cluster import local_ray

    # The stand-ins live in this test module, which Ray's workers cannot import: ship them by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    with local_ray(8, NUM_GPUS) as cluster:
        yield cluster


def _cfg(engines: int, tp: int, ranks: int = 2, timeout_s: float = 5.0, min_engines: int = 1):
    from ivgr_dist.config import load_config

    return load_config(
        None,
        [
            f"rollout.num_engines={engines}",
            f"rollout.min_engines={min_engines}",
            f"rollout.tensor_parallel_size={tp}",
            f"rollout.placement_timeout_s={timeout_s}",
            f"learner.num_ranks={ranks}",
            f"learner.placement_timeout_s={timeout_s}",
        ],
    )


def _free_gpus(ray) -> float:
    return ray.available_resources().get("GPU", 0.0)


def test_three_tp2_engines_and_two_learners_hold_disjoint_devices(fake_gpu_cluster):
    import ray

    from ivgr_dist.learner.group import LearnerGroup
    from ivgr_dist.rollout.pool import RolloutPool

    cfg = _cfg(engines=3, tp=2)
    pool = RolloutPool(cfg.model, cfg.rollout, "nccl", use_gpus=True, start_timeout_s=60, worker_cls=StandInEngine)
    learners = LearnerGroup(cfg.model, cfg.learner, cfg.algorithm, 1, timeout_s=60, worker_cls=StandInLearner)
    try:
        infos = pool.start_info
        print("\nengines:", [(i["engine"], i["bundles"], i["gpus"], i["env"]) for i in infos])
        assert len(infos) == 3 and len({i["pg"] for i in infos}) == 3  # one placement group per engine
        engine_gpus: list[int] = []
        for info in infos:
            # tp one-device bundles, the actor's CPU in bundle 0, all on one node (STRICT_PACK)
            assert info["bundle_specs"] == [{"GPU": 1.0, "CPU": 1.0}, {"GPU": 1.0}], info
            assert info["env"] == "0,1" and info["bundles"] == [0, 1]
            assert info["actor_gpus"] == []  # TP > 1: the devices belong to the TP workers, not the actor
            flat = [g for gs in info["gpus"] for g in gs]
            assert all(len(gs) == 1 for gs in info["gpus"]) and len(set(flat)) == 2, info
            assert len(set(info["nodes"])) == 1
            assert info["subprocess_gcs"] == info["gcs"], info["subprocess_gcs"]  # the EngineCore joins this cluster
            engine_gpus += flat
        assert len(engine_gpus) == len(set(engine_gpus)) == 6  # no device shared between engines
        ranks = ray.get([a.where.remote() for a in learners.actors], timeout=30)
        learner_gpus = [g for r in ranks for g in r["gpus"]]
        print("learners:", ranks)
        assert all(len(r["gpus"]) == 1 for r in ranks) and len(set(learner_gpus)) == 2
        assert not set(learner_gpus) & set(engine_gpus)  # nor with the learners
        assert _free_gpus(ray) == 0

        # the cluster is full: one more engine fails within its deadline, naming what it lacks
        more = _cfg(engines=1, tp=2, timeout_s=2.0)
        t0 = time.monotonic()
        from ivgr_dist.runtime.placement import PlacementError

        with pytest.raises(PlacementError) as err:
            RolloutPool(more.model, more.rollout, "nccl", use_gpus=True, start_timeout_s=30, worker_cls=StandInEngine)
        elapsed = time.monotonic() - t0
        print("error:", err.value)
        assert elapsed < 15
        msg = str(err.value)
        assert "rollout engine 0 (tensor_parallel_size=2)" in msg and "STRICT_PACK" in msg
        assert "needs CPU 1, GPU 2 on ONE node" in msg and "GPU 0" in msg  # free per node: no GPU left
    finally:
        pool.shutdown()
        learners.shutdown()
    deadline = time.monotonic() + 10
    while _free_gpus(ray) < NUM_GPUS and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _free_gpus(ray) == NUM_GPUS  # every placement group was released, the failed one too


def test_too_few_devices_for_the_fleet_fails_fast_and_releases_what_it_took(fake_gpu_cluster):
    """5 engines x TP 2 need 10 devices of 8 and all 5 must start (rollout.min_engines=5): engines 0-3 get
    theirs, engine 4 times out; the pool releases the 4 groups it made. (With the default min_engines=1 the
    four start and the fifth waits for room: test_fleet_pool.py.)"""
    import ray

    from ivgr_dist.rollout.pool import RolloutPool
    from ivgr_dist.runtime.placement import PlacementError

    cfg = _cfg(engines=5, tp=2, timeout_s=2.0, min_engines=5)
    t0 = time.monotonic()
    with pytest.raises(PlacementError, match=r"rollout engine 4 \(tensor_parallel_size=2\).*not ready within 2s"):
        RolloutPool(cfg.model, cfg.rollout, "nccl", use_gpus=True, start_timeout_s=30, worker_cls=StandInEngine)
    assert time.monotonic() - t0 < 30
    deadline = time.monotonic() + 10
    while _free_gpus(ray) < NUM_GPUS and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _free_gpus(ray) == NUM_GPUS


def test_tp1_engines_hold_their_device_in_the_actor(fake_gpu_cluster):
    from ivgr_dist.rollout.pool import RolloutPool

    cfg = _cfg(engines=4, tp=1)
    pool = RolloutPool(cfg.model, cfg.rollout, "nccl", use_gpus=True, start_timeout_s=60, worker_cls=StandInEngine)
    try:
        gpus = [i["actor_gpus"] for i in pool.start_info]
        assert all(len(g) == 1 for g in gpus) and len({g[0] for g in gpus}) == 4, gpus
        assert all(i["bundle_specs"] == [{"GPU": 1.0, "CPU": 1.0}] and i["env"] is None for i in pool.start_info)
    finally:
        pool.shutdown()


def test_cpu_engines_reserve_one_cpu_per_tp_rank(fake_gpu_cluster):
    """Without GPUs an engine's TP ranks are processes of its actor: its group reserves one CPU for each."""
    import ray

    from ivgr_dist.rollout.pool import RolloutPool

    cfg = _cfg(engines=2, tp=2)
    before = ray.available_resources().get("CPU", 0.0)
    pool = RolloutPool(cfg.model, cfg.rollout, "ivgr_shm", use_gpus=False, start_timeout_s=60, worker_cls=StandInEngine)
    try:
        assert all(i["bundle_specs"] == [{"CPU": 1.0}, {"CPU": 1.0}] for i in pool.start_info)
        assert ray.available_resources().get("CPU", 0.0) == before - 4
        assert _free_gpus(ray) == NUM_GPUS
    finally:
        pool.shutdown()


class LearnerDiesOnFirstStart(StandInLearner):
    """Its worker process dies (SIGKILL) while the actor is created, the first time a rank starts, as a Ray
    worker that crashes before the actor runs does; a marker file in ``markers`` remembers it."""

    markers = ""  # set by the test before the group ships the class (by value) to Ray

    def __init__(self, model_cfg, learner_cfg, algo_cfg, rank, world_size, total_steps):
        import signal
        from pathlib import Path

        marker = Path(self.markers) / f"rank_{rank}"
        if not marker.exists():
            marker.write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)
        super().__init__(model_cfg, learner_cfg, algo_cfg, rank, world_size, total_steps)

    def pid(self) -> int:
        return os.getpid()


class LearnerFailsToStart(StandInLearner):
    def __init__(self, model_cfg, learner_cfg, algo_cfg, rank, world_size, total_steps):
        raise RuntimeError(f"rank {rank}: bad model path")


def test_a_learner_rank_whose_worker_dies_at_start_is_started_again(fake_gpu_cluster, tmp_path, monkeypatch):
    """The learner group starts a rank again in its bundle when its worker died before the actor ran (counted);
    a rank whose ``__init__`` raised is not retried and the error names it; both leave every device free."""
    import ray

    from ivgr_dist.learner.group import LearnerGroup

    monkeypatch.setattr(LearnerDiesOnFirstStart, "markers", str(tmp_path))
    cfg = _cfg(engines=1, tp=1)
    learners = LearnerGroup(cfg.model, cfg.learner, cfg.algorithm, 1, timeout_s=60, worker_cls=LearnerDiesOnFirstStart)
    try:
        assert sorted(p.name for p in tmp_path.iterdir()) == ["rank_0", "rank_1"]  # each died once
        assert learners.failed_starts == 2
        pids = ray.get([a.pid.remote() for a in learners.actors], timeout=30)
        assert all(pid != int((tmp_path / f"rank_{r}").read_text()) for r, pid in enumerate(pids))  # new processes
        ranks = ray.get([a.where.remote() for a in learners.actors], timeout=30)
        assert [r["rank"] for r in ranks] == [0, 1] and len({g for r in ranks for g in r["gpus"]}) == 2
    finally:
        learners.shutdown()
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match=r"learner rank [01] failed to start: .*bad model path"):
        LearnerGroup(cfg.model, cfg.learner, cfg.algorithm, 1, timeout_s=60, worker_cls=LearnerFailsToStart)
    assert time.monotonic() - t0 < 20  # not retried
    deadline = time.monotonic() + 10
    while _free_gpus(ray) < NUM_GPUS and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _free_gpus(ray) == NUM_GPUS
