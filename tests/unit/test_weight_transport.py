"""The weight-transport interface against fake endpoints, without Ray and without vLLM: each backend's learner-side
sender fed by a stand-in learner rank (:class:`~ivgr_dist.sync.base.WeightSource`), and the receiving side that
the backend's vLLM engine runs (``read_sharded_bucket`` for ``ivgr_shm``, ``receive_buckets`` for the collective
backends) reassembling exactly the learner's state; the collective driver's phases against a fake learner group
and fake engine calls; the factories' errors list the valid names. The shm driver side is in test_shm_sync.py."""

from __future__ import annotations

import multiprocessing as mp
import socket
import threading
from types import SimpleNamespace

import pytest
import torch

from ivgr_dist.sync import BACKENDS, engine_backend, engine_joins_group, make_sender, make_weight_sync
from ivgr_dist.sync.buckets import TensorMeta
from ivgr_dist.sync.collective import CollectiveSender, receive_buckets
from ivgr_dist.sync.shm import ShmSender, merge_rank_buckets, read_sharded_bucket


def _state() -> dict[str, torch.Tensor]:
    """A small model's weights in checkpoint naming (uneven dim 0, a 1-row tensor, a scalar, mixed dtypes)."""
    g = torch.Generator().manual_seed(3)
    return {
        "model.embed_tokens.weight": torch.randn(11, 4, generator=g),
        "model.layers.0.mlp.up_proj.weight": torch.randn(6, 4, generator=g),
        "model.layers.0.tiny": torch.randn(1, 5, generator=g),
        "model.norm.weight": torch.randn(4, generator=g),
        "visual.counts": torch.arange(5, dtype=torch.int64),
        "scalar": torch.tensor(3.5, dtype=torch.float64),
    }


SHARDED = {"model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight", "model.layers.0.tiny"}


class FakeRank:
    """A learner rank as a sender reads it: ``named_weights`` gives what the rank holds (DTensor shards of the
    FSDP-sharded weights when a process group is up, plain tensors otherwise), ``iter_full_tensors`` gathers."""

    def __init__(self, rank: int, weights: dict[str, torch.Tensor]):
        self.rank, self.weights = rank, weights

    def device(self) -> str:
        return "cpu"

    def named_weights(self):
        yield from self.weights.items()

    def iter_full_tensors(self, dtype=None):
        from torch.distributed.tensor import DTensor

        for name, t in self.weights.items():
            t = t.to(dtype) if dtype is not None and t.is_floating_point() else t
            full = t.full_tensor() if isinstance(t, DTensor) else t
            yield name, (full if self.rank == 0 else None)

    def weight_metadata(self, dtype=None):
        return [
            (n, dtype if dtype and t.is_floating_point() else str(t.dtype).removeprefix("torch."), tuple(t.shape))
            for n, t in self.weights.items()
        ]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------ ivgr_shm


