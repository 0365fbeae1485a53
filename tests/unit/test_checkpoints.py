"""Checkpoints that cannot destroy a run (``ivgr_dist.driver.checkpoints``), with real DCP shards written and read in
this process: pruning never deletes a newer or the new checkpoint, a corrupt newest checkpoint falls back to
the previous one, a failed save leaves the previous one loadable, a crashed save is never loaded, and a model
directory is swapped, never missing."""

from __future__ import annotations

import errno
import json
import logging
import os
import threading
import warnings

import pytest

from ivgr_dist.driver import checkpoints
from ivgr_dist.driver.checkpoints import CheckpointError, CorruptCheckpoint

torch = pytest.importorskip("torch")


@pytest.fixture(autouse=True)
def _quiet_dcp():
    with warnings.catch_warnings():  # "torch.distributed is ... uninitialized, assuming ... a single process"
        warnings.simplefilter("ignore", UserWarning)
        yield


def _weights(step: int) -> dict:
    return {"w": torch.full((4, 3), float(step)), "b": torch.arange(3.0) + step}


def _writer(step: int):
    """The learner's part, as ``LearnerWorker.save_checkpoint`` writes it: real DCP shards of a small state dict
    whose values say which step wrote them."""

    def write(path):
        checkpoints.dcp_save(_weights(step), path)

    return write


def _loader(loaded: list):
    """Loads the learner's part as ``LearnerWorker.load_checkpoint`` does; records (step, a value it read)."""

    def load(found):
        out = {"w": torch.zeros(4, 3), "b": torch.zeros(3)}
        checkpoints.dcp_load(out, found.path / "learner")
        loaded.append((found.step, float(out["w"][0, 0])))

    return load


def _state(step: int) -> dict:
    return {"step": step, "weight_version": step, "sampler": {"epoch": 0, "pos": step}, "scorer": {}}


def _save(out, step: int, keep: int = 0):
    return checkpoints.save(out, step, _writer(step), _state(step), keep)


def _names(out) -> list[str]:
    return sorted(os.listdir(out / "checkpoints"))


def test_pruning_never_deletes_the_new_or_a_newer_checkpoint(tmp_path):
    """An old run's step_000010..12 in the directory (trainer.resume=false before it was refused), then new saves of
    steps 1..3 with keep=2: each new checkpoint survives; only the new step 1 goes (older than the one written)."""
    for step in (10, 11, 12):
        _save(tmp_path, step)
    for step in (1, 2, 3):
        path = _save(tmp_path, step, keep=2)
        assert (path / "COMPLETE").is_file() and checkpoints.read_state(path, step)["step"] == step
    assert _names(tmp_path) == [f"step_{s:06d}" for s in (2, 3, 10, 11, 12)]
    _save(tmp_path, 13, keep=2)  # the newest now: older ones beyond keep go, the new run's included
    assert _names(tmp_path) == ["step_000012", "step_000013"]


@pytest.mark.parametrize(
    ("content", "why"),
    [
        ("", "trainer_state.json is empty"),
        ('{"step": 2, "weight_ver', "is not JSON"),
        ('{"step": 2, "weight_version": 2}', "lacks ['sampler', 'scorer']"),
        ('{"step": 7, "weight_version": 2, "sampler": {}, "scorer": {}}', "says step=7, the directory step 2"),
        ("[1, 2]", "holds list, not an object"),
    ],
)
def test_a_corrupt_state_file_falls_back_to_the_previous_checkpoint(tmp_path, caplog, content, why):
    _save(tmp_path, 1)
    newest = _save(tmp_path, 2)
    (newest / "trainer_state.json").write_text(content)
    assert checkpoints.latest_checkpoint(tmp_path).step == 1  # the query skips it too
    loaded = []
    with caplog.at_level(logging.WARNING, logger="ivgr_dist.driver.checkpoints"):
        found = checkpoints.resume(tmp_path, _loader(loaded))
    assert found.step == 1 and loaded == [(1, 1.0)]
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert str(newest) in warning and why in warning
    # renamed so it is not tried again, nothing deleted
    assert _names(tmp_path) == ["step_000001", "step_000002.corrupt"]
    assert (tmp_path / "checkpoints" / "step_000002.corrupt" / "trainer_state.json").read_text() == content


