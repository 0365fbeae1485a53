"""The storage contract's checks that need no cluster: paths resolved on the driver, the working-dir copy
refused, checkpoint shards confirmed, old checkpoints pruned."""

from __future__ import annotations

import os

import pytest

from ivgr_dist.config import load_config
from ivgr_dist.driver.checkpoints import check_shards, prune
from ivgr_dist.runtime.storage import StorageError, check_not_node_local, resolve_paths


def test_paths_are_made_absolute_once_against_the_drivers_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, ["data.image_root=imgs", "sft.output_dir=warm"])
    out = resolve_paths(cfg)
    assert out.trainer.output_dir == str(tmp_path / "outputs" / "run")
    assert out.model.path == str(tmp_path / "outputs" / "tiny-qwen2.5-vl")
    assert out.data.train_files == [str(tmp_path / "outputs" / "synthetic" / "train.parquet")]
    assert out.data.image_root == str(tmp_path / "imgs") and out.sft.output_dir == str(tmp_path / "warm")
    assert out.sft_model_dir == str(tmp_path / "warm")
    assert resolve_paths(out) == out  # absolute paths stay as they are
    check_not_node_local(cfg, out)  # an ordinary directory: fine


def test_a_shared_path_inside_the_jobs_working_dir_copy_is_refused(tmp_path, monkeypatch):
    copy = tmp_path / "session_1" / "runtime_resources" / "working_dir_files" / "_ray_pkg_abc"
    copy.mkdir(parents=True)
    monkeypatch.chdir(copy)
    cfg = load_config(None, ["model.path=/shared/model"])
    with pytest.raises(StorageError) as err:
        check_not_node_local(cfg, resolve_paths(cfg))
    msg = str(err.value)
    assert msg.startswith("trainer.output_dir='outputs/run' resolves to " + str(copy / "outputs" / "run"))
    assert "every node unpacks its own copy" in msg and "absolute paths on storage every node mounts" in msg
    ok = load_config(None, ["model.path=/shared/model", "trainer.output_dir=/shared/run"])
    check_not_node_local(ok, resolve_paths(ok))


def test_complete_only_once_the_driver_sees_every_confirmed_shard(tmp_path):
    (tmp_path / "__0_0.distcp").write_bytes(b"x" * 10)
    (tmp_path / ".metadata").write_bytes(b"m")
    confirmed = [{"rank": 0, "node": "n0" * 8, "files": {"__0_0.distcp": 10, ".metadata": 1}}]
    check_shards(tmp_path, confirmed)
    other = [*confirmed, {"rank": 1, "node": "n1abcdefgh", "files": {"__1_0.distcp": 7}}]
    with pytest.raises(
        StorageError,
        match=r"learner rank 1 \(node n1abcdef\) wrote __1_0.distcp \(7 bytes\) but the driver cannot see it",
    ):
        check_shards(tmp_path, other)
    (tmp_path / "__1_0.distcp").write_bytes(b"short")
    with pytest.raises(StorageError, match="but the driver sees 5 bytes"):
        check_shards(tmp_path, other)


def test_only_the_newest_complete_checkpoints_are_kept(tmp_path):
    for step, complete in [(1, True), (2, True), (3, False), (4, True), (5, True), (6, False)]:
        d = tmp_path / f"step_{step:06d}"
        d.mkdir()
        if complete:
            (d / "COMPLETE").write_text("")
    prune(tmp_path, 5, keep=2)  # step 5 just written
    # 4 and 5 kept; 1 and 2 removed; only complete checkpoints are pruned (3 and 6 are not checkpoints: a save in
    # progress is step_N.tmp, removed by the next save; see test_checkpoints)
    assert sorted(os.listdir(tmp_path)) == ["step_000003", "step_000004", "step_000005", "step_000006"]
    prune(tmp_path, 5, keep=0)
    assert len(os.listdir(tmp_path)) == 4
