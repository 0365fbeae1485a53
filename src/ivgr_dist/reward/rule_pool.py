"""``RulePool``: math-verify under a hard per-call time bound, in a few spawned processes.

Why: math-verify (SymPy) can run for minutes on a short answer. ``9^{99999999}`` passes the ``rules._math_risky``
screen, and CPython then computes a 95-million-digit power in one C call that holds the GIL. math-verify's own
timeout is ``SIGALRM``, which works only in a main thread (and not even there inside one C call), while reward
workers score on Ray's asyncio thread and the driver on a background loop or the producer thread: such an answer
stalled a whole reward worker. A process can be killed at any moment, so the call runs in one.

- ``processes`` children, started on the first call, each a fresh interpreter (fork + exec, as multiprocessing's
  *spawn* start method does: forking a threaded Ray worker or driver without exec is unsafe) that runs only this
  module's child loop. Each imports math-verify/SymPy once and warms it up before it reports ready (~1 s); a call
  waits at most :data:`START_TIMEOUT_S` for a ready child (not part of ``timeout_s``). Children are started with
  ``subprocess`` and talk over a socket pair wrapped in ``multiprocessing.connection.Connection``, not through
  ``multiprocessing.get_context("spawn").Process``: that re-imports the parent's ``__main__`` in every child, which
  in a reward worker is Ray's ``default_worker.py`` (measured: ``import ray``, ~700 modules, +0.7-1.2 s per child)
  and in a script without a ``__main__`` guard starts children recursively.
- :meth:`RulePool.math_match` sends a whole group's ``(prediction, ground truth)`` pairs in ONE message; the child
  answers one verdict per pair as it goes. A pair without a verdict ``timeout_s`` after the previous verdict (or
  the send) is a runaway: the child is killed (SIGKILL) and replaced, that pair's verdict is ``None``, and the
  pairs after it go, again in one message, to the next ready child (a warm one when ``processes`` >= 2, so only the
  runaway pair costs time). A child that dies on a pair (segfault, out of memory) is handled the same way.
- Inside the child, math-verify's own ``SIGALRM`` timeout (the child runs it in its main thread) is a third of
  ``timeout_s`` in whole seconds (``signal.alarm``'s unit; off below 3 s) per parse / verify call, so a slow call
  that SymPy can be interrupted in ends with a 0 verdict (then the judge decides, as before) and keeps its child;
  the hard bound catches the rest (a long C call, or three slow stages).
- Children die with their parent: each arms ``PR_SET_PDEATHSIG`` = SIGKILL (Linux; elsewhere a thread polls
  ``os.getppid``, which cannot help while a C call holds the GIL). The kernel sends that signal when the THREAD
  that forked the child ends, so every child is started from one spawner thread that lives as long as the pool
  (a child started from an ``asyncio.run`` executor thread would be killed when that run ends).
  :meth:`RulePool.close` kills them all.

Thread-safe: calls from several threads share the children (each call holds one child at a time).
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection

from ivgr_dist.quote import short_repr
from ivgr_dist.reward.rules import MAX_ANSWER_CHARS

__all__ = ["PROCESSES", "START_TIMEOUT_S", "RulePool"]

log = logging.getLogger(__name__)

PROCESSES = 2
"""Children per pool: one stays warm while a runaway's child is killed and its replacement starts."""
START_TIMEOUT_S = 120.0
"""Longest wait for a child to import math-verify and report ready (~1 s on an idle machine)."""
_START_FAILURES = 3
"""Children in a row that fail to start before a call raises (a broken installation, not a runaway input)."""
_READY = "ready"
# The child's command line: the parent's sys.path (as multiprocessing's spawn passes it), then the loop below.
_BOOT = (
    "import json, sys; sys.path[:] = json.loads(sys.argv[1]); "
    "from ivgr_dist.reward.rule_pool import _child_main; _child_main(*map(int, sys.argv[2:]))"
)


# ----------------------------------------------------------------------------------------------- child


def _die_with_parent(parent_pid: int) -> None:
    try:
        import ctypes

        if ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL) != 0:  # 1 = PR_SET_PDEATHSIG
            raise OSError(ctypes.get_errno(), "prctl")
    except (OSError, AttributeError):  # not Linux: poll (works while the GIL is free)

        def watch() -> None:
            while os.getppid() == parent_pid:
                time.sleep(1.0)
            os._exit(1)

        threading.Thread(target=watch, daemon=True).start()
    if os.getppid() != parent_pid:  # the parent died before the signal was armed
        os._exit(1)


