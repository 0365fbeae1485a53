"""SIGINT/SIGTERM handling: raise outside the RL loop, ask for a stop inside it, stop at once on a second signal,
and ``ivgr-dist`` turns an interrupt into one line and exit status 128 + signal."""

from __future__ import annotations

import os
import signal
import time

import pytest

from ivgr_dist.runtime.interrupts import Interrupted, graceful, raise_on_signals


def _deliver(signum: int) -> None:
    os.kill(os.getpid(), signum)
    time.sleep(0.05)  # the handler runs in the main thread at the next bytecode boundary


@pytest.fixture(autouse=True)
def _restore_handlers():
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    for s, h in saved.items():
        signal.signal(s, h)


@pytest.mark.parametrize(("signum", "code", "name"), [(signal.SIGINT, 130, "SIGINT"), (signal.SIGTERM, 143, "SIGTERM")])
def test_outside_the_loop_a_signal_raises_interrupted(signum, code, name):
    raise_on_signals()
    with pytest.raises(Interrupted) as err:
        _deliver(signum)
    assert err.value.exit_code == code and err.value.name == name
    assert not isinstance(err.value, Exception)  # `except Exception` in the roles must not swallow it


def test_inside_graceful_the_first_signal_is_a_request_and_handlers_come_back():
    raise_on_signals()
    seen = []
    with graceful(seen.append):
        _deliver(signal.SIGTERM)
        _deliver(signal.SIGINT)
    assert seen == [signal.SIGTERM, signal.SIGINT]
    with pytest.raises(Interrupted):  # the previous handler again
        _deliver(signal.SIGINT)


def test_trainer_stops_after_the_step_on_the_first_signal_and_at_once_on_the_second(tmp_path, capsys):
    from support.fake_roles import fake_config, fake_trainer

    trainer = fake_trainer(fake_config(tmp_path))  # in-process stand-ins for its roles
    trainer._step_in_progress, trainer.step = 7, 6  # inside step 7
    trainer._on_signal(signal.SIGINT)
    assert trainer.stop_signal == signal.SIGINT
    assert "SIGINT received: stopping after step 7 with its checkpoint" in capsys.readouterr().err
    with pytest.raises(Interrupted) as err:
        trainer._on_signal(signal.SIGTERM)
    assert err.value.signum == signal.SIGTERM


def test_cli_prints_one_line_with_the_newest_checkpoint_and_exits_128_plus_signal(tmp_path, monkeypatch, capsys):
    from ivgr_dist import cli

    run = tmp_path / "run"
    for step, complete in ((3, True), (4, True), (5, False)):  # step 5: written when the signal came
        d = run / "checkpoints" / f"step_{step:06d}"
        d.mkdir(parents=True)
        (d / "trainer_state.json").write_text(
            f'{{"step": {step}, "weight_version": 1, "sampler": {{}}, "scorer": {{}}}}'
        )
        if complete:
            (d / "COMPLETE").write_text("x")

    def interrupted_train(args):
        cli._run_config(args)
        raise Interrupted(signal.SIGTERM)

    monkeypatch.setattr(cli, "cmd_train", interrupted_train)
    code = cli.main(["train", f"trainer.output_dir={run}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 143
    assert len(err) == 1 and err[0].startswith("ivgr-dist train: interrupted by SIGTERM; newest checkpoint ")
    assert f"{run / 'checkpoints' / 'step_000004'}; resume: " in err[0] and f"trainer.output_dir={run}" in err[0]


def test_the_resume_hint_never_starts_the_run_over(tmp_path, monkeypatch, capsys):
    """A run started with ``--overwrite`` (or ``trainer.resume=false``) and stopped: the printed resume command
    leaves out what would move the run aside, retrain the warm start or be refused, and turns resuming on."""
    from ivgr_dist import cli

    run = tmp_path / "run"
    d = run / "checkpoints" / "step_000002"
    d.mkdir(parents=True)
    (d / "trainer_state.json").write_text('{"step": 2, "weight_version": 2, "sampler": {}, "scorer": {}}')
    (d / "COMPLETE").write_text("x")

    def interrupted_train(args):
        args.run_config = cli._config(args)  # as _run_config leaves it, without the fresh-start check
        raise Interrupted(signal.SIGTERM)

    monkeypatch.setattr(cli, "cmd_train", interrupted_train)
    argv = ["train", "--overwrite", "--overwrite-sft", f"trainer.output_dir={run}", "trainer.resume=false"]
    assert cli.main(argv) == 143
    err = capsys.readouterr().err.strip()
    resume = err.split("; resume: ", 1)[1]
    assert "--overwrite" not in resume and "trainer.resume=false" not in resume, resume
    assert resume.endswith(f"train trainer.output_dir={run} trainer.resume=true"), resume
