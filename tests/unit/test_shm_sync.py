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
from ivgr_dist.sync.shm import (
    BACKEND_NAME,
    BucketRef,
    ShmWeightSync,
    make_shm_dir,
    merge_rank_buckets,
    read_bucket,
    read_sharded_bucket,
    write_buckets,
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


# ------------------------------------------------------------------------------------- bucket files


def test_write_then_read_round_trips_names_dtypes_values_and_nbytes(tmp_path):
    buckets = _buckets()
    refs = write_buckets(buckets, tmp_path / "sync")  # the folder is created
    assert [Path(r.path).name for r in refs] == ["bucket_00000.safetensors", "bucket_00002.safetensors"]
    for ref, bucket in zip(refs, [buckets[0], buckets[2]], strict=True):
        assert ref.names == [n for n, _ in bucket]
        assert ref.nbytes == sum(t.numel() * t.element_size() for _, t in bucket)
        assert ref.to_update_info() == {"path": ref.path, "names": ref.names, "nbytes": ref.nbytes}
        got = list(read_bucket(ref.path, ref.names))
        assert [n for n, _ in got] == ref.names  # in the order asked for
        for (name, want), (_, have) in zip(bucket, got, strict=True):
            assert have.dtype == want.dtype and have.shape == want.shape, name
            assert torch.equal(have, want), name
    # without names: every tensor of the file; with a subset: only those, in that order
    assert {n for n, _ in read_bucket(refs[1].path)} == {"model.norm.weight", "visual.counts", "scalar"}
    assert [n for n, _ in read_bucket(refs[1].path, ["scalar", "model.norm.weight"])] == ["scalar", "model.norm.weight"]


def test_bucket_files_appear_atomically_under_their_final_name(tmp_path, monkeypatch):
    import safetensors.torch

    refs = write_buckets(_buckets(), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(Path(r.path).name for r in refs)  # no .tmp left
    # a second push into the same folder replaces the files in place
    first = Path(refs[0].path).read_bytes()
    again = write_buckets([[("model.embed_tokens.weight", torch.zeros(2, 2))]], tmp_path)
    assert again[0].path == refs[0].path and Path(refs[0].path).read_bytes() != first

    # a writer that dies half-way leaves no file under a bucket name an engine would read
    real = safetensors.torch.save_file

    def dies_half_way(tensors, filename, metadata=None):
        real(tensors, filename, metadata)
        Path(filename).write_bytes(Path(filename).read_bytes()[:10])
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", dies_half_way)
    out = tmp_path / "interrupted"
    with pytest.raises(OSError, match="disk full"):
        write_buckets(_buckets(), out)
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
    """This rank's buckets, as ``LearnerWorker._iter_local_shards`` yields them (same cuts on every rank)."""
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
    refs = write_buckets(buckets, tmp_path)
    for ref in refs:
        engine.receive_weights(engine.parse_update_info(ref.to_update_info()))
    want = [b for bucket in buckets for b in bucket]
    assert [n for n, _ in model.loaded] == [n for n, _ in want] and model.calls == len(refs)
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(model.loaded, want, strict=True))
    assert engine.loaded_bytes == sum(r.nbytes for r in refs) and engine.load_seconds > 0
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
    for ref in write_buckets(_buckets(), tmp_path):
        engine.receive_weights(engine.parse_update_info(ref.to_update_info()))
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
    missing = str(tmp_path / "elsewhere" / "bucket_00000.safetensors")
    with pytest.raises(FileNotFoundError) as info:
        engine.update_weights({"path": missing, "names": ["a"], "nbytes": 4})
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
    def __init__(self, buckets):
        self.buckets, self.calls = buckets, []

    def write_state_shm(self, out_dir, bucket_bytes, dtype=None):
        self.calls.append((out_dir, bucket_bytes, dtype))
        return [r.to_update_info() for r in write_buckets(self.buckets, out_dir)]


class FakeRollouts:
    def __init__(self, engines=2, fail=False):
        self.engines, self.fail, self.seen = engines, fail, []

    def update_weights(self, buckets, version, timeout_s=None, engines=None):
        assert all(os.path.isfile(b["path"]) for b in buckets)  # the files exist while engines load
        self.seen.append((buckets, version))
        if self.fail:
            raise RuntimeError("engine 1 died")
        return {e: {"engine": e, "version": version, "update_s": 0.01 * (e + 1)} for e in range(self.engines)}


def test_push_writes_hands_over_and_removes_the_files(tmp_path):
    learners, rollouts = FakeLearners(_buckets()), FakeRollouts()
    sync = ShmWeightSync(bucket_bytes=1 << 20, dtype="bfloat16", shm_root=str(tmp_path))
    metrics = sync.push(learners, rollouts, version=3)
    ((out_dir, bucket_bytes, dtype),) = learners.calls
    assert Path(out_dir).parent == tmp_path and "_v3_" in Path(out_dir).name
    assert (bucket_bytes, dtype) == (1 << 20, "bfloat16")
    buckets, version = rollouts.seen[0]
    assert version == 3 and len(buckets) == 2
    assert metrics["sync/bytes"] == sum(b["nbytes"] for b in buckets) and metrics["sync/buckets"] == 2
    assert metrics["sync/engine_load_s_max"] == pytest.approx(0.02)
    assert metrics["time/sync_s"] >= metrics["sync/gather_write_s"] >= 0
    assert not list(tmp_path.iterdir())  # nothing left in shared memory
    # a failing engine: the error reaches the caller and the files are still removed
    with pytest.raises(RuntimeError, match="engine 1 died"):
        sync.push(FakeLearners(_buckets()), FakeRollouts(fail=True), version=4)
    assert not list(tmp_path.iterdir())


def test_factory_builds_the_shm_backend_and_rejects_unknown_names():
    sync = make_weight_sync("auto", use_gpus=False, bucket_bytes=123, dtype="bfloat16")
    assert isinstance(sync, ShmWeightSync) and sync.engine_backend == BACKEND_NAME == "ivgr_shm"
    assert (sync.bucket_bytes, sync.dtype) == (123, "bfloat16")
    with pytest.raises(
        ValueError,
        match=r"sync.backend='shm': unknown weight-sync backend; valid: \['auto', 'ivgr_shm', 'gloo', 'nccl'\]",
    ):
        make_weight_sync("shm", use_gpus=False, bucket_bytes=1)
    assert BucketRef("p", ["a"], 2).to_update_info() == {"path": "p", "names": ["a"], "nbytes": 2}