def test_a_learner_shard_that_does_not_load_falls_back_to_the_previous_checkpoint(tmp_path, caplog):
    _save(tmp_path, 1)
    _save(tmp_path, 2)
    newest = _save(tmp_path, 3)
    shard = next((newest / "learner").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:20])  # truncated
    loaded = []
    with caplog.at_level(logging.WARNING, logger="ivgr_dist.driver.checkpoints"):
        found = checkpoints.resume(tmp_path, _loader(loaded))
    assert found.step == 2 and loaded == [(2, 2.0)]  # the previous one, its own values
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert str(newest) in warning and "DCP cannot load" in warning
    assert _names(tmp_path) == ["step_000001", "step_000002", "step_000003.corrupt"]


def test_a_rank_error_through_ray_is_recognised_as_corruption(tmp_path):
    """A rank's CorruptCheckpoint reaches the driver as LearnerGroup._gather's RuntimeError from a RayTaskError."""
    from ray.exceptions import RayTaskError

    _save(tmp_path, 1)
    _save(tmp_path, 2)

    def load(found):
        if found.step == 2:
            remote = RayTaskError("load_checkpoint", "traceback", CorruptCheckpoint("rank 1: bad shard"))
            try:
                raise remote.as_instanceof_cause()
            except Exception as exc:
                raise RuntimeError(f"learner rank 1 failed in load_checkpoint: {exc}") from exc

    assert checkpoints.resume(tmp_path, load).step == 1


def test_no_checkpoint_loads_or_another_error_stops_and_renames_nothing(tmp_path):
    _save(tmp_path, 1)
    _save(tmp_path, 2)

    def corrupt(found):
        raise CorruptCheckpoint(f"bad {found.step}")

    with pytest.raises(CheckpointError, match=r"no checkpoint in .*checkpoints loads \(step_000002: bad 2; step_00"):
        checkpoints.resume(tmp_path, corrupt)

    def unreachable(found):  # e.g. a rank that cannot see the files: the storage, not the checkpoint
        raise FileNotFoundError("learner rank 1 cannot see the checkpoint")

    with pytest.raises(FileNotFoundError):
        checkpoints.resume(tmp_path, unreachable)
    assert _names(tmp_path) == ["step_000001", "step_000002"]


def test_a_storage_fault_while_loading_stops_and_marks_nothing_corrupt(tmp_path, monkeypatch):
    """EIO / ESTALE from a network file system while a shard is read: the run stops naming the checkpoint, which
    stays as it is (renamed .corrupt and skipped, a good checkpoint would be lost to a transient fault)."""
    import torch.distributed.checkpoint.filesystem as dcp_fs

    from ivgr_dist.runtime.storage import StorageError

    _save(tmp_path, 1)
    _save(tmp_path, 2)

    def stale(*args, **kwargs):
        raise OSError(errno.ESTALE, os.strerror(errno.ESTALE))

    monkeypatch.setattr(dcp_fs.FileSystemReader, "read_data", stale)
    with pytest.raises(StorageError, match=r"cannot read checkpoint .*step_000002.*a storage fault"):
        checkpoints.resume(tmp_path, _loader([]))
    monkeypatch.undo()
    assert _names(tmp_path) == ["step_000001", "step_000002"]
    loaded = []
    assert checkpoints.resume(tmp_path, _loader(loaded)).step == 2 and loaded == [(2, 2.0)]


