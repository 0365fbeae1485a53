"""The shared-memory weight-sync backend without an engine: bucket files, the engine-side receive path
(vLLM's engine class driven with a fake model), the driver-side push with fake learners/engines, and
the backend factories' errors. The whole path with real engines is tests/integration/test_rollout_sync.py."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from ivgr_dist.sync import make_weight_sync
from ivgr_dist.sync.fanout import EngineView
from ivgr_dist.sync.shm import (
    BACKEND_NAME,
    ShmSender,
    ShmWeightSync,
    make_shm_dir,
    merge_rank_buckets,
    read_sharded_bucket,
    write_rank_buckets,
)


def _buckets() -> list[list[tuple[str, torch.Tensor]]]:
    g = torch.Generator().manual_seed(0)
    wide = torch.randn(6, 4, generator=g)
    return [
        [
            ("model.embed_tokens.weight", torch.randn(8, 4, generator=g).to(torch.bfloat16)),
            ("model.layers.0.self_attn.q_proj.weight", wide.t()),  # not contiguous: written contiguous
            ("model.layers.0.self_attn.q_proj.bias", torch.randn(6, generator=g, dtype=torch.float16)),
        ],
        [],  # an empty bucket writes no file (its index is skipped)
        [
            ("model.norm.weight", torch.ones(4, dtype=torch.float32)),
            ("visual.counts", torch.arange(5, dtype=torch.int64)),
            ("scalar", torch.tensor(3.5, dtype=torch.float64)),
        ],
    ]


def _write_whole(buckets, out_dir) -> list[dict]:
    """``buckets`` of full tensors as one rank's files (every tensor whole, at offset 0): update descriptors."""
    rank0 = [[(name, tuple(t.shape), t, 0) for name, t in bucket] for bucket in buckets]
    return merge_rank_buckets([write_rank_buckets(rank0, out_dir, 0)])


# ------------------------------------------------------------------------------------- bucket files


