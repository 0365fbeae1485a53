"""``ivgr-dist train`` decisions taken before anything starts (no Ray, no engines, no learners)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from ivgr_dist.driver.checkpoints import latest_checkpoint


class _Started(RuntimeError):
    """Raised by the guards below: something was started that should not have been."""


@pytest.fixture
def no_start(monkeypatch):
    """``init_ray`` and the warm start raise :class:`_Started` instead of starting anything."""

    def refuse(what):
        def fn(*args, **kwargs):
            raise _Started(what)

        return fn

    monkeypatch.setattr("ivgr_dist.runtime.startup.init_ray", refuse("init_ray"))
    monkeypatch.setattr("ivgr_dist.commands.sft.run_sft", refuse("run_sft"))


def _checkpoint(out, step: int, complete: bool = True):
    path = out / "checkpoints" / f"step_{step:06d}"
    path.mkdir(parents=True)
    state = {"step": step, "weight_version": step, "sampler": {}, "scorer": {}}
    (path / "trainer_state.json").write_text(json.dumps(state))
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
    ("flags", "overrides"),
    [
        (["--overwrite"], ["trainer.max_steps=3", "trainer.resume=false"]),  # starts over: not finished
        ([], ["trainer.max_steps=4"]),  # one more step to train
    ],
)
def test_a_job_with_work_left_starts(tmp_path, no_start, flags, overrides):
    from ivgr_dist.cli import main

    _checkpoint(tmp_path / "run", 3)
    with pytest.raises(_Started, match="init_ray"):
        main(["train", *flags, f"trainer.output_dir={tmp_path / 'run'}", *overrides])
    with pytest.raises(_Started, match="init_ray"):  # no checkpoint at all
        main(["train", f"trainer.output_dir={tmp_path / 'fresh'}", "trainer.max_steps=3"])


@pytest.mark.parametrize("command", ["train", "sft"])
def test_the_sft_reuse_message_names_an_option_of_the_command_run(tmp_path, monkeypatch, caplog, command):
    """A reused warm start says how to train it again with an option the command that ran it accepts."""
    import re

    from ivgr_dist.cli import _parser, main

    monkeypatch.setattr("ivgr_dist.runtime.startup.init_ray", lambda cfg: None)

    def no_trainer(cfg, scorer=None):
        raise _Started("Trainer")

    monkeypatch.setattr("ivgr_dist.driver.trainer.Trainer", SimpleNamespace(from_config=no_trainer))
    (tmp_path / "run" / "sft_model").mkdir(parents=True)
    (tmp_path / "run" / "sft_model" / "config.json").write_text("{}")
    # reward.num_workers=0: `train` builds its scorer (and checks the judge) before the warm start; in the driver
    args = [command, f"trainer.output_dir={tmp_path / 'run'}", "sft.enabled=true", "reward.num_workers=0"]
    with caplog.at_level("INFO", logger="ivgr_dist.commands.sft"):
        if command == "train":
            with pytest.raises(_Started, match="Trainer"):  # the warm start was reused; RL would start now
                main(args)
        else:
            assert main(args) == 0
    (message,) = [r.getMessage() for r in caplog.records if "reusing it" in r.getMessage()]
    options = re.findall(r"(?<![\w-])--[a-z][\w-]*", message)
    assert options, message
    for option in options:
        parsed = _parser().parse_args([command, option])  # exits (SystemExit) on an option it does not take
        assert any(v is True for v in vars(parsed).values()), (command, option)
    assert f"ivgr-dist {command} --" in message and "sft.output_dir" in message


def test_train_overwrite_sft_retrains_the_warm_start(tmp_path, monkeypatch):
    from ivgr_dist.cli import main

    calls = []

    def run_sft(cfg, overwrite=False, command="sft"):
        calls.append((overwrite, command))
        raise _Started("run_sft")

    monkeypatch.setattr("ivgr_dist.runtime.startup.init_ray", lambda cfg: None)
    monkeypatch.setattr("ivgr_dist.commands.sft.run_sft", run_sft)
    base = ["train", f"trainer.output_dir={tmp_path / 'run'}", "sft.enabled=true", "reward.num_workers=0"]
    for argv in (base, [base[0], "--overwrite-sft", *base[1:]]):
        with pytest.raises(_Started):
            main(argv)
    assert calls == [(False, "train"), (True, "train")]


def _used_run(run):
    """An earlier run's directory: checkpoints 10-12, logs, metrics, an export, and its warm start."""
    for step in (10, 11, 12):
        _checkpoint(run, step)
    for name in ("metrics.jsonl", "trained.jsonl", "samples.jsonl", "wandb_run_id"):
        (run / name).write_text("earlier run\n")
    for name in ("logs", "model", "sft_model", "sft_logs"):
        (run / name).mkdir()
        (run / name / "file").write_text("earlier run\n")


@pytest.mark.parametrize("resume", ["trainer.resume=false", "trainer.resume=true"])
def test_overwrite_moves_the_earlier_run_aside_and_keeps_the_warm_start(tmp_path, no_start, resume):
    from ivgr_dist.cli import main

    run = tmp_path / "run"
    _used_run(run)
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    with pytest.raises(_Started, match="init_ray"):  # then the run starts, at step 1
        main(["train", "--overwrite", f"trainer.output_dir={run}", resume, "trainer.max_steps=3"])
    (aside,) = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    moved = sorted(p.relative_to(aside) for p in aside.rglob("*"))
    assert moved == [p for p in before if p.parts[0] not in ("sft_model", "sft_logs")]  # nothing lost
    assert (aside / "logs" / "file").read_text() == "earlier run\n"
    assert sorted(p.name for p in run.iterdir()) == ["logs", "sft_logs", "sft_model"]  # logs/: this run's, new
    assert (run / "sft_model" / "file").is_file() and not (run / "logs" / "file").exists()


def test_resume_false_in_a_used_directory_is_refused_before_anything_starts(tmp_path, no_start, capsys):
    from ivgr_dist.cli import main

    run = tmp_path / "run"
    _used_run(run)
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    assert main(["train", f"trainer.output_dir={run}", "trainer.resume=false", "trainer.max_steps=3"]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"ivgr-dist train: trainer.resume=false but {run / 'checkpoints'} holds an earlier run's")
    assert "step_000012" in line and "ivgr-dist train --overwrite" in line and "trainer.output_dir" in line
    assert sorted(p.relative_to(run) for p in run.rglob("*") if p.name != "driver.log") == before  # untouched
