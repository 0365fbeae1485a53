"""The session check of tests/conftest.py: shared-memory segments the session's processes leave in /dev/shm are
found, removed and reported; those of other processes on the machine are left alone."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

import pytest

from support.shm_watch import ShmWatch, report

pytestmark = pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="needs /dev/shm")

LEAKER = """
import sys, time
from multiprocessing import resource_tracker, shared_memory
shm = shared_memory.SharedMemory(create=True, size=4096)
resource_tracker.unregister(shm._name, "shared_memory")  # as if its tracker died with it
print(shm.name, flush=True)
time.sleep(600)
"""


def _leaker(env=None):
    """A process that creates a psm_ segment and would leave it; returns (process, segment name)."""
    proc = subprocess.Popen([sys.executable, "-c", LEAKER], stdout=subprocess.PIPE, text=True, env=env)
    return proc, proc.stdout.readline().strip()


def _stop(proc, name=None):
    proc.kill()
    proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()
    if name is not None and os.path.exists(f"/dev/shm/{name}"):
        os.unlink(f"/dev/shm/{name}")


def test_a_segment_left_by_a_killed_process_of_the_session_is_removed_and_reported():
    watch = ShmWatch(os.getpid())
    proc, name = _leaker()
    try:
        assert name.startswith("psm_")
        watch.current = "tests/x.py::test_leaks"
        watch.poll()  # the thread would, every interval_s
        watch.current = "tests/x.py::test_after"
        _stop(proc)
        assert os.path.exists(f"/dev/shm/{name}")  # leaked
        leaks = watch.finish(grace_s=1)
        assert [(leak.name, leak.removed) for leak in leaks] == [(name, True)]
        assert not os.path.exists(f"/dev/shm/{name}")
        assert name in report(leaks) and "removed now" in report(leaks)
        assert f"first mapped during tests/x.py::test_leaks, by pid {proc.pid} (" in report(leaks)
        assert "last seen mapped during tests/x.py::test_leaks" in report(leaks)
    finally:
        _stop(proc, name)


def test_a_segment_still_mapped_by_a_live_process_is_reported_and_left():
    watch = ShmWatch(os.getpid())
    proc, name = _leaker()
    try:
        leaks = watch.finish(grace_s=0.5)
        assert [(leak.name, leak.removed, leak.holders) for leak in leaks] == [(name, False, [proc.pid])]
        assert os.path.exists(f"/dev/shm/{name}")
    finally:
        _stop(proc, name)


def test_segments_of_other_processes_are_not_touched_unless_they_carry_the_marker():
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])  # the watched "session"
    marker = f"IVGR_TEST_SESSION=test-{uuid.uuid4().hex[:8]}"
    watch = ShmWatch(other.pid, marker=marker)
    stranger, s_name = _leaker()  # not a descendant of `other`, no marker
    kin, k_name = _leaker(env={**os.environ, "IVGR_TEST_SESSION": marker.split("=", 1)[1]})
    try:
        watch.poll()
        _stop(stranger)
        _stop(kin)
        leaks = watch.finish(grace_s=1)
        assert [leak.name for leak in leaks] == [k_name]
        assert os.path.exists(f"/dev/shm/{s_name}") and not os.path.exists(f"/dev/shm/{k_name}")
    finally:
        _stop(other)
        _stop(stranger, s_name)
        _stop(kin, k_name)


def test_an_ivgr_sync_folder_counts_when_the_pid_in_its_name_is_the_sessions():
    ours = f"/dev/shm/ivgr_sync_v1_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    theirs = f"/dev/shm/ivgr_sync_v1_1_{uuid.uuid4().hex[:8]}"  # pid 1 is no process of this session
    watch = ShmWatch(os.getpid())
    try:
        for d in (ours, theirs):
            os.mkdir(d)
            with open(f"{d}/bucket_00000.safetensors", "wb") as f:
                f.write(b"x")
        leaks = watch.finish(grace_s=0)
        assert [leak.name for leak in leaks] == [os.path.basename(ours)]
        assert not os.path.exists(ours) and os.path.exists(theirs)
    finally:
        import shutil

        shutil.rmtree(ours, ignore_errors=True)
        shutil.rmtree(theirs, ignore_errors=True)


def test_the_shm_sync_folder_names_its_creator():
    """What the check above relies on: a push's folder carries the PID of the process that made it."""
    from ivgr_dist.sync.fanout import EngineView
    from ivgr_dist.sync.shm import ShmWeightSync

    made = []

    class Learners:
        def push_weights(self, version, plan):
            made.append(os.path.basename(plan["dir"]))
            return [{"buckets": []}]

    class Rollouts:
        def engine_view(self):
            return EngineView({}, 1, {})

    ShmWeightSync(call=lambda *args: {}).push(Learners(), Rollouts(), version=3)
    assert made and made[0].startswith(f"ivgr_sync_v3_{os.getpid()}_")