def _child_main(fd: int, parent_pid: int, soft_timeout_s: int, max_chars: int) -> None:
    """Loop of a child: a list of (pred, gt) pairs in, one float verdict per pair out; ``None`` or EOF ends it."""
    _die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it closes the pool
    # math-verify warns that its timeout is off (below 3 s) and logs its own timeouts: the parent reports runaways.
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    from ivgr_dist.reward.rules import math_match

    conn = Connection(fd)
    math_match("1", "1", timeout_s=soft_timeout_s)  # import and warm up SymPy / math-verify before "ready"
    conn.send(_READY)
    while True:
        try:
            pairs = conn.recv()
        except (EOFError, OSError):
            return
        if pairs is None:
            return
        for pred, gt in pairs:
            conn.send(math_match(pred, gt, timeout_s=soft_timeout_s, max_chars=max_chars))


# ---------------------------------------------------------------------------------------------- parent


class _Child:
    """One child process and the parent's end of its socket."""

    def __init__(self, soft_timeout_s: int, max_chars: int):
        mine, theirs = socket.socketpair()
        try:
            fd = theirs.fileno()
            args = [json.dumps([str(p) for p in sys.path]), fd, os.getpid(), soft_timeout_s, max_chars]
            self.process = subprocess.Popen(
                [sys.executable, "-c", _BOOT, *map(str, args)], pass_fds=(fd,), stdin=subprocess.DEVNULL
            )
        except BaseException:
            mine.close()
            raise
        finally:
            theirs.close()
        self.conn = Connection(mine.detach())
        self.ready = False

    def wait_ready(self, timeout_s: float) -> bool:
        """Whether the child has reported ready, waiting up to ``timeout_s`` for the report (0: never blocks)."""
        try:
            if not self.ready and self.conn.poll(timeout_s):
                self.ready = self.conn.recv() == _READY
        except (EOFError, OSError):  # it died while starting
            return False
        return self.ready

    def run(self, pairs: Sequence[tuple[str, str]], timeout_s: float) -> list[float]:
        """Verdicts of ``pairs`` in order; fewer than ``len(pairs)`` when the child passed ``timeout_s`` on one
        pair, died, or its socket broke (the caller then kills it)."""
        verdicts: list[float] = []
        try:
            self.conn.send(list(pairs))
            for _ in pairs:
                if not self.conn.poll(timeout_s):
                    break
                verdicts.append(float(self.conn.recv()))
        except (EOFError, OSError):
            pass
        return verdicts

    def alive(self) -> bool:
        return self.process.poll() is None

    def kill(self) -> None:
        try:
            self.process.kill()
            self.process.wait(timeout=5)
        except (OSError, subprocess.TimeoutExpired) as exc:  # already gone, or stuck in the kernel
            log.debug("rule child %d: %r", self.process.pid, exc)
        self.conn.close()