@pytest.mark.parametrize("where", ["learner", "state"])
def test_a_save_that_runs_out_of_space_leaves_the_previous_checkpoint(tmp_path, monkeypatch, where):
    import torch.distributed.checkpoint.filesystem as dcp_fs

    _save(tmp_path, 1)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    # a DCP shard write, or the driver's state file
    monkeypatch.setattr(*((dcp_fs, "_write_item") if where == "learner" else (checkpoints, "write_durable")), full)
    with pytest.raises(CheckpointError) as err:
        _save(tmp_path, 2, keep=2)
    monkeypatch.undo()
    message = str(err.value)
    assert str(tmp_path / "checkpoints" / "step_000002.tmp") in message and "No space left" in message
    assert "step_000001" in message  # the checkpoint a resume would take
    assert _names(tmp_path) == ["step_000001"]  # no step_000002, not even a partial one
    loaded = []
    assert checkpoints.resume(tmp_path, _loader(loaded)).step == 1 and loaded == [(1, 1.0)]


def test_a_crashed_save_is_never_loaded_and_is_cleaned_up(tmp_path):
    _save(tmp_path, 1)
    crashed = _save(tmp_path, 2)
    crashed.rename(crashed.with_name("step_000002.tmp"))  # complete-looking, but never renamed in
    assert checkpoints.latest_checkpoint(tmp_path).step == 1
    assert checkpoints.resume(tmp_path, _loader([])).step == 1
    _save(tmp_path, 2)  # the resumed run saves step 2 again
    assert _names(tmp_path) == ["step_000001", "step_000002"]


def test_saving_a_step_again_replaces_it_whole(tmp_path):
    """The newest checkpoint did not load, the run resumed from the previous one and now saves that step again."""
    _save(tmp_path, 1)
    old = checkpoints.save(tmp_path, 2, _writer(99), _state(2), keep=0)
    (old / "stale-marker").write_text("from the first save")
    new = _save(tmp_path, 2)
    assert new == old and not (new / "stale-marker").exists()
    loaded = []
    checkpoints.resume(tmp_path, _loader(loaded))
    assert loaded == [(2, 2.0)]
    assert _names(tmp_path) == ["step_000001", "step_000002"]


def _model(path, tag: str):
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"tag": tag}))
    (path / "model.safetensors").write_bytes(os.urandom(4096))
    return path


def test_replace_dir_never_leaves_the_directory_missing(tmp_path):
    if not checkpoints._exchange(_model(tmp_path / "a", "a"), _model(tmp_path / "b", "b")):
        pytest.skip("no renameat2(RENAME_EXCHANGE) on this file system")
    final = _model(tmp_path / "model", "v0")
    stop, missing, seen = threading.Event(), [], set()

    def watch():
        while not stop.is_set():
            try:
                seen.add(json.loads((final / "config.json").read_text())["tag"])
            except FileNotFoundError:
                missing.append(1)

    reader = threading.Thread(target=watch)
    reader.start()
    try:
        for i in range(1, 201):
            checkpoints.replace_dir(_model(tmp_path / ".model.tmp", f"v{i}"), final)
    finally:
        stop.set()
        reader.join()
    assert not missing and len(seen) > 1
    assert json.loads((final / "config.json").read_text())["tag"] == "v200"
    assert sorted(os.listdir(tmp_path)) == ["a", "b", "model"]  # each old version removed


def test_replace_dir_without_exchange_puts_the_old_directory_back_on_failure(tmp_path, monkeypatch):
    """Where renameat2 cannot exchange (NFS): rename aside, rename in; a failed rename-in restores the old one."""
    final = _model(tmp_path / "model", "old")
    monkeypatch.setattr(checkpoints, "_exchange", lambda a, b: False, raising=False)
    real = os.rename

    def failing(src, dst, *a, **kw):
        if os.fspath(src).endswith(".tmp"):
            raise OSError(errno.EIO, "I/O error", os.fspath(src))
        return real(src, dst, *a, **kw)

    monkeypatch.setattr(os, "rename", failing)
    new = _model(tmp_path / ".model.tmp", "new")
    with pytest.raises(OSError, match="I/O error"):
        checkpoints.replace_dir(new, final)
    monkeypatch.setattr(os, "rename", real)
    assert json.loads((final / "config.json").read_text())["tag"] == "old"
    checkpoints.replace_dir(new, final)  # the next try succeeds: two renames, the old one removed
    assert json.loads((final / "config.json").read_text())["tag"] == "new"
    assert sorted(os.listdir(tmp_path)) == ["model"]
