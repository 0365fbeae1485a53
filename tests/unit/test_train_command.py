"""``ivgr-dist train`` decisions taken before anything starts (no Ray, no engines, no learners)."""

from __future__ import annotations

import json

import pytest

from ivgr_dist.checkpoints import latest_checkpoint


class _Started(RuntimeError):
    """Raised by the guards below: something was started that should not have been."""


@pytest.fixture
def no_start(monkeypatch):
    """``init_ray`` and the warm start raise :class:`_Started` instead of starting anything."""

    def refuse(what):
        def fn(*args, **kwargs):
            raise _Started(what)

        return fn

    monkeypatch.setattr("ivgr_dist.trainer.init_ray", refuse("init_ray"))
    monkeypatch.setattr("ivgr_dist.sft.run_sft", refuse("run_sft"))


def _checkpoint(out, step: int, complete: bool = True):
    path = out / "checkpoints" / f"step_{step:06d}"
    path.mkdir(parents=True)
    (path / "trainer_state.json").write_text(json.dumps({"step": step, "weight_version": step}))
    if complete:
        (path / "COMPLETE").write_text("0")
    return path


def test_latest_checkpoint_is_the_newest_complete_one(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    (tmp_path / "checkpoints").mkdir()
    assert latest_checkpoint(tmp_path) is None
    _checkpoint(tmp_path, 2)
    three = _checkpoint(tmp_path, 3)
    _checkpoint(tmp_path, 4, complete=False)  # interrupted while saving
    found = latest_checkpoint(tmp_path)
    assert found.path == three and found.step == 3 and found.state["weight_version"] == 3


@pytest.mark.parametrize("sft", [False, True])
def test_a_finished_job_says_nothing_to_do_before_starting_anything(tmp_path, no_start, capsys, sft):
    from ivgr_dist.cli import main

    _checkpoint(tmp_path / "run", 3)
    args = ["train", f"trainer.output_dir={tmp_path / 'run'}", "trainer.max_steps=3", f"sft.enabled={sft}"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "nothing to do" in out and "raise trainer.max_steps" in out
    assert main([*args[:2], "trainer.max_steps=2", f"sft.enabled={sft}"]) == 0  # lowered below the checkpoint
    assert "nothing to do" in capsys.readouterr().out


@pytest.mark.parametrize(
    "overrides",
    [
        ["trainer.max_steps=3", "trainer.resume=false"],  # starts over: not finished
        ["trainer.max_steps=4"],  # one more step to train
    ],
)
def test_a_job_with_work_left_starts(tmp_path, no_start, overrides):
    from ivgr_dist.cli import main

    _checkpoint(tmp_path / "run", 3)
    with pytest.raises(_Started, match="init_ray"):
        main(["train", f"trainer.output_dir={tmp_path / 'run'}", *overrides])
    with pytest.raises(_Started, match="init_ray"):  # no checkpoint at all
        main(["train", f"trainer.output_dir={tmp_path / 'fresh'}", "trainer.max_steps=3"])
