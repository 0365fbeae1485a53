"""CPU weight sync: buckets of full weights in shared memory, loaded through vLLM's update lifecycle.

The learner's rank 0 writes each bucket of full (gathered) parameters once, as a safetensors file
under ``/dev/shm`` (RAM), and every rollout engine on that node maps the file and loads it through
the same lifecycle vLLM's NCCL backend uses: ``start_weight_update`` (initialise layerwise reload)
-> ``update_weights`` per bucket (``model.load_weights`` on checkpoint-format tensors) ->
``finish_weight_update`` (process weights after loading: CPU kernels repack here). Plain
``load_weights`` outside that lifecycle corrupts repacked CPU weights (CPU_STACK.md).

Cost per engine is one read of each bucket from RAM plus vLLM's own loading copy; the trainer
pays one write per bucket for all engines together. Same-node only: on several CPU nodes each
node would need its own copy of the files (the GPU path uses NCCL broadcast instead).

The engine class is registered with vLLM as backend ``ivgr_shm`` by the ``vllm.general_plugins``
entry point (``ivgr_dist.sync.vllm_plugin``), which vLLM loads in every engine process.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

BACKEND_NAME = "ivgr_shm"
DEFAULT_SHM_ROOT = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()


@dataclass
class BucketRef:
    """One bucket of weights on shared memory: where it is and what it holds."""

    path: str
    names: list[str]
    nbytes: int

    def to_update_info(self) -> dict[str, Any]:
        return {"path": self.path, "names": list(self.names), "nbytes": self.nbytes}


def write_buckets(buckets: Iterable[list[tuple[str, torch.Tensor]]], out_dir: str | Path) -> list[BucketRef]:
    """Write each bucket as one safetensors file in ``out_dir``; returns their descriptors."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    refs = []
    for i, bucket in enumerate(buckets):
        if not bucket:
            continue
        tensors = {name: t.detach().to("cpu").contiguous() for name, t in bucket}
        path = out / f"bucket_{i:05d}.safetensors"
        tmp = path.with_suffix(".tmp")
        save_file(tensors, str(tmp))
        os.replace(tmp, path)
        refs.append(BucketRef(str(path), list(tensors), sum(t.numel() * t.element_size() for t in tensors.values())))
    return refs


def read_bucket(path: str, names: list[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs of one bucket file, in its stored order (or ``names`` order)."""
    from safetensors import safe_open

    with safe_open(path, framework="pt", device="cpu") as f:
        for name in names if names is not None else list(f.keys()):
            yield name, f.get_tensor(name)


def make_shm_dir(root: str = DEFAULT_SHM_ROOT, prefix: str = "ivgr_sync_") -> Path:
    return Path(tempfile.mkdtemp(prefix=prefix, dir=root))


# ------------------------------------------------------------------------------- vLLM engine side


def _engine_class():
    """Build the vLLM engine class lazily (vLLM is only importable where the extra is installed)."""
    from vllm.distributed.weight_transfer.base import (
        WeightTransferEngine,
        WeightTransferInitInfo,
        WeightTransferUpdateInfo,
    )

    @dataclass
    class ShmInitInfo(WeightTransferInitInfo):
        node_id: str = ""

    @dataclass
    class ShmUpdateInfo(WeightTransferUpdateInfo):
        path: str = ""
        names: list[str] = field(default_factory=list)
        nbytes: int = 0

    class ShmWeightTransferEngine(WeightTransferEngine[ShmInitInfo, ShmUpdateInfo]):
        """Receives checkpoint-format buckets from shared-memory files."""

        init_info_cls = ShmInitInfo
        update_info_cls = ShmUpdateInfo
        supports_draft_weight_update = False

        def init_transfer_engine(self, init_info: ShmInitInfo) -> None:
            self.loaded_bytes = 0
            self.load_seconds = 0.0

        def start_weight_update(self) -> None:
            from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

            self.loaded_bytes = 0
            self.load_seconds = 0.0
            initialize_layerwise_reload(self.model)

        def finish_weight_update(self) -> None:
            from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

            finalize_layerwise_reload(self.model, self.model_config)

        def update_weights(self, update_info: dict[str, Any]) -> None:
            # The base class synchronises the accelerator after receiving; nothing to wait for on CPU.
            self.receive_weights(self.parse_update_info(update_info))

        def receive_weights(self, update_info: ShmUpdateInfo) -> None:
            if not os.path.isfile(update_info.path):
                raise FileNotFoundError(
                    f"weight bucket {update_info.path} is not on this node: the {BACKEND_NAME} backend needs "
                    "the learner's rank 0 and every rollout engine on one node (use the nccl backend on GPUs)"
                )
            t0 = time.perf_counter()
            self.model.load_weights(read_bucket(update_info.path, update_info.names or None))
            self.loaded_bytes += update_info.nbytes
            self.load_seconds += time.perf_counter() - t0

        def shutdown(self) -> None:
            pass

    return ShmWeightTransferEngine


def register_with_vllm() -> None:
    """Register the engine under :data:`BACKEND_NAME` (idempotent: vLLM may load plugins twice)."""
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

    if BACKEND_NAME not in WeightTransferEngineFactory._registry:
        WeightTransferEngineFactory.register_engine(BACKEND_NAME, _engine_class())


# ------------------------------------------------------------------------------- driver side


class ShmWeightSync:
    """Driver-side orchestration of the shared-memory backend (see the module docstring)."""

    engine_backend = BACKEND_NAME

    def __init__(self, bucket_bytes: int = 256 << 20, dtype: str | None = None, shm_root: str = DEFAULT_SHM_ROOT):
        self.bucket_bytes = bucket_bytes
        self.dtype = dtype  # the engines' dtype: cast once on the learner instead of in every engine
        self.shm_root = shm_root

    def setup(self, learners, rollouts) -> None:
        """Nothing to rendezvous: files carry the data, the engines' own RPC carries the control."""

    def push(self, learners, rollouts, version: int) -> dict[str, float]:
        import shutil

        t0 = time.perf_counter()
        out_dir = make_shm_dir(self.shm_root, prefix=f"ivgr_sync_v{version}_")
        try:
            buckets = learners.write_state_shm(str(out_dir), self.bucket_bytes, self.dtype)
            t_write = time.perf_counter() - t0
            per_engine = rollouts.update_weights(buckets, version)
        finally:
            shutil.rmtree(out_dir, ignore_errors=True)
        nbytes = sum(b["nbytes"] for b in buckets)
        return {
            "sync/bytes": float(nbytes),
            "sync/buckets": float(len(buckets)),
            "sync/gather_write_s": t_write,
            "sync/engine_load_s_max": max(e["update_s"] for e in per_engine) if per_engine else 0.0,
            "time/sync_s": time.perf_counter() - t0,
        }

    def close(self) -> None:
        pass
