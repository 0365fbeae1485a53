"""Ctrl-C (SIGINT) and preemption (SIGTERM: SLURM, Kubernetes, ``ray job stop``) without tracebacks.

Outside the RL loop either signal raises :class:`Interrupted` in the main thread; ``ivgr-dist`` turns it into
one line on stderr and exit status 128 + signal (130, 143). Inside the loop (:func:`graceful`) the first
signal only asks the trainer to stop at the next step boundary, where it writes the checkpoint of the step it
just finished; a second signal raises :class:`Interrupted` at once (the newest checkpoint stays usable).

``ray.init`` installs its own SIGTERM handler in the driver (``sys.exit``), so :func:`raise_on_signals` is
called again after it (``ivgr_dist.runtime.startup.init_ray``).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(BaseException):
    """A stop signal arrived. A ``BaseException``, like ``KeyboardInterrupt``, so that the best-effort
    ``except Exception`` blocks of the roles do not swallow it."""

    def __init__(self, signum: int):
        super().__init__(signal_name(signum))
        self.signum = signum

    @property
    def name(self) -> str:
        return signal_name(self.signum)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def signal_name(signum: int) -> str:
    """``SIGINT``, ``SIGTERM``, ..."""
    return signal.Signals(signum).name


def _raise(signum, frame) -> None:
    raise Interrupted(signum)


def raise_on_signals() -> None:
    """SIGINT and SIGTERM raise :class:`Interrupted` in the main thread (no-op in other threads)."""
    if threading.current_thread() is threading.main_thread():
        for s in SIGNALS:
            signal.signal(s, _raise)


@contextmanager
def graceful(on_signal: Callable[[int], None]) -> Iterator[None]:
    """Within the block, SIGINT and SIGTERM call ``on_signal(signum)`` (which may raise :class:`Interrupted`)
    instead of raising; the previous handlers come back after it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in SIGNALS}
    for s in SIGNALS:
        signal.signal(s, lambda signum, frame: on_signal(signum))
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
