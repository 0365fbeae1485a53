"""Which Ray resource is a device here, and the switch for declared devices on CPU machines.

One question, one answer for placement (:mod:`ivgr_dist.runtime.placement`) and the rollout engines: "GPU" on
CUDA clusters; on CPU machines none, unless ``IVGR_DECLARED_DEVICE=<Ray resource>`` declares one. Declared
devices are for tests and rehearsal: the Ray nodes are started with that custom resource (e.g.
``resources={"FAKE_GPU": 4}``) and vLLM's platform becomes :class:`~ivgr_dist.runtime.declared_platform.
DeclaredDevicePlatform` (vLLM's CPU platform with that resource as its Ray device key), so TP > 1 engines go
through vLLM's Ray executor in one-device bundles exactly as on GPUs. Never on by default: unset, nothing here
changes what vLLM or placement do. Not for GPU machines: the plugin would win over vLLM's CUDA platform.
A run submitted with ``ray job submit`` needs the variable in the job's ``env_vars`` (the driver decides the
bundles, the judge fleet's actor its own).

The platform is chosen by :func:`platform_plugin`, registered as ``vllm.platform_plugins`` entry point
``ivgr_declared_device`` (pyproject.toml; a changed entry point needs ``pip install -e .`` again, as entry
points are read from the installed metadata). vLLM selects an out-of-tree platform plugin that answers over
its built-in ones, except under ``VLLM_TARGET_DEVICE=cpu``, which it obeys before asking any plugin.

The variable must reach every process that resolves vLLM's platform: the engine's actor (the pool puts it in
the actor's runtime env, :meth:`~ivgr_dist.runtime.placement.EnginePlacement.env`), its EngineCore (a child:
inherits it) and vLLM's TP worker actors (vLLM gives them the engine actor's runtime env).
"""

from __future__ import annotations

import os

DECLARED_DEVICE_ENV = "IVGR_DECLARED_DEVICE"
PLATFORM_QUALNAME = "ivgr_dist.runtime.declared_platform.DeclaredDevicePlatform"

__all__ = ["DECLARED_DEVICE_ENV", "declared_device", "device_resource", "platform_plugin"]


def declared_device() -> str:
    """The Ray resource declared as this CPU machine's device (``IVGR_DECLARED_DEVICE``), or ""."""
    return os.environ.get(DECLARED_DEVICE_ENV, "").strip()


def device_resource(use_gpus: bool) -> str | None:
    """The Ray resource that is one device of a rollout engine: "GPU" on a GPU cluster, the declared resource on
    a CPU machine that declares one, None on plain CPU (the engine's TP ranks then are processes on CPU bundles)."""
    if use_gpus:
        return "GPU"
    return declared_device() or None


def platform_plugin() -> str | None:
    """vLLM platform plugin (entry point group ``vllm.platform_plugins``): the declared-device platform when
    ``IVGR_DECLARED_DEVICE`` is set, else None (vLLM then picks its own platform as if this plugin did not exist)."""
    return PLATFORM_QUALNAME if declared_device() else None
