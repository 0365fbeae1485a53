"""POSIX shared-memory segments (``/dev/shm`` entries) that processes map, and removing the ones a killed
process group leaves behind.

vLLM's engine processes talk through shared-memory message queues (``multiprocessing.shared_memory``:
``/dev/shm/psm_*``, 160 MiB and 24 MiB each) and spawn-context locks (``/dev/shm/sem.mp-*``). Their creators
unlink them on a clean shutdown, and the ``multiprocessing`` resource tracker of the engine's process tree
unlinks what a crashed creator leaves; a SIGKILL of the whole tree (:meth:`RolloutWorker.kill_engine
<ivgr_dist.rollout.worker.RolloutWorker.kill_engine>`, which kills the tracker too) leaves them in
``/dev/shm`` (RAM) until the machine reboots. :func:`mapped_segments` read before such a kill names them.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

__all__ = ["ENGINE_SEGMENT_PREFIXES", "SHM_ROOT", "mapped_segments", "unlink_segments"]

SHM_ROOT = "/dev/shm"
ENGINE_SEGMENT_PREFIXES = ("psm_", "sem.mp-")
"""Names of the segments a vLLM engine's processes create for themselves (message queues, locks)."""


def mapped_segments(pids: Iterable[int], prefixes: tuple[str, ...] = ENGINE_SEGMENT_PREFIXES) -> dict[str, set[int]]:
    """``{segment name: pids mapping it}`` for the ``/dev/shm`` entries starting with one of ``prefixes`` that
    the given processes map (``/proc/<pid>/maps``; processes gone or not readable are skipped)."""
    marker = SHM_ROOT + "/"
    out: dict[str, set[int]] = {}
    for pid in pids:
        try:
            with open(f"/proc/{pid}/maps") as f:
                for line in f:
                    at = line.find(marker)
                    rest = line[at + len(marker) :].split() if at >= 0 else []
                    if rest and rest[0].startswith(prefixes) and "/" not in rest[0]:
                        out.setdefault(rest[0], set()).add(pid)
        except OSError:
            continue
    return out


def unlink_segments(names: Iterable[str]) -> list[str]:
    """Remove these ``/dev/shm`` entries; returns the ones that were there (processes still mapping one keep
    their mapping: only the name goes)."""
    removed = []
    for name in sorted(set(names)):
        try:
            os.unlink(os.path.join(SHM_ROOT, name))
        except FileNotFoundError:
            continue
        removed.append(name)
    return removed