class RulePool:
    """A few spawned processes running ``rules.math_match`` under a hard per-pair time bound (see the module
    docstring). ``timeout_s``: ``reward.rule_timeout_s``; ``max_chars``: ``algorithm.max_answer_chars``."""

    def __init__(self, timeout_s: float, processes: int = PROCESSES, max_chars: int = MAX_ANSWER_CHARS):
        if not (isinstance(timeout_s, (int, float)) and math.isfinite(timeout_s) and timeout_s > 0):
            raise ValueError(f"rule timeout_s={timeout_s!r}: must be a finite number of seconds > 0")
        if processes < 1:
            raise ValueError(f"processes={processes!r}: must be >= 1")
        self.timeout_s, self.processes, self.max_chars = float(timeout_s), int(processes), int(max_chars)
        self._soft_timeout_s = int(timeout_s // 3)  # 0: math-verify's own timeout off
        self._cond = threading.Condition()
        self._idle: list[_Child] = []
        self._children: set[_Child] = set()
        self._starting = 0
        self._start_failures = 0
        self._start_error: str | None = None
        self._spawner: ThreadPoolExecutor | None = None
        self._closed = False
        self.timeouts = 0
        """Pairs that passed ``timeout_s`` or crashed their child (their verdict was ``None``)."""

    # public -------------------------------------------------------------------------------------
    def math_match(self, pairs: Sequence[tuple[str, str]]) -> list[float | None]:
        """``rules.math_match(pred, gt)`` of every pair (1.0 / 0.0), or ``None`` for a pair that passed
        ``timeout_s`` (its child was killed and replaced) or crashed its child. Blocks: call it off an event loop
        (``asyncio.to_thread``). Raises ``RuntimeError`` when no child can be started, or after :meth:`close`."""
        out: list[float | None] = [None] * len(pairs)
        k = 0
        while k < len(pairs):
            child = self._acquire()
            got = child.run(pairs[k:], self.timeout_s)
            out[k : k + len(got)] = got
            k += len(got)
            if k == len(pairs):
                self._release(child)
                break
            pred, gt = pairs[k]
            how = f"passed reward.rule_timeout_s={self.timeout_s:g} s" if child.alive() else "crashed its process"
            log.warning(
                "math-verify %s on prediction %s (ground truth %s); the process is killed and replaced, the "
                "rollout scored by reward.judge.on_failure (reward/rule_timeouts)",
                how,
                short_repr(pred, 60),
                short_repr(gt, 60),
            )
            self._discard(child)
            with self._cond:
                self.timeouts += 1
            k += 1  # out[k] stays None
        return out

    def close(self) -> None:
        """Kill every child and stop the spawner; later calls raise."""
        with self._cond:
            self._closed = True
            children, self._children, self._idle = list(self._children), set(), []
            spawner, self._spawner = self._spawner, None
            self._cond.notify_all()
        for child in children:
            child.kill()
        if spawner is not None:  # a start under way finishes, sees the pool closed and kills its child
            spawner.shutdown(wait=True, cancel_futures=True)

    def pids(self) -> list[int]:
        """PIDs of the live children (tests, diagnostics)."""
        with self._cond:
            return [c.process.pid for c in self._children]

    # children -----------------------------------------------------------------------------------
    def _start_one(self) -> None:
        """Start a child from the spawner thread (see the module docstring); called with ``_cond`` held."""
        if self._spawner is None:
            self._spawner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ivgr-rule-spawner")
        self._starting += 1
        self._spawner.submit(self._spawn)

    def _spawn(self) -> None:
        try:
            child = _Child(self._soft_timeout_s, self.max_chars)
        except Exception as exc:  # noqa: BLE001 - reported to the waiting callers
            log.error("could not start a rule process: %r", exc)
            with self._cond:
                self._starting -= 1
                self._start_failures += 1
                self._start_error = repr(exc)
                self._cond.notify_all()
            return
        with self._cond:
            self._starting -= 1
            closed = self._closed
            if not closed:
                self._children.add(child)
                self._idle.append(child)
                self._cond.notify_all()
        if closed:
            child.kill()

    def _acquire(self) -> _Child:
        while True:
            with self._cond:
                while True:
                    if self._closed:
                        raise RuntimeError("RulePool is closed")
                    if self._start_failures >= _START_FAILURES:
                        raise RuntimeError(
                            f"{self._start_failures} rule processes in a row failed to start within "
                            f"{START_TIMEOUT_S:g} s (last: {self._start_error}); math-verify cannot run"
                        )
                    while len(self._children) + self._starting < self.processes:
                        self._start_one()
                    if self._idle:  # a child that is ready if there is one
                        child = next((c for c in self._idle if c.wait_ready(0)), self._idle[0])
                        self._idle.remove(child)
                        break
                    self._cond.wait(timeout=1.0)
            if child.wait_ready(START_TIMEOUT_S):
                with self._cond:
                    self._start_failures = 0
                return child
            code = child.process.poll()
            log.error("a rule process was not ready after %g s (exit code %s); starting another", START_TIMEOUT_S, code)
            with self._cond:
                self._start_failures += 1
                self._start_error = f"exit code {code}"
            self._discard(child)

    def _release(self, child: _Child) -> None:
        with self._cond:
            if child in self._children:
                self._idle.append(child)
                self._cond.notify_all()
                return
        child.kill()  # the pool was closed meanwhile

    def _discard(self, child: _Child) -> None:
        child.kill()
        with self._cond:
            self._children.discard(child)
            if not self._closed:
                self._start_one()
            self._cond.notify_all()
