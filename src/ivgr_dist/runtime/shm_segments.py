"""POSIX shared-memory segments (``/dev/shm`` entries) that processes map, and removing the ones a killed
process group leaves behind.

vLLM's engine processes talk through shared-memory message queues (``multiprocessing.shared_memory``:
``/dev/shm/psm_*``, 160 MiB and 24 MiB each) and spawn-context locks (``/dev/shm/sem.mp-*``). Their creators
unlink them on a clean shutdown, and the ``multiprocessing`` resource tracker of the engine's process tree
unlinks what a crashed creator leaves; a SIGKILL of the whole tree (:meth:`RolloutWorker.kill_engine
<ivgr_dist.rollout.worker.RolloutWorker.kill_engine>`, which kills the tracker too) leaves them in
``/dev/shm`` (RAM) until the machine reboots. :func:`mapped_segments` read before such a kill names them.

vLLM's own shutdown of an engine (``LLM`` / ``AsyncLLM``) gives the EngineCore 5 s to exit and then SIGKILLs it;
on a loaded machine its TP workers' exit alone can take longer, and the killed core leaves its queues.
:func:`shutdown_llm` is that shutdown plus the clean-up, for code that runs a bare ``vllm.LLM`` (the rollout
benchmark, tests); the rollout engines do the same in ``RolloutWorker.shutdown``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

__all__ = [
    "ENGINE_SEGMENT_PREFIXES",
    "SHM_ROOT",
    "child_segments",
    "mapped_segments",
    "shutdown_llm",
    "unlink_segments",
]

SHM_ROOT = "/dev/shm"
ENGINE_SEGMENT_PREFIXES = ("psm_", "sem.mp-")
"""Names of the segments a vLLM engine's processes create for themselves (message queues, locks)."""
CPU_TP_SEGMENT_MARK = "-cpushm_"
"""In the names of vLLM-cpu's TP communication buffers (``<group>-tp:0-[0-1]-cpushm_<rank>``, 4 MiB per rank,
created by the TP workers: ``vllm/distributed/device_communicators/cpu_communicator.py``); engine segments too."""


def mapped_segments(
    pids: Iterable[int], prefixes: tuple[str, ...] = ENGINE_SEGMENT_PREFIXES, marks: tuple[str, ...] = ()
) -> dict[str, set[int]]:
    """``{segment name: pids mapping it}`` for the ``/dev/shm`` entries starting with one of ``prefixes`` (or
    holding one of ``marks``, such as :data:`CPU_TP_SEGMENT_MARK`) that the given processes map
    (``/proc/<pid>/maps``; processes gone or not readable are skipped)."""
    marker = SHM_ROOT + "/"
    out: dict[str, set[int]] = {}
    for pid in pids:
        try:
            with open(f"/proc/{pid}/maps") as f:
                for line in f:
                    at = line.find(marker)
                    rest = line[at + len(marker) :].split() if at >= 0 else []
                    if (
                        rest
                        and "/" not in rest[0]
                        and (rest[0].startswith(prefixes) or any(m in rest[0] for m in marks))
                    ):
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


def child_segments(others: Iterable[int] = ()) -> set[str]:
    """The engine segments this process's descendants (and the processes ``others``: an engine's TP workers that
    are Ray actors, not children) map and this process does not (a vLLM engine's message queues, locks and TP
    buffers, created at its start and mapped for its lifetime)."""
    import psutil

    pids = [p.pid for p in psutil.Process().children(recursive=True)] + list(others)
    marks = (CPU_TP_SEGMENT_MARK,)
    return set(mapped_segments(pids, marks=marks)) - set(mapped_segments([os.getpid()], marks=marks))


def shutdown_llm(llm, timeout_s: float = 15.0) -> list[str]:
    """Shut down a ``vllm.LLM`` made in this process and remove the shared memory its processes leave: vLLM's
    shutdown, then a wait (at most ``timeout_s``) for the engine's processes to exit (those still there, e.g. a
    stopped worker its killed core orphaned, are killed), then the segments they mapped are unlinked. Returns
    the names removed (empty after a clean exit). Call it once no other engine of this process is running (the
    segments are told apart by who maps them, not by engine)."""
    import psutil

    segments = child_segments()
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    try:
        llm.llm_engine.engine_core.shutdown()
    finally:
        procs = [p for p in psutil.Process().children(recursive=True) if p.pid in before]
        engine = []
        for p in procs:
            try:
                if "resource_tracker" not in " ".join(p.cmdline()):
                    engine.append(p)
            except psutil.Error:
                continue
        _, alive = psutil.wait_procs(engine, timeout=timeout_s)
        for p in alive:
            try:
                p.kill()
            except psutil.Error:
                continue
        psutil.wait_procs(alive, timeout=5)
        removed = unlink_segments(segments - set(mapped_segments([os.getpid()])))
    return removed