def test_bucket_files_appear_atomically_under_their_final_name(tmp_path, monkeypatch):
    import ivgr_dist.sync.shm as shm

    buckets = _write_whole(_buckets(), tmp_path)
    paths = [f["path"] for b in buckets for f in b["files"]]
    assert [Path(p).name for p in paths] == ["bucket_00000_r000.safetensors", "bucket_00002_r000.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(Path(p).name for p in paths)  # no .tmp left
    # a second push into the same folder replaces the files in place
    first = Path(paths[0]).read_bytes()
    again = _write_whole([[("model.embed_tokens.weight", torch.zeros(2, 2))]], tmp_path)
    assert again[0]["files"][0]["path"] == paths[0] and Path(paths[0]).read_bytes() != first

    # a writer that dies half-way leaves no file under a bucket name an engine would read
    real = shm._save_safetensors

    def dies_half_way(tensors, path):
        real(tensors, path)
        Path(path).write_bytes(Path(path).read_bytes()[:10])
        raise OSError("disk full")

    monkeypatch.setattr(shm, "_save_safetensors", dies_half_way)
    out = tmp_path / "interrupted"
    with pytest.raises(OSError, match="disk full"):
        _write_whole(_buckets(), out)
    assert not list(out.glob("*.safetensors"))


# ------------------------------------------------------------------------ sharded (per-rank) files


def _fsdp2_piece(full: torch.Tensor, rank: int, world: int) -> tuple[torch.Tensor, int]:
    """Rank ``rank``'s local rows of ``full`` as FSDP2 holds them (``DTensor.to_local()`` of a ``Shard(0)``
    parameter: torch.chunk rows, ceil(n / world) per rank, the last ranks short or empty, no padding)
    and their dim-0 offset. Checked against ``full_tensor()`` with 3 gloo ranks: shapes (7, 3) -> 3/3/1
    rows at 0/3/6, (1, 5) -> 1/0/0, (2,) -> 1/1/0, (5,) -> 2/2/1."""
    rows = full.shape[0]
    chunk = -(-rows // world)
    start = min(rank * chunk, rows)
    return full[start : min(start + chunk, rows)], start


def _full_state() -> list[tuple[str, torch.Tensor, bool]]:
    """(name, full tensor, sharded?) in state-dict order."""
    g = torch.Generator().manual_seed(1)
    return [
        ("model.embed_tokens.weight", torch.randn(11, 4, generator=g).to(torch.bfloat16), True),  # uneven dim 0
        ("model.layers.0.self_attn.q_proj.weight", torch.randn(8, 3, generator=g).to(torch.bfloat16), True),
        ("model.layers.0.self_attn.k_proj.bias", torch.randn(2, generator=g).to(torch.bfloat16), True),  # < world
        ("model.layers.0.tiny", torch.randn(1, 5, generator=g).to(torch.bfloat16), True),  # one row
        ("visual.blocks.0.conv", torch.randn(5, 2, 2, 3, generator=g).to(torch.bfloat16), True),
        ("model.norm.weight", torch.randn(4, generator=g).to(torch.bfloat16), False),  # plain: rank 0 only
        ("visual.counts", torch.arange(5, dtype=torch.int64), False),
        ("scalar", torch.tensor(3.5, dtype=torch.float64), False),
    ]


def _rank_buckets(rank: int, world: int, cuts=(2, 5)) -> list[list]:
    """This rank's buckets, as ``ivgr_dist.sync.shm.local_shards`` yields them (same cuts on every rank)."""
    items = []
    for name, full, sharded in _full_state():
        if sharded:
            piece, offset = _fsdp2_piece(full, rank, world)
        else:
            piece, offset = (full if rank == 0 else None), 0
        items.append((name, tuple(full.shape), piece, offset))
    bounds = [0, *cuts, len(items)]
    return [items[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


def _write_all_ranks(out_dir, world: int) -> list[dict]:
    return merge_rank_buckets([write_rank_buckets(_rank_buckets(r, world), out_dir, r) for r in range(world)])


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_rank_shards_reassemble_into_exactly_the_full_tensors(tmp_path, world):
    buckets = _write_all_ranks(tmp_path, world)
    want = {name: full for name, full, _ in _full_state()}
    assert [b["names"] for b in buckets] == [list(want)[:2], list(want)[2:5], list(want)[5:]]
    got = {}
    for b in buckets:
        assert [f["path"] for f in b["files"]] == sorted(f["path"] for f in b["files"])  # rank order
        assert b["nbytes"] == sum(want[n].numel() * want[n].element_size() for n in b["names"])
        pairs = list(read_sharded_bucket(b["names"], b["shapes"], b["dtypes"], b["files"]))
        assert [n for n, _ in pairs] == b["names"]
        got.update(pairs)
    for name, full in want.items():
        assert got[name].dtype == full.dtype and got[name].shape == full.shape, name
        assert torch.equal(got[name], full), name
    # rank 0 alone writes the unsharded tensors; empty shards are not written at all
    for b in buckets:
        for f in b["files"]:
            rank = int(Path(f["path"]).stem.rsplit("_r", 1)[1])
            assert list(load_file(f["path"])) == list(f["offsets"])  # plain safetensors files
            for name in f["offsets"]:
                full, sharded = want[name], dict((n, s) for n, _, s in _full_state())[name]
                assert sharded or rank == 0, (name, rank)
                piece, offset = _fsdp2_piece(full, rank, world) if sharded else (full, 0)
                assert f["offsets"][name] == offset and piece.numel() > 0
    if world == 4:  # k_proj.bias (2 rows) lives only in the files of ranks 0 and 1
        bias = buckets[1]["files"]
        assert [Path(f["path"]).name for f in bias if "model.layers.0.self_attn.k_proj.bias" in f["offsets"]] == [
            "bucket_00001_r000.safetensors",
            "bucket_00001_r001.safetensors",
        ]
    assert not list(tmp_path.glob("*.tmp"))


def test_sharded_bucket_errors_name_the_parameter(tmp_path):
    buckets = _write_all_ranks(tmp_path / "a", 2)
    b = buckets[0]
    with pytest.raises(ValueError, match="model.embed_tokens.weight: pieces cover 6 of 11 rows"):
        list(read_sharded_bucket(b["names"], b["shapes"], b["dtypes"], b["files"][:1]))  # rank 1's file left out
    wrong = [list(b["shapes"][0]), [8, 2]]
    with pytest.raises(ValueError, match="q_proj.weight: piece"):
        list(read_sharded_bucket(b["names"], wrong, b["dtypes"], b["files"]))
    r0 = write_rank_buckets(_rank_buckets(0, 2), tmp_path / "b", 0)
    r1 = write_rank_buckets(_rank_buckets(1, 2, cuts=(3, 5)), tmp_path / "b", 1)
    with pytest.raises(ValueError, match="bucket 0: ranks disagree"):
        merge_rank_buckets([r0, r1])


def test_make_shm_dir_gives_a_fresh_folder_per_push(tmp_path):
    a, b = make_shm_dir(str(tmp_path), prefix="ivgr_sync_v1_"), make_shm_dir(str(tmp_path), prefix="ivgr_sync_v1_")
    assert a != b and a.is_dir() and b.is_dir() and a.name.startswith("ivgr_sync_v1_") and a.parent == tmp_path


# ---------------------------------------------------------------------------------- engine side


class FakeModel:
    """What the transfer engine needs of vLLM's model: ``load_weights`` taking (name, tensor) pairs."""

    def __init__(self):
        self.loaded: list[tuple[str, torch.Tensor]] = []
        self.calls = 0

    def load_weights(self, weights):
        self.calls += 1
        self.loaded.extend(weights)  # consumed here, while the bucket file is open
        return {n for n, _ in self.loaded}


@pytest.fixture(scope="module")
def engine_cls():
    pytest.importorskip("vllm")
    from ivgr_dist.sync.shm import _engine_class, register_with_vllm

    register_with_vllm()
    register_with_vllm()  # idempotent: vLLM may load the plugin twice in one process
    return _engine_class()


def _engine(engine_cls, model):
    """The receive path only touches ``self.model``: no vLLM config, device or worker needed."""
    engine = engine_cls.__new__(engine_cls)
    engine.model = model
    engine.init_transfer_engine(engine.parse_init_info({}))
    return engine


def test_engine_loads_each_bucket_through_the_model(engine_cls, tmp_path):
    model = FakeModel()
    engine = _engine(engine_cls, model)
    buckets = _buckets()
    refs = _write_whole(buckets, tmp_path)
    for ref in refs:
        engine.receive_weights(engine.parse_update_info(ref))
    want = [b for bucket in buckets for b in bucket]
    assert [n for n, _ in model.loaded] == [n for n, _ in want] and model.calls == len(refs)
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(model.loaded, want, strict=True))
    assert engine.loaded_bytes == sum(r["nbytes"] for r in refs) and engine.load_seconds > 0
    assert engine_cls.update_info_cls is not None and engine.supports_draft_weight_update is False


def test_engine_records_what_the_model_loaded_and_what_the_update_missed(engine_cls, tmp_path, monkeypatch):
    from types import SimpleNamespace

    import vllm.model_executor.model_loader.reload as reload

    from ivgr_dist.rollout.worker_ext import IvgrWorkerExtension

    monkeypatch.setattr(reload, "initialize_layerwise_reload", lambda model: None)
    monkeypatch.setattr(reload, "finalize_layerwise_reload", lambda model, config: None)
    model = FakeModel()
    names = [n for bucket in _buckets() for n, _ in bucket]
    model.named_parameters = lambda: [(n, None) for n in [*names, "extra.weight"]]
    engine = _engine(engine_cls, model)
    engine.model_config = None
    engine.start_weight_update()
    for ref in _write_whole(_buckets(), tmp_path):
        engine.receive_weights(engine.parse_update_info(ref))
    engine.finish_weight_update()
    assert engine.loaded == set(names)
    missing = IvgrWorkerExtension.ivgr_missing_parameters
    assert missing(SimpleNamespace(weight_transfer_engine=engine)) == ["extra.weight"]
    assert missing(SimpleNamespace(weight_transfer_engine=object())) == []  # another backend: nothing known


def test_engine_loads_sharded_buckets_as_full_tensors(engine_cls, tmp_path):
    model = FakeModel()
    engine = _engine(engine_cls, model)
    buckets = _write_all_ranks(tmp_path, 3)
    for b in buckets:
        engine.update_weights(b)  # the merged descriptor is the update info as it is
    want = _full_state()
    assert [n for n, _ in model.loaded] == [n for n, _, _ in want] and model.calls == len(buckets)
    assert all(torch.equal(a, b) for (_, a), (_, b, _) in zip(model.loaded, want, strict=True))
    assert engine.loaded_bytes == sum(b["nbytes"] for b in buckets)
    # one rank's file missing: the engine says which and why before loading anything of the bucket
    Path(buckets[0]["files"][1]["path"]).unlink()
    with pytest.raises(FileNotFoundError, match="bucket_00000_r001.safetensors is not on this node"):
        engine.update_weights(buckets[0])
    assert model.calls == len(buckets)


def test_engine_names_the_missing_bucket_and_the_fix(engine_cls, tmp_path):
    model = FakeModel()
    engine = _engine(engine_cls, model)
    missing = str(tmp_path / "elsewhere" / "bucket_00000_r000.safetensors")
    with pytest.raises(FileNotFoundError) as info:
        engine.update_weights(
            {
                "names": ["a"],
                "shapes": [[1]],
                "dtypes": ["float32"],
                "nbytes": 4,
                "files": [{"path": missing, "offsets": {"a": 0}}],
            }
        )
    msg = str(info.value)
    assert missing in msg and "not on this node" in msg and BACKEND_NAME in msg and "nccl" in msg
    assert model.calls == 0 and engine.loaded_bytes == 0
    with pytest.raises(ValueError, match="Invalid update_info"):
        engine.update_weights({"path": missing, "bogus": 1})


def test_vllm_factory_lists_the_registered_backend_for_an_unknown_name(engine_cls):
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

    with pytest.raises(ValueError, match=rf"Invalid weight transfer backend: nope.*{BACKEND_NAME}"):
        WeightTransferEngineFactory.create_engine(SimpleNamespace(backend="nope"), None, None, None)


# ----------------------------------------------------------------------------------- driver side


class FakeLearners:
    """A learner group of ranks that run the real learner-side sender on stand-in weights (all of them on rank 0)."""

    def __init__(self, buckets, ranks=2):
        self.weights = dict(pair for bucket in buckets for pair in bucket)
        self.ranks, self.plans = ranks, []

    def push_weights(self, version, plan):
        self.plans.append((version, plan))
        source = [
            SimpleNamespace(rank=r, named_weights=lambda r=r: iter(self.weights.items())) for r in range(self.ranks)
        ]
        return [ShmSender().push(s, version, plan) for s in source]


class FakeRollouts:
    """Engines 0 and 1 as the pool's view; ``call`` stands in for ``call_engines`` (no Ray)."""

    def __init__(self, engines=2, fail=False):
        self.engines, self.fail, self.seen = engines, fail, []

    def engine_view(self):
        return EngineView({e: f"actor-{e}" for e in range(self.engines)}, 1, {e: "node" for e in range(self.engines)})

    def call(self, view, method, args, timeout_s, what, version):
        assert method == "update_weights" and list(args) == view.ids
        buckets = args[0][0]
        assert all(os.path.isfile(f["path"]) for b in buckets for f in b["files"])  # the files exist while engines load
        self.seen.append((buckets, version))
        if self.fail:
            raise RuntimeError("engine 1 died")
        return {e: {"engine": e, "version": version, "update_s": 0.01 * (e + 1)} for e in args}


def test_push_writes_hands_over_and_removes_the_files(tmp_path):
    learners, rollouts = FakeLearners(_buckets()), FakeRollouts()
    # 124 bytes: the first three tensors in bf16 fill a bucket, the other three make the second
    sync = ShmWeightSync(bucket_bytes=124, dtype="bfloat16", shm_root=str(tmp_path), call=rollouts.call)
    metrics = sync.push(learners, rollouts, version=3)
    ((version, plan),) = learners.plans
    out_dir = plan["dir"]
    assert Path(out_dir).parent == tmp_path and "_v3_" in Path(out_dir).name and version == 3
    assert (plan["backend"], plan["bucket_bytes"], plan["dtype"]) == (BACKEND_NAME, 124, "bfloat16")
    buckets, version = rollouts.seen[0]
    assert version == 3 and len(buckets) == 2
    assert metrics["sync/bytes"] == sum(b["nbytes"] for b in buckets) and metrics["sync/buckets"] == 2
    assert metrics["sync/engine_load_s_max"] == pytest.approx(0.02)
    assert metrics["time/sync_s"] >= metrics["sync/gather_write_s"] >= 0
    assert not list(tmp_path.iterdir())  # nothing left in shared memory
    # a failing engine: the error reaches the caller and the files are still removed
    failing = FakeRollouts(fail=True)
    sync.call = failing.call
    with pytest.raises(RuntimeError, match="engine 1 died"):
        sync.push(FakeLearners(_buckets()), failing, version=4)
    assert not list(tmp_path.iterdir())


def test_push_to_joining_engines_only_and_setup_refuses_two_nodes(tmp_path):
    seen = []

    def call(view, method, args, *rest):
        seen.append(sorted(args))
        return {e: {"update_s": 0.0} for e in args}

    rollouts = FakeRollouts(engines=3)
    sync = ShmWeightSync(bucket_bytes=64, shm_root=str(tmp_path), call=call)
    out = sync.push(FakeLearners(_buckets()), rollouts, version=1, engines=[2])
    assert seen == [[2]] and out["sync/buckets"] > 1  # 64-byte buckets: several
    learners = SimpleNamespace(node_ids=lambda: ["node", "node"])
    sync.setup(learners, rollouts)  # one node: fine
    learners.node_ids = lambda: ["node", "other-node"]
    with pytest.raises(ValueError, match="learner ranks and the rollout engines are on 2 nodes"):
        sync.setup(learners, rollouts)


def test_factory_builds_the_shm_backend_and_rejects_unknown_names():
    sync = make_weight_sync("auto", use_gpus=False, bucket_bytes=123, dtype="bfloat16")
    assert isinstance(sync, ShmWeightSync) and sync.engine_backend == BACKEND_NAME == "ivgr_shm"
    assert (sync.bucket_bytes, sync.dtype) == (123, "bfloat16")
    with pytest.raises(
        ValueError,
        match=r"sync.backend='shm': unknown weight-sync backend; valid: \['auto', 'ivgr_shm', 'gloo', 'nccl'\]",
    ):
        make_weight_sync("shm", use_gpus=False, bucket_bytes=1)
