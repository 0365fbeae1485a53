"""pytest plugin (tests/conftest.py imports its hooks): at the end of the session, shared-memory segments the
session created and left in /dev/shm (vLLM's ``psm_*`` / ``sem.mp-*``, the shm weight sync's ``ivgr_sync_*``) are
removed, listed in a "shared memory left behind" section, and fail the session (exit status 1).

``IVGR_SHM_CHECK=0`` turns it off; ``IVGR_SHM_CHECK=report`` removes and lists them without failing (the slow
tier: its fault-injection jobs kill nodes and engine cores on purpose, and a process Ray kills with its node
cannot clean up); ``IVGR_SHM_CHECK_INTERVAL_S`` sets the poll interval (default 2 s). See
:mod:`support.shm_watch` for how a segment is told to be this session's.

Under pytest-xdist (the default tier runs ``-n 2``) every worker watches its own processes and hands its leaks to
the controller (``workeroutput``), which lists them and fails the run as one session would.
"""

from __future__ import annotations

import dataclasses
import os
import uuid

import pytest

MARKER_VAR = "IVGR_TEST_SESSION"


def pytest_sessionstart(session):
    if os.environ.get("IVGR_SHM_CHECK", "1") == "0" or not (os.path.isdir("/dev/shm") and os.path.isdir("/proc")):
        return
    from support.shm_watch import ShmWatch

    token = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    os.environ[MARKER_VAR] = token  # every process this session starts inherits it (Ray daemons included)
    interval = float(os.environ.get("IVGR_SHM_CHECK_INTERVAL_S", "2"))
    session.config.stash[_WATCH] = watch = ShmWatch(os.getpid(), f"{MARKER_VAR}={token}", interval_s=interval).start()
    _session_watch[:] = [watch]


@pytest.hookimpl(trylast=True)  # after the runner's own sessionfinish has torn down session-scoped fixtures
def pytest_sessionfinish(session, exitstatus):
    watch = session.config.stash.get(_WATCH, None)
    if watch is None:
        return
    leaks = watch.finish()
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:  # an xdist worker: the controller reports and fails (pytest_testnodedown)
        workeroutput[_WORKER_KEY] = [dataclasses.asdict(leak) for leak in leaks]
        return
    leaks = [*session.config.stash.get(_LEAKS, []), *leaks]
    session.config.stash[_LEAKS] = leaks
    if leaks and session.exitstatus == pytest.ExitCode.OK and os.environ.get("IVGR_SHM_CHECK") != "report":
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.hookimpl(optionalhook=True)  # a pytest-xdist hook: only called when the plugin runs
def pytest_testnodedown(node, error):
    """The xdist controller collects the leaks each worker found in its own processes."""
    from support.shm_watch import Leak

    found = [Leak(**leak) for leak in getattr(node, "workeroutput", {}).get(_WORKER_KEY, [])]
    if found:
        node.config.stash[_LEAKS] = [*node.config.stash.get(_LEAKS, []), *found]


def pytest_runtest_logstart(nodeid, location):
    """The watcher names the test that was running when it first and last saw each segment mapped."""
    if _session_watch:
        _session_watch[0].current = nodeid


def pytest_terminal_summary(terminalreporter):
    from support.shm_watch import report

    leaks = terminalreporter.config.stash.get(_LEAKS, None)
    if leaks:
        terminalreporter.section("shared memory left behind", red=True)
        terminalreporter.line(report(leaks))


_session_watch: list = []  # the session's watcher, for pytest_runtest_logstart (which gets no session)
_WATCH = pytest.StashKey()
_LEAKS = pytest.StashKey()
_WORKER_KEY = "ivgr_shm_leaks"
