"""Shared-memory segments a test session leaves in ``/dev/shm``: found, removed and reported.

vLLM's engine processes create ``psm_*`` segments (message queues, 24-160 MiB each) and ``sem.mp-*`` locks; the
weight sync's shm backend writes ``ivgr_sync_v<version>_<pid>_*`` folders. A process killed without cleanup
leaves them in RAM until the machine reboots. Other users of the machine create the same kinds of names at the
same time, so a name that appeared during the session is not enough: a segment is this session's when a process
of the session mapped it (seen in ``/proc/<pid>/maps`` by a poll every ``interval_s``) or, for ``ivgr_*``
folders, when the PID in its name is one of the session's processes. The session's processes: the descendants of
``root_pid``, and every process whose environment carries ``marker`` (Ray processes started by ``ray start``
daemonise away from the tree but inherit the environment).
"""

from __future__ import annotations

import os
import re
import shutil
import threading
import time
from dataclasses import dataclass, field

from ivgr_dist.runtime.shm_segments import SHM_ROOT, mapped_segments, unlink_segments

PREFIXES = ("psm_", "sem.mp-", "ivgr_")
_IVGR_PID = re.compile(r"^ivgr_.*?_(\d+)_")


def _parents() -> dict[int, int]:
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    out[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    return out


def _process_name(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()[:80] or "?"
    except OSError:
        return "?"


def _has_marker(pid: int, marker: bytes) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return marker in f.read().split(b"\0")
    except OSError:
        return False


@dataclass
class Leak:
    name: str
    removed: bool
    """Unlinked at the end of the session; False: a live process of the session still maps it (left alone)."""
    holders: list[int] = field(default_factory=list)
    first: str = ""
    """Where it was first seen mapped: the test then running and the mapping process (empty: not seen mapped)."""
    last: str = ""
    """The test running when a process of the session was last seen mapping it (its holders died after that)."""


class ShmWatch:
    """Polls the session's processes for the segments they map; :meth:`finish` lists (and removes) the new ones
    of the session still in ``root`` at its end."""

    def __init__(self, root_pid: int, marker: str | None = None, interval_s: float = 2.0):
        self.root_pid, self.interval_s = root_pid, interval_s
        self.marker = marker.encode() if marker else None
        self.before = self._entries()
        self.pids: set[int] = {root_pid}  # every process of the session seen so far
        self.seen: set[str] = set()  # segments a process of the session mapped
        self.current = ""  # the test running now (pytest_runtest_logstart sets it)
        self.first: dict[str, str] = {}
        self.last: dict[str, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="shm-watch", daemon=True)

    def _entries(self) -> set[str]:
        return {n for n in os.listdir(SHM_ROOT) if n.startswith(PREFIXES)}

    def session_pids(self) -> set[int]:
        """The session's live processes: ``root_pid``'s descendants and the processes carrying ``marker``."""
        parents = _parents()
        children: dict[int, list[int]] = {}
        for pid, ppid in parents.items():
            children.setdefault(ppid, []).append(pid)
        live, todo = {self.root_pid}, [self.root_pid]
        while todo:
            for child in children.get(todo.pop(), []):
                if child not in live:
                    live.add(child)
                    todo.append(child)
        if self.marker is not None:
            live |= {pid for pid in parents if pid not in live and _has_marker(pid, self.marker)}
        return live & (set(parents) | {self.root_pid})

    def poll(self) -> None:
        live = self.session_pids()
        self.pids |= live
        mapped = mapped_segments(live, PREFIXES)
        current = self.current or "(between tests)"
        for name, holders in mapped.items():
            if name not in self.first:
                pid = min(holders)
                self.first[name] = f"{current}, by pid {pid} ({_process_name(pid)})"
            self.last[name] = current
        self.seen |= set(mapped)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.poll()
            except Exception:  # noqa: BLE001 - a watcher must not break the session
                continue

    def start(self) -> ShmWatch:
        self._thread.start()
        return self

    def _ours(self, name: str) -> bool:
        if name in self.seen:
            return True
        m = _IVGR_PID.match(name)
        return m is not None and int(m.group(1)) in self.pids

    def finish(self, grace_s: float = 10.0) -> list[Leak]:
        """Stop polling; the session's new segments still present (after up to ``grace_s`` for its exiting
        processes to let go of them), each unlinked unless a live process of the session still maps it."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self.poll()
        deadline = time.monotonic() + grace_s
        while True:
            ours = sorted(n for n in self._entries() - self.before if self._ours(n))
            held = mapped_segments(self.session_pids(), PREFIXES) if ours else {}
            if not any(n in held for n in ours) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        leaks = []
        for name in ours:
            where = {"first": self.first.get(name, ""), "last": self.last.get(name, "")}
            if name in held:
                leaks.append(Leak(name, False, sorted(held[name]), **where))
                continue
            path = os.path.join(SHM_ROOT, name)
            if os.path.isdir(path):  # an ivgr_sync_* folder of bucket files
                shutil.rmtree(path, ignore_errors=True)
            else:
                unlink_segments([name])
            leaks.append(Leak(name, True, **where))
        return leaks


def report(leaks: list[Leak]) -> str:
    lines = [f"{len(leaks)} shared-memory segment(s) created by this session were left in {SHM_ROOT}:"]
    for leak in leaks:
        what = "removed now" if leak.removed else f"still mapped by live process(es) {leak.holders}, left alone"
        lines.append(f"  {leak.name} ({what})")
        if leak.first:
            lines.append(f"    first mapped during {leak.first}; last seen mapped during {leak.last}")
    lines.append(
        "  psm_*/sem.mp-*: vLLM engine processes killed without cleanup (see ivgr_dist.runtime.shm_segments); "
        "ivgr_sync_*: a weight push interrupted in the driver"
    )
    return "\n".join(lines)