def _shm_rank(rank: int, world: int, port: int, out_dir: str, q) -> None:
    """One learner rank of a gloo group: the FSDP-sharded weights as ``Shard(0)`` DTensors, the rest plain."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))
        weights = {n: distribute_tensor(t, mesh, [Shard(0)]) if n in SHARDED else t for n, t in _state().items()}
        plan = {"backend": "ivgr_shm", "dir": out_dir, "bucket_bytes": 100, "dtype": None}
        q.put((rank, make_sender("ivgr_shm").push(FakeRank(rank, weights), 7, plan)))
    finally:
        dist.destroy_process_group()


def test_shm_sender_ranks_write_shards_that_the_engine_side_reads_back_whole(tmp_path):
    world = 2
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_shm_rank, args=(r, world, port, str(tmp_path), q)) for r in range(world)]
    for p in procs:
        p.start()
    try:
        answers = dict(q.get(timeout=120) for _ in range(world))
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    buckets = merge_rank_buckets([answers[r]["buckets"] for r in range(world)])
    assert len(buckets) > 1  # 100-byte buckets: several
    got = dict(pair for b in buckets for pair in read_sharded_bucket(b["names"], b["shapes"], b["dtypes"], b["files"]))
    want = _state()
    assert list(got) == list(want)
    for name, full in want.items():
        assert got[name].dtype == full.dtype and torch.equal(got[name], full), name
    files = {f["path"] for b in buckets for f in b["files"]}
    assert any(path.endswith("_r001.safetensors") for path in files)  # rank 1 wrote its own rows, no gather


def test_shm_sender_casts_to_the_plan_dtype(tmp_path):
    weights = {n: t for n, t in _state().items() if t.is_floating_point()}
    plan = {"backend": "ivgr_shm", "dir": str(tmp_path), "bucket_bytes": 1 << 20, "dtype": "bfloat16"}
    (bucket,) = merge_rank_buckets([ShmSender().push(FakeRank(0, weights), 1, plan)["buckets"]])
    got = dict(read_sharded_bucket(bucket["names"], bucket["shapes"], bucket["dtypes"], bucket["files"]))
    assert all(t.dtype == torch.bfloat16 for t in got.values())
    assert bucket["nbytes"] == sum(t.numel() * 2 for t in weights.values())


# ------------------------------------------------------------------------------------- gloo / nccl


def test_collective_sender_forms_the_group_and_its_broadcast_unpacks_into_the_learner_state():
    """Learner rank 0's sender and one engine worker's receiving loop over a real gloo group (threads)."""
    port, bucket_bytes = _free_port(), 64
    weights = {n: t for n, t in _state().items() if t.is_floating_point()}
    received: dict[str, torch.Tensor] = {}
    errors: list[BaseException] = []
    metas_box: dict = {}
    formed = threading.Event()

    def engine_worker() -> None:
        from ivgr_dist.sync.collective import open_group

        try:
            group = open_group("127.0.0.1", port, 1, 2, "gloo", timeout_s=30)
            formed.wait(30)
            for bucket in receive_buckets(group, "cpu", metas_box["metas"], bucket_bytes):
                received.update({n: t.clone() for n, t in bucket})
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    sender, source = make_sender("gloo"), FakeRank(0, weights)
    assert isinstance(sender, CollectiveSender)
    thread = threading.Thread(target=engine_worker)
    thread.start()
    try:
        rendezvous = {"addr": "127.0.0.1", "port": port, "world_size": 2, "timeout_s": 30}
        out = sender.push(source, None, {"backend": "gloo", "dtype": "bfloat16", "rendezvous": rendezvous})
        metas_box["metas"] = [TensorMeta(n, d, tuple(s)) for n, d, s in out["metas"]]
        assert [m.dtype for m in metas_box["metas"]] == ["bfloat16"] * len(weights)
        formed.set()
        sent = sender.push(source, 1, {"backend": "gloo", "bucket_bytes": bucket_bytes, "dtype": "bfloat16"})
    finally:
        formed.set()
        thread.join(timeout=60)
        sender.close()
    assert not errors, errors
    assert sent["bytes"] == sum(t.numel() * 2 for t in weights.values()) and sent["buckets"] > 1
    assert list(received) == list(weights)
    for name, full in weights.items():
        assert torch.equal(received[name], full.to(torch.bfloat16)), name


def test_a_collective_push_before_the_group_was_formed_says_so_after_draining():
    drained = []

    class Source(FakeRank):
        def iter_full_tensors(self, dtype=None):
            for pair in super().iter_full_tensors(dtype):
                drained.append(pair[0])
                yield pair

    source = Source(0, {"a": torch.ones(2), "b": torch.zeros(3)})
    with pytest.raises(RuntimeError, match="version 4 before the transfer group was formed"):
        CollectiveSender().push(source, 4, {"backend": "gloo", "bucket_bytes": 8})
    assert drained == ["a", "b"]  # the other learner ranks' gathers complete
    assert CollectiveSender().push(FakeRank(1, source.weights), 4, {"backend": "gloo", "bucket_bytes": 8}) == {}


# ---------------------------------------------------------------------------------------- factories


def test_the_factories_build_each_side_and_list_the_valid_names():
    assert list(BACKENDS) == ["ivgr_shm", "gloo", "nccl"]
    assert isinstance(make_sender("ivgr_shm"), ShmSender) and isinstance(make_sender("nccl"), CollectiveSender)
    with pytest.raises(ValueError, match=r"backend 'shm': no sender; valid: \['ivgr_shm', 'gloo', 'nccl'\]"):
        make_sender("shm")
    with pytest.raises(ValueError, match=r"valid: \['auto', 'ivgr_shm', 'gloo', 'nccl'\]"):
        make_weight_sync("ipc", use_gpus=False, bucket_bytes=1)
    for name in BACKENDS:
        sync = make_weight_sync(name, use_gpus=False, bucket_bytes=5, dtype="bfloat16", timeout_s=7.0)
        assert (sync.bucket_bytes, sync.dtype, sync.timeout_s) == (5, "bfloat16", 7.0)
        assert sync.engine_backend == BACKENDS[name].engine == engine_backend(name, use_gpus=False)
    assert [engine_backend("auto", use_gpus=g) for g in (False, True)] == ["ivgr_shm", "ivgr_collective"]
    # engines of a group transport wait for the driver's wt_init; the others start their receiver at start
    assert engine_joins_group("ivgr_collective") and not engine_joins_group("ivgr_shm")


# ----------------------------------------------------------------------- driver side, fake endpoints


class FakeGroup:
    """The learner group as the collective driver uses it: plans in, rank answers out (no Ray)."""

    def __init__(self):
        self.plans: list[tuple] = []

    def master_address(self):
        return "127.0.0.1", 1234

    def push_weights_async(self, version, plan):
        self.plans.append((version, plan))
        return [(version, plan)]

    def wait(self, refs, timeout_s):
        pass

    def collect(self, refs, what):
        ((_, plan),) = refs
        if "rendezvous" in plan:
            return [{"metas": [("w", plan["dtype"], (2, 3))]}]
        return [{"bytes": 12.0, "buckets": 1.0, "send_s": 0.1}]


def test_the_collective_driver_forms_pushes_reforms_and_closes_a_failed_update():
    from ivgr_dist.sync.collective import CollectiveWeightSync
    from ivgr_dist.sync.fanout import EngineView, SyncError

    live, calls, fail = [0, 1], [], {}

    def call(view, method, args, timeout_s, what, version):
        assert sorted(args) == sorted(view.ids) or method == "wt_abort"
        calls.append((method, sorted(args)))
        if method in fail:
            raise SyncError(f"{method} failed", version, failed_engines=fail.pop(method))
        return {e: {} for e in args}

    rollouts = SimpleNamespace(engine_view=lambda: EngineView({e: None for e in live}, 2, {e: "n" for e in live}))
    learners = FakeGroup()
    sync = CollectiveWeightSync("gloo", bucket_bytes=64, dtype="bfloat16", timeout_s=5, grace_s=1, call=call)
    sync.setup(learners, rollouts)
    ((version, plan),) = learners.plans
    assert version is None and plan["backend"] == "gloo" and plan["rendezvous"]["world_size"] == 5  # 1 + 2 * tp 2
    assert calls == [("wt_init", [0, 1])] and sync.metas[0].dtype == "bfloat16"
    calls.clear()
    out = sync.push(learners, rollouts, version=1)
    assert [m for m, _ in calls] == ["wt_start", "wt_update", "wt_finish"]
    assert learners.plans[-1] == (1, {"backend": "gloo", "bucket_bytes": 64, "dtype": "bfloat16"})
    assert out["sync/group_formed"] == 0.0 and out["sync/bytes"] == 12.0
    # an engine left: the group is re-formed without it before the push
    live.remove(1)
    calls.clear()
    assert sync.push(learners, rollouts, version=2)["sync/group_formed"] == 1.0
    assert calls[0] == ("wt_init", [0])
    # engine 2 joins and engine 0 dies while receiving: engine 2's update is closed, the error reaches the caller
    live.append(2)
    fail["wt_update"] = [0]
    calls.clear()
    with pytest.raises(SyncError, match="wt_update failed"):
        sync.push(learners, rollouts, version=3)
    assert calls[-1] == ("wt_abort", [2]) and sync.members is None  # the next push re-forms first