SESSION_TEST = """
import os, subprocess, sys, time

CHILD = {child!r}


def test_starts_an_engine_like_process():
    proc = subprocess.Popen([sys.executable, "-c", CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    name = proc.stdout.readline().strip()
    with open(os.environ["SEGMENT_FILE"], "w") as f:  # an xdist worker's output does not reach the console
        f.write(name)
    time.sleep(1.0)  # the session's watcher polls every 0.2 s
    if os.environ["LEAK"] == "1":
        proc.kill()  # killed without cleanup: the segment stays
    else:
        proc.communicate("stop\\n")  # it unlinks its segment and exits
    proc.wait()
"""

CHILD = """
import sys
from multiprocessing import resource_tracker, shared_memory
shm = shared_memory.SharedMemory(create=True, size=4096)
resource_tracker.unregister(shm._name, "shared_memory")  # only the process itself cleans up
print(shm.name, flush=True)
sys.stdin.readline()
shm.close()
shm.unlink()
"""


@pytest.mark.parametrize(
    ("leak", "mode", "workers"), [(True, "1", 0), (False, "1", 0), (True, "report", 0), (True, "1", 2), (False, "1", 2)]
)
def test_a_session_that_leaves_a_segment_fails_and_lists_it(tmp_path, leak, mode, workers):
    """A whole pytest session with the plugin (as tests/conftest.py loads it): a test whose process leaves a
    psm_ segment makes the session fail, naming (and removing) the segment; a clean session passes; with
    ``IVGR_SHM_CHECK=report`` (the slow tier) the segment is named and removed but the session passes. With
    ``-n 2`` (the default tier) the worker that ran the test hands the leak to the controller, which fails."""
    from pathlib import Path

    (tmp_path / "test_session.py").write_text(SESSION_TEST.format(child=CHILD))
    tests_dir = Path(__file__).resolve().parents[1]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(tests_dir), *filter(None, [os.environ.get("PYTHONPATH")])]),
        "IVGR_SHM_CHECK_INTERVAL_S": "0.2",
        "LEAK": "1" if leak else "0",
        "IVGR_SHM_CHECK": mode,
        "SEGMENT_FILE": str(tmp_path / "segment"),
    }
    args = [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", "-p", "support.shm_check"]
    args += ["--rootdir", str(tmp_path), "-c", os.devnull, "-n", str(workers), str(tmp_path / "test_session.py")]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
    segment = (tmp_path / "segment").read_text()
    assert ("bringing up nodes" in proc.stdout) == (workers == 2), proc.stdout[-3000:]  # xdist ran it
    assert segment.startswith("psm_") and not os.path.exists(f"/dev/shm/{segment}")
    if leak:
        assert proc.returncode == (0 if mode == "report" else 1), proc.stdout[-3000:]
        assert "shared memory left behind" in proc.stdout and f"{segment} (removed now)" in proc.stdout
    else:
        assert proc.returncode == 0, proc.stdout[-3000:]
        assert "shared memory left behind" not in proc.stdout
