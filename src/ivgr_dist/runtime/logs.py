"""Where output goes: a quiet console, everything in ``<output_dir>/logs/``.

By default the console shows ivgr-dist's own messages (INFO and up), progress bars and summaries, and any
ERROR; the rest (Ray, vLLM, transformers, math-verify, Python warnings) goes to ``logs/driver.log``. Each actor
(rollout engine, learner rank, reward worker, judge engine) writes its process output, the vLLM EngineCore's
and TP workers' included (they inherit it), to ``logs/<role>-<id>.log``. ``-v`` / ``--verbose`` restores the
old behaviour: DEBUG on the console and every actor's output forwarded to it by Ray.

The log directory reaches actors through ``IVGR_LOG_DIR`` in their runtime environment (:func:`actor_env`),
so it works on a cluster the job joined (``ray job submit``) as on a local one; ``trainer.output_dir`` is on
storage every node mounts (the storage contract), so every node writes there.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

ENV = "IVGR_LOG_DIR"
LABEL = "IVGR_LOG_LABEL"
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

_state = {"verbose": False, "dir": None}


class _ConsoleFilter(logging.Filter):
    """Quiet console: ivgr-dist's records at INFO and up, everyone's at ERROR and up."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or (
            record.name.split(".", 1)[0] == "ivgr_dist" and record.levelno >= logging.INFO
        )


def setup_console(verbose: bool) -> None:
    """The driver's console handler (``ivgr-dist`` calls it first)."""
    _state["verbose"] = verbose
    root = logging.getLogger()
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    for h in list(root.handlers):
        if getattr(h, "_ivgr", None) == "console":
            root.removeHandler(h)
    console = logging.StreamHandler(sys.stderr)
    console._ivgr = "console"  # type: ignore[attr-defined]
    console.setFormatter(logging.Formatter(FORMAT))
    if not verbose:
        console.addFilter(_ConsoleFilter())
        logging.captureWarnings(True)  # warnings.warn -> logger "py.warnings" -> the log file only
    root.addHandler(console)


def setup_run_logs(output_dir: str | Path) -> Path:
    """``<output_dir>/logs/``: the driver's full log (``driver.log``) and, unless verbose, every actor's."""
    path = Path(output_dir) / "logs"
    path.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    target = str((path / "driver.log").resolve())
    for h in list(root.handlers):  # one driver.log: this run's (a second run in the same process moves it)
        if getattr(h, "_ivgr", None) == "file" and h.baseFilename != target:
            root.removeHandler(h)
            h.close()
    if not any(getattr(h, "_ivgr", None) == "file" for h in root.handlers):
        handler = logging.FileHandler(target)
        handler._ivgr = "file"  # type: ignore[attr-defined]
        handler.setFormatter(logging.Formatter(FORMAT))
        root.addHandler(handler)
    _state["dir"] = str(path)
    return path


def quiet() -> bool:
    """Actor output goes to files, not to the console (``ray.init(log_to_driver=not quiet())``)."""
    return not _state["verbose"]


def actor_env(label: str | None = None) -> dict[str, str]:
    """Environment for the runtime_env of an actor we start: where its output goes and, optionally, its log
    file's name. Nothing when verbose, or when no run directory was set up (tests that build roles directly).
    In an actor that got it (the judge fleet starting judge engines) the directory comes from its environment."""
    where = None if _state["verbose"] else (_state["dir"] or os.environ.get(ENV))
    if not where:
        return {}
    return {ENV: where, **({LABEL: label} if label else {})}


def quiet_ray_logger() -> None:
    """Ray's driver logger has its own console handler; in quiet mode its records go through ours (file)."""
    if _state["verbose"]:
        return
    ray_log = logging.getLogger("ray")
    for h in list(ray_log.handlers):
        ray_log.removeHandler(h)
    ray_log.propagate = True


def redirect_actor_output(label: str) -> Path | None:
    """In an actor: send this process's stdout and stderr (file descriptors 1 and 2, so C++ and child processes'
    output too) to ``$IVGR_LOG_DIR/<label>.log`` (``$IVGR_LOG_LABEL`` names it when set). No-op without
    ``IVGR_LOG_DIR``."""
    where = os.environ.get(ENV)
    if not where:
        return None
    path = Path(where) / f"{os.environ.get(LABEL) or label}.log"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    except OSError as exc:  # a log file must never stop a run; the output stays in Ray's session logs
        print(f"ivgr-dist: cannot write {path}: {exc}; output stays in Ray's logs", file=sys.stderr)
        return None
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    return path
