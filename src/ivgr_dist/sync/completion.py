"""When a queued collective has completed, and a gloo communicator that queues like NCCL (tests only).

With NCCL, ``group.broadcast(...).wait()`` returns once the operation is queued on a CUDA stream: a peer
that dies or hangs mid-broadcast is seen neither by ``wait()`` nor by a ``try``/``except`` around it, and
torch's NCCL watchdog ends the process once the operation has not completed within the group's timeout.
So the collective weight sync (``ivgr_dist.sync.collective``) asks every operation for a
:class:`Completion` (a CUDA event recorded after it on GPU) and polls it against its own deadline
(:func:`await_completion`); on a miss it aborts the group itself, before the watchdog would act.

:class:`QueuedGloo` is the communicator ``gloo_queued``: gloo on CPU, queued the way NCCL queues, so the
path above runs here. It is switched on only by naming it (``CollectiveWeightSync("gloo_queued", ...)``
in tests); ``sync.backend`` does not offer it.

It reproduces: ``broadcast(...).wait()`` returns at once; the operation runs later on another thread, in
issue order; its completion or failure is seen only through :meth:`QueuedWork.event` (``query()``,
``synchronize()``, as ``torch.cuda.Event``); ``abort()`` fails what is still queued; a watchdog that ends
the process (``os._exit``) when an operation has not completed ``timeout_s`` after it was queued and the
group was not aborted (torch's NCCL watchdog, ``TORCH_NCCL_ASYNC_ERROR_HANDLING`` tearing down).

It does not reproduce: CUDA streams and events (``query`` reads a thread's state); how NCCL meets a dead
peer (gloo fails the operation as soon as the peer's connection closes, or waits out its own timeout for a
stopped one; NCCL may hang in the kernel, or report ``ncclRemoteError`` to the watchdog, which then tears
down at once: here a failed operation is torn down only at the timeout, like a hung one); interrupting a
running operation (gloo's ``abort`` does not: the running one ends at the group's own timeout, in the
background; ``ncclCommAbort`` ends a hung kernel); ``synchronize`` raising the operation's error (a CUDA
event's does not: NCCL errors reach the process through the watchdog).
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from typing import Protocol

log = logging.getLogger(__name__)

__all__ = ["COMPLETED", "CollectiveTimeout", "Completion", "QueuedGloo", "QueuedWork", "await_completion"]

WATCHDOG_EXIT = 134
"""Exit status of a process the test-mode watchdog ends (as an abort)."""


class Completion(Protocol):
    """``torch.cuda.Event``'s two calls: ``query()`` is True once the operation has ended (well or not);
    ``synchronize()`` blocks until then (and, for a :class:`QueuedWork` event, raises its error)."""

    def query(self) -> bool: ...

    def synchronize(self) -> None: ...


class _Completed:
    """An operation that had completed when it returned (plain gloo)."""

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        return None


COMPLETED = _Completed()


class CollectiveTimeout(TimeoutError):
    """A collective did not complete by its deadline."""


def await_completion(done: Completion, deadline: float, what: str, max_poll_s: float = 0.02) -> None:
    """Poll ``done`` until it has completed (then ``synchronize()``, which raises a failed test-mode operation's
    error) or ``time.monotonic()`` passes ``deadline`` (:class:`CollectiveTimeout`). Polls from ~0.5 ms up to
    every ``max_poll_s``: a completed bucket costs little more than its transfer."""
    poll = 0.0005
    while not done.query():
        left = deadline - time.monotonic()
        if left <= 0:
            raise CollectiveTimeout(f"{what}: not completed by its deadline (a peer died or hangs)")
        time.sleep(min(poll, left))
        poll = min(poll * 2, max_poll_s)
    done.synchronize()


class QueuedWork:
    """One queued operation: :meth:`wait` returns at once (as NCCL's does on the host); :meth:`event` tells."""

    def __init__(self, run: Callable[[], None]) -> None:
        self.run = run
        self.queued_at = time.monotonic()
        self.error: BaseException | None = None
        self._ended = threading.Event()

    def wait(self) -> bool:
        return True

    def event(self) -> QueuedWork:
        return self

    def query(self) -> bool:
        return self._ended.is_set()

    def synchronize(self) -> None:
        self._ended.wait()
        if self.error is not None:
            raise RuntimeError(f"queued collective failed: {self.error}") from self.error

    def _end(self, error: BaseException | None) -> None:
        if not self._ended.is_set():
            self.error = error
            self._ended.set()


class QueuedGloo:
    """A gloo process group whose operations run on a background thread (see the module docstring).
    ``on_watchdog(work)``: what the watchdog does (default: log and end the process)."""

    def __init__(self, group, timeout_s: float, on_watchdog: Callable[[QueuedWork], None] | None = None) -> None:
        self.group, self.timeout_s = group, timeout_s
        self.on_watchdog = on_watchdog or _tear_down
        self.aborted = False
        self._queue: queue.SimpleQueue[QueuedWork | None] = queue.SimpleQueue()
        self._open: list[QueuedWork] = []  # queued and not yet completed well (the watchdog's list)
        self._lock = threading.Lock()
        self._closed = threading.Event()
        threading.Thread(target=self._run, name="queued-gloo", daemon=True).start()
        threading.Thread(target=self._watch, name="queued-gloo-watchdog", daemon=True).start()

    def broadcast(self, tensors, opts) -> QueuedWork:
        work = QueuedWork(lambda: self.group.broadcast(tensors, opts).wait())
        if self.aborted or self._closed.is_set():
            work._end(RuntimeError("the process group was aborted"))
            return work
        with self._lock:
            self._open.append(work)
        self._queue.put(work)
        return work

    def abort(self) -> None:
        """Fail every queued operation; the running one, if any, ends at the gloo group's own timeout (gloo's
        ``abort`` does not interrupt it), and nothing runs after it. The watchdog stands down."""
        self.aborted = True
        try:
            self.group.abort()
        except Exception as exc:  # noqa: BLE001 - best effort: the flag above is what stops the queue
            log.debug("gloo abort: %s", exc)
        while True:  # fail the queued ones now, not after the running one
            try:
                work = self._queue.get_nowait()
            except queue.Empty:
                break
            if work is not None:
                work._end(RuntimeError("the process group was aborted"))
        self.close()

    def close(self) -> None:
        """The group is being dropped: its thread stops once the queue is empty, its watchdog once every
        operation completed well (or the group is aborted)."""
        self._closed.set()
        self._queue.put(None)

    def _run(self) -> None:
        while (work := self._queue.get()) is not None:
            if self.aborted:
                work._end(RuntimeError("the process group was aborted"))
                continue
            try:
                work.run()
            except BaseException as exc:  # noqa: BLE001 - the event reports it
                work._end(exc)
                continue
            with self._lock:
                self._open.remove(work)
            work._end(None)

    def _watch(self) -> None:
        # Dropping the group (close) does not stand the watchdog down while an operation is still open: only
        # abort does (NCCL's watchdog, too, outlives the Python object's last use).
        while not self.aborted:
            time.sleep(0.1)
            now = time.monotonic()
            with self._lock:
                still_open = list(self._open)
            if self._closed.is_set() and not still_open:
                return
            late = [w for w in still_open if now - w.queued_at > self.timeout_s]
            if late and not self.aborted:
                self.on_watchdog(late[0])
                return


def _tear_down(work: QueuedWork) -> None:
    log.critical(
        "queued-gloo watchdog: a collective queued %.1fs ago has not completed (%s) and its group was not aborted: "
        "ending the process, as torch's NCCL watchdog does",
        time.monotonic() - work.queued_at, work.error or "still running",
    )  # fmt: skip
    logging.shutdown()
    os._exit(WATCHDOG_EXIT)
