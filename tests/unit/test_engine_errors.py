"""How a failed call on an engine actor is read (``rollout/errors.py``): dead or not by class, described by the
task's own exception."""

from __future__ import annotations

from ivgr_dist.rollout.errors import EngineDeadError, engine_dead, failure_text


class _TaskError(RuntimeError):
    """Shaped like Ray's ``RayTaskError``: the task's own exception in ``cause``."""

    def __init__(self, cause: BaseException):
        super().__init__(f"ray wrapper around {cause!r}\n  traceback lines")
        self.cause = cause


def test_a_dead_core_is_read_by_class_and_described_by_the_tasks_own_exception():
    exc = _TaskError(EngineDeadError("EngineCore is gone\nmore detail"))
    assert engine_dead(exc) and not engine_dead(_TaskError(ValueError("the core is dead")))
    assert failure_text(exc) == "EngineDeadError: EngineCore is gone"
    assert failure_text(exc, 6) == "EngineDeadError: Engine"
    assert failure_text(ValueError("bad request")) == "ValueError: bad request"  # no cause: the exception itself
    assert failure_text(TimeoutError()) == "TimeoutError: "
