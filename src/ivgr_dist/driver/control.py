"""Talking to a running job: ``ivgr-dist scale --engines N`` and ``ivgr-dist stop`` reach the trainer through a
named Ray actor.

The trainer creates one :class:`FleetControl` actor per run, named ``fleet:<run>`` (``<run>``: the last
part of ``trainer.output_dir``) in the Ray namespace ``ivgr_dist``; it lives as long as the driver. The CLI
joins the same Ray cluster (``--address``, else ``RAY_ADDRESS``, else the local one), finds the actor and
asks for a new engine target; the trainer reads it at its next step boundary and the rollout pool grows or
shrinks there (``RolloutPool.set_target`` / ``heal``). ``ivgr-dist stop`` asks the trainer to end after its
current step with a checkpoint (a clean, resumable stop). The actor also keeps the fleet's last reported
state, which ``ivgr-dist scale`` prints. The trainer talks to it through a :class:`Mailbox` (plain calls with a
deadline; the unit tests pass a fake one).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

NAMESPACE = "ivgr_dist"
PREFIX = "fleet:"


class FleetControl:
    """The mailbox between ``ivgr-dist scale`` and the trainer (a Ray actor, no resources)."""

    def __init__(self, run: str, max_engines: int):
        self.run, self.max_engines = run, max_engines
        self.requested: int | None = None
        self.state: dict[str, Any] = {}

    def set_target(self, engines: int) -> dict[str, Any]:
        if not 1 <= engines <= self.max_engines:
            raise ValueError(
                f"--engines {engines}: must be in [1, rollout.max_engines={self.max_engines}] for {self.run}"
            )
        self.requested = engines
        return {"run": self.run, "requested": engines, **self.state}

    def request_stop(self) -> dict[str, Any]:
        """``ivgr-dist stop``: finish the current step, checkpoint, export, exit 0."""
        self.stop = True
        return {"run": self.run, "stop_requested": True, **self.state}

    def stop_requested(self) -> bool:
        return bool(getattr(self, "stop", False))

    def take_request(self) -> int | None:
        """The target asked for since the last call (None: nothing new)."""
        out, self.requested = self.requested, None
        return out

    def report(self, state: dict[str, Any]) -> None:
        self.state = {**state, "reported_at": time.time()}

    def status(self) -> dict[str, Any]:
        return {"run": self.run, "pending_request": self.requested, **self.state}


class Mailbox:
    """The trainer's side of a :class:`FleetControl` actor: each call waits at most ``timeout_s``."""

    def __init__(self, actor, timeout_s: float = 10.0):
        self.actor, self.timeout_s = actor, timeout_s

    def take_request(self) -> int | None:
        import ray

        return ray.get(self.actor.take_request.remote(), timeout=self.timeout_s)

    def stop_requested(self) -> bool:
        import ray

        return bool(ray.get(self.actor.stop_requested.remote(), timeout=self.timeout_s))

    def report(self, state: dict[str, Any]) -> None:
        self.actor.report.remote(state)  # not awaited: the step does not wait for the mailbox

    def close(self) -> None:
        import ray

        ray.kill(self.actor)


def actor_name(output_dir: str | Path) -> str:
    return PREFIX + Path(output_dir).name


def create(output_dir: str | Path, max_engines: int):
    """The run's control actor (the trainer's). A second job with the same run name gets an error naming it."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    name = actor_name(output_dir)
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)  # leaves with the driver
    try:
        return (
            ray.remote(num_cpus=0)(FleetControl)
            .options(name=name, namespace=NAMESPACE, scheduling_strategy=here)
            .remote(name, max_engines)
        )
    except ValueError as exc:  # the name is taken
        raise RuntimeError(
            f"a job named {name!r} is already running on this Ray cluster (namespace {NAMESPACE}): two runs "
            "must not share trainer.output_dir"
        ) from exc


def find(run: str | None = None):
    """The control actor of the running job ``run`` (None: the only one running); errors list what runs."""
    import ray

    names = sorted(
        a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
        if a.get("namespace") == NAMESPACE and a["name"].startswith(PREFIX)
    )  # fmt: skip
    if run is not None:
        names_match = [n for n in names if n == PREFIX + run]
    else:
        names_match = names
    if len(names_match) != 1:
        what = f"run {run!r}" if run else "a running ivgr-dist job"
        raise LookupError(
            f"{what}: found {len(names_match)} on this Ray cluster ({', '.join(n[len(PREFIX) :] for n in names) or 'none'})"
            + ("; pick one with --run" if len(names_match) > 1 else "")
        )
    return ray.get_actor(names_match[0], namespace=NAMESPACE)
