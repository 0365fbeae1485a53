"""Which Ray resource is a rollout engine's device: "GPU", a declared one (IVGR_DECLARED_DEVICE), or none."""

from __future__ import annotations

from ivgr_dist.runtime.devices import DECLARED_DEVICE_ENV, PLATFORM_QUALNAME, device_resource, platform_plugin
from ivgr_dist.runtime.placement import EnginePlacement, engine_bundles


def test_without_the_switch_nothing_changes(monkeypatch):
    monkeypatch.delenv(DECLARED_DEVICE_ENV, raising=False)
    assert platform_plugin() is None  # vLLM then picks its own platform
    assert device_resource(False) is None and device_resource(True) == "GPU"
    assert engine_bundles(2, False) == [{"CPU": 1.0}, {"CPU": 1.0}]
    assert engine_bundles(2, True, 2.0) == [{"GPU": 1.0, "CPU": 2.0}, {"GPU": 1.0}]


def test_declared_devices_take_the_gpu_paths_shape(monkeypatch):
    monkeypatch.setenv(DECLARED_DEVICE_ENV, "FAKE_GPU")
    assert platform_plugin() == PLATFORM_QUALNAME
    assert device_resource(False) == "FAKE_GPU" and device_resource(True) == "GPU"  # real GPUs stay GPUs
    assert engine_bundles(2, False, resources={"rollout_node": 1}) == [
        {"FAKE_GPU": 1.0, "CPU": 1.0, "rollout_node": 1.0},
        {"FAKE_GPU": 1.0, "rollout_node": 1.0},
    ]
    # TP 1 runs in the actor's own processes: the actor holds the device; TP 2: vLLM's workers hold them
    one = EnginePlacement(0, 1, False, engine_bundles(1, False)).actor_options()
    assert one["resources"] == {"FAKE_GPU": 1.0} and one["num_gpus"] == 0.0 and one["num_cpus"] == 1.0
    assert "resources" not in EnginePlacement(0, 2, False, engine_bundles(2, False)).actor_options()
    assert EnginePlacement(0, 1, False, engine_bundles(1, False)).env() == {DECLARED_DEVICE_ENV: "FAKE_GPU"}


def test_the_engine_uses_vllms_ray_executor_on_declared_devices_only(monkeypatch, tmp_path):
    from ivgr_dist.config import load_config
    from ivgr_dist.rollout.worker import engine_kwargs

    cfg = load_config(None, [f"model.path={tmp_path}", "rollout.tensor_parallel_size=2"])
    monkeypatch.delenv(DECLARED_DEVICE_ENV, raising=False)
    assert engine_kwargs(cfg.model, cfg.rollout, 0, "ivgr_shm", cpu=True)["distributed_executor_backend"] == "mp"
    monkeypatch.setenv(DECLARED_DEVICE_ENV, "FAKE_GPU")
    assert engine_kwargs(cfg.model, cfg.rollout, 0, "ivgr_shm", cpu=True)["distributed_executor_backend"] == "ray"
