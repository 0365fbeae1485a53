"""The quiet console: ivgr-dist's messages and errors on the console, everything in <output_dir>/logs/."""

from __future__ import annotations

import logging
import subprocess
import sys

from ivgr_dist.runtime import logs


def _console_and_file(tmp_path, verbose: bool, capsys):
    """Library names of our own: vLLM and Ray configure their loggers (own handlers, no propagation) once
    imported in this process, which integration tests do."""
    logs.setup_console(verbose)
    logs.setup_run_logs(tmp_path)
    logging.getLogger("ivgr_dist.driver.trainer").info("our info")
    logging.getLogger("ivgr_dist.driver.trainer").debug("our debug")
    logging.getLogger("some_library.module").warning("their warning")
    logging.getLogger("other_library").error("their error")
    for h in logging.getLogger().handlers:
        h.flush()
    return capsys.readouterr().err, (tmp_path / "logs" / "driver.log").read_text()


def test_quiet_console_shows_ours_and_errors_and_the_file_has_everything(tmp_path, capsys):
    console, file = _console_and_file(tmp_path, verbose=False, capsys=capsys)
    assert "our info" in console and "their error" in console
    assert "their warning" not in console and "our debug" not in console
    assert all(m in file for m in ("our info", "their warning", "their error"))
    assert logs.actor_env("engine-3") == {logs.ENV: str(tmp_path / "logs"), logs.LABEL: "engine-3"}
    assert logs.quiet()


def test_verbose_console_shows_everything_and_actors_keep_their_output(tmp_path, capsys):
    console, _ = _console_and_file(tmp_path, verbose=True, capsys=capsys)
    assert all(m in console for m in ("our info", "our debug", "their warning", "their error"))
    assert logs.actor_env("engine-3") == {} and not logs.quiet()


def test_an_actor_process_and_its_children_write_to_its_log_file(tmp_path):
    """fd-level redirect: Python prints, C-level writes and a child process's output all land in the file."""
    code = (
        "import os, subprocess, sys; from ivgr_dist.runtime.logs import redirect_actor_output; "
        "print(redirect_actor_output('engine-0')); print('from python'); os.write(2, b'from fd 2\\n'); "
        "sys.stdout.flush(); subprocess.run([sys.executable, '-c', 'print(\"from a child\")'])"
    )
    env = {"PATH": "/usr/bin:/bin", logs.ENV: str(tmp_path), logs.LABEL: "judge-1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "" and out.stderr == ""  # nothing left on the terminal
    text = (tmp_path / "judge-1.log").read_text()  # IVGR_LOG_LABEL names it
    assert all(m in text for m in ("judge-1.log", "from python", "from fd 2", "from a child")), text


def test_verbose_is_accepted_before_or_after_the_sub_command():
    from ivgr_dist.cli import _parser

    assert _parser().parse_args(["-v", "show-config"]).verbose
    assert _parser().parse_args(["show-config", "-v"]).verbose
    assert _parser().parse_args(["train", "--verbose", "trainer.max_steps=1"]).verbose
    assert not _parser().parse_args(["show-config"]).verbose
