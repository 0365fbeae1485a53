"""``HealthMonitor``: the health probes of an engine fleet (:class:`~ivgr_dist.rollout.fleet.EngineFleet`).

A daemon thread probes every serving engine through its EngineCore (``RolloutWorker.probe``: a no-op that reaches
every TP worker, so a hung core behind a live actor fails it). A dead engine is read from the exception's class:
``RayActorError`` (the actor is gone) or :func:`~ivgr_dist.rollout.errors.engine_dead` (its core is gone), never
from the text of the error."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from ivgr_dist.rollout.errors import engine_dead, failure_text

if TYPE_CHECKING:
    from ivgr_dist.rollout.fleet import EngineFleet

__all__ = ["HealthMonitor"]


class HealthMonitor:
    """Probes every serving engine of a fleet each ``health.interval_s`` (``RolloutWorker.probe``: through the
    EngineCore to every TP worker) in a daemon thread; ``health.failures`` failures in a row, or a dead actor or
    core, make :meth:`EngineFleet.mark_unhealthy` take the engine out of the fleet."""

    def __init__(self, fleet: EngineFleet):
        self.fleet = fleet
        self.cfg = fleet.spec.health
        self.fails: dict[int, int] = {}
        self.probes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="engine-health", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=self.cfg.timeout_s + 5)

    def _run(self) -> None:
        while not self._stop.wait(self.cfg.interval_s):
            try:
                self.check_once()
            except Exception:  # noqa: BLE001 - the monitor must outlive a bad round (Ray shutting down, say)
                self.fleet.log.exception("engine health check failed")

    def check_once(self) -> None:
        import ray

        fleet = self.fleet
        with fleet._lock:
            engines = list(fleet.serving)
        refs = {fleet.actors[e].probe.remote(self.cfg.timeout_s): e for e in engines}
        done, _ = ray.wait(list(refs), num_returns=len(refs), timeout=self.cfg.timeout_s + 2.0)
        self.probes += len(refs)
        for ref, e in refs.items():
            reason, fatal = None, False
            if ref not in done:
                reason = f"no answer to the health probe within {self.cfg.timeout_s:g}s"
            else:
                try:
                    ray.get(ref)
                except ray.exceptions.RayActorError as exc:
                    reason, fatal = f"its actor died ({type(exc).__name__})", True
                except Exception as exc:  # noqa: BLE001 - the probe's own error (a dead core says so at once)
                    reason = failure_text(exc, 200)
                    fatal = engine_dead(exc)
            if reason is None:
                self.fails.pop(e, None)
                continue
            self.fails[e] = self.fails.get(e, 0) + 1
            fleet.log.warning(
                "%s %d: health probe failed (%d/%d): %s", fleet.spec.what, e, self.fails[e], self.cfg.failures, reason
            )
            if fatal or self.fails[e] >= self.cfg.failures:
                self.fails.pop(e, None)
                fleet.mark_unhealthy(e, f"{reason} ({'dead' if fatal else f'{self.cfg.failures} failed probes'})")
