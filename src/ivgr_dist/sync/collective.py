"""Collective weight sync: learner rank 0 broadcasts bucketed, packed weights to every engine worker.

One code path for two communicators (``sync.backend``): ``gloo`` (CPU tensors over TCP: runs here, and
across nodes) and ``nccl`` (CUDA tensors). They differ only in :func:`open_group`'s process-group class
and the device of the buffers.

The transfer group is its own torch process group, outside vLLM's and the learners' default groups: learner
rank 0 is rank 0 and hosts the rendezvous store; engine ``i``'s TP workers hold ranks
``offset_i .. offset_i + tp - 1`` with ``offset_0 = 1``, so the group has ``1 + sum(tp)`` ranks. The driver
(:class:`CollectiveWeightSync`) forms it by sending the learner ranks a plan with a ``rendezvous``
(:class:`CollectiveSender`: rank 0 hosts and joins; it answers with the update's checkpoint names, wire
dtypes and global shapes, nothing gathered) while every engine joins (``RolloutWorker.wt_init``). Per push:

1. the driver gives every engine the update description: those names, dtypes and shapes and the bucket
   size; both sides cut the same buckets from it and lay each out the same way (``ivgr_dist.sync.buckets``:
   :func:`plan_buckets`, :func:`bucket_layout`, 16-byte aligned);
2. every engine enters vLLM's weight-transfer lifecycle (``start_weight_update`` -> ``update_weights`` ->
   ``finish_weight_update``) and, inside ``update_weights``, receives bucket after bucket
   (:func:`receive_buckets`);
3. every learner rank's sender iterates the full tensors together (FSDP ``full_tensor`` is an all-gather among
   the learners only), rank 0 packs each complete bucket into one buffer and broadcasts it (:func:`send_buckets`).

Deadlines and failures: the group's operations time out after ``sync.timeout_s``; the driver waits for
the whole push until the same deadline plus a short grace. After the first failed broadcast, learner rank 0
keeps iterating (so the other learner ranks' all-gathers complete and the learner group stays usable) but
sends nothing more, and raises at the end. An engine that fails while receiving closes its reload session
(``ivgr_dist.sync.receive``) and is marked as needing a full push. The driver names the engines that died
or did not answer (:class:`~ivgr_dist.sync.fanout.SyncError`); the group is then re-formed, without them,
before the next push (a group of fixed membership cannot shrink, so joins and leaves re-form it).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch

from ivgr_dist.runtime.rendezvous import open_store
from ivgr_dist.sync.base import WeightSource
from ivgr_dist.sync.buckets import TensorMeta, bucket_layout, pack, plan_buckets, unpack
from ivgr_dist.sync.fanout import EngineView, SyncError, call_engines

log = logging.getLogger(__name__)

BACKEND_NAME = "ivgr_collective"
"""The vLLM weight-transfer engine (registered by ``ivgr_dist.sync.vllm_plugin``) both communicators use."""
COMMUNICATORS = ("gloo", "nccl")

__all__ = [
    "BACKEND_NAME",
    "COMMUNICATORS",
    "CollectiveSender",
    "CollectiveWeightSync",
    "open_group",
    "rank_offsets",
    "receive_buckets",
    "send_buckets",
]


# ----------------------------------------------------------------------------------------- wire format


def update_description(metas: Sequence[TensorMeta], bucket_bytes: int) -> dict[str, Any]:
    """What every engine receives as ``update_info`` for one push."""
    return {
        "names": [m.name for m in metas],
        "dtype_names": [m.dtype for m in metas],
        "shapes": [list(m.shape) for m in metas],
        "bucket_bytes": int(bucket_bytes),
    }


def metas_of(update_info) -> list[TensorMeta]:
    return [
        TensorMeta(n, d, tuple(int(x) for x in s))
        for n, d, s in zip(update_info.names, update_info.dtype_names, update_info.shapes, strict=True)
    ]


# ----------------------------------------------------------------------------------------- the group


def open_group(host: str, port: int, rank: int, world_size: int, communicator: str, timeout_s: float):
    """The transfer process group (torch only; no default process group involved). Rank 0 hosts the store
    at ``host:port``, listening on that address only (:mod:`ivgr_dist.runtime.rendezvous`); everyone else connects to it. Blocks until all ``world_size`` ranks joined, at most
    ``timeout_s``; every later operation also times out after ``timeout_s``."""
    import torch.distributed as dist

    if communicator not in COMMUNICATORS:
        raise ValueError(f"communicator={communicator!r}: must be one of {list(COMMUNICATORS)}")
    timeout = timedelta(seconds=timeout_s)
    store = open_store(host, port, world_size, rank == 0, timeout)  # rank 0 listens on ``host`` only
    prefix = dist.PrefixStore("ivgr_weight_transfer", store)
    if communicator == "gloo":
        return dist.ProcessGroupGloo(prefix, rank, world_size, timeout)
    options = dist.ProcessGroupNCCL.Options()
    options._timeout = timeout
    return dist.ProcessGroupNCCL(prefix, rank, world_size, options)


def broadcast(group, buf: torch.Tensor) -> None:
    """Broadcast ``buf`` from rank 0 of ``group`` (in place on every other rank)."""
    import torch.distributed as dist

    opts = dist.BroadcastOptions()
    opts.rootRank = 0
    opts.rootTensor = 0
    group.broadcast([buf], opts).wait()


def rank_offsets(tps: Sequence[int]) -> list[int]:
    """First transfer-group rank of each engine (the sender holds rank 0)."""
    offsets, nxt = [], 1
    for tp in tps:
        if tp < 1:
            raise ValueError(f"tensor_parallel_size={tp}: must be >= 1")
        offsets.append(nxt)
        nxt += tp
    return offsets


def send_buckets(
    group,
    wire: torch.device | str,
    pairs: Iterable[tuple[str, torch.Tensor | None]],
    metas: Sequence[TensorMeta],
    bucket_bytes: int,
) -> dict[str, float]:
    """Broadcast ``pairs`` (one per entry of ``metas``, in order) bucket by bucket from rank 0 of ``group``, packed
    on ``wire``. ``pairs`` must be drained to the end whatever happens: on the learner ranks it is a collective
    (all-gathers). After the first failure nothing more is sent and the error is raised once the iteration is
    complete. Returns ``bytes``, ``buckets``, ``send_s``."""
    plan = plan_buckets(metas, bucket_bytes)
    error: BaseException | None = None
    sent = 0
    t0 = time.perf_counter()
    it: Iterator = iter(pairs)
    for bucket in plan:
        tensors = []
        for i in bucket:
            name, tensor = next(it)
            if name != metas[i].name:
                raise ValueError(f"weight source order changed: got {name!r}, the update declared {metas[i].name!r}")
            tensors.append(tensor)
        if error is not None:
            continue
        try:
            broadcast(group, pack(tensors, [metas[i] for i in bucket], wire))
            sent += sum(metas[i].nbytes for i in bucket)
        except Exception as exc:  # noqa: BLE001 - re-raised below, after the collective iteration ends
            error = exc
    for _ in it:  # drain: the other learner ranks are still gathering
        pass
    elapsed = time.perf_counter() - t0
    if error is not None:
        raise RuntimeError(f"broadcast failed after {sent} of {sum(m.nbytes for m in metas)} bytes: {error}") from error
    return {"bytes": float(sent), "buckets": float(len(plan)), "send_s": elapsed}


def receive_buckets(
    group, wire: torch.device | str, metas: Sequence[TensorMeta], bucket_bytes: int
) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """The receiving end of :func:`send_buckets`: each bucket's ``(name, tensor)`` views, bucket by bucket (the
    views are valid until the next bucket arrives)."""
    for bucket in plan_buckets(metas, bucket_bytes):
        bucket_metas = [metas[i] for i in bucket]
        buf = torch.empty(bucket_layout(bucket_metas)[1], dtype=torch.uint8, device=wire)
        broadcast(group, buf)
        yield unpack(buf, bucket_metas)


# ------------------------------------------------------------------------------------ learner side


class CollectiveSender:
    """The learner ranks' end. A plan with ``rendezvous`` (``addr``, ``port``, ``world_size``, ``timeout_s``) (re)forms
    the transfer group: learner rank 0 hosts and joins it (blocks until every engine worker joined, at most
    ``timeout_s``; the previous group is dropped first) and returns ``{"metas": what a push sends}``. Any other plan
    (``bucket_bytes``, ``dtype``) sends: every rank gathers the full tensors together, rank 0 broadcasts them and
    returns ``bytes``, ``buckets``, ``send_s``; the other ranks return ``{}``. ``plan["backend"]`` names the
    communicator (``gloo`` or ``nccl``)."""

    def __init__(self) -> None:
        self.group = None

    def push(self, source: WeightSource, version: int | None, plan: dict[str, Any]) -> dict[str, Any]:
        communicator, dtype = plan["backend"], plan.get("dtype")
        if "rendezvous" in plan:
            if source.rank != 0:
                return {}
            r = plan["rendezvous"]
            self.group = None
            self.group = open_group(r["addr"], r["port"], 0, r["world_size"], communicator, r["timeout_s"])
            return {"metas": source.weight_metadata(dtype)}
        tensors = source.iter_full_tensors(getattr(torch, dtype) if dtype else None)
        if source.rank != 0:
            for _ in tensors:
                pass
            return {}
        if self.group is None:
            for _ in tensors:  # stay in the collective with the other ranks, then say why
                pass
            raise RuntimeError(f"rank 0: weight push to version {version} before the transfer group was formed")
        metas = [TensorMeta(n, d, s) for n, d, s in source.weight_metadata(dtype)]
        wire = torch.device("cpu") if communicator == "gloo" else torch.device(source.device())
        return send_buckets(self.group, wire, tensors, metas, int(plan["bucket_bytes"]))

    def close(self) -> None:
        self.group = None  # the process group closes its connections when collected


# -------------------------------------------------------------------------------- vLLM engine side


def _engine_class():
    """The vLLM engine class, built lazily (vLLM is only importable where the extra is installed)."""
    from vllm.distributed.weight_transfer.base import (
        WeightTransferEngine,
        WeightTransferInitInfo,
        WeightTransferUpdateInfo,
    )

    from ivgr_dist.sync.receive import ReceiveSession

    @dataclass
    class CollectiveInitInfo(WeightTransferInitInfo):
        master_address: str = ""
        master_port: int = 0
        rank_offset: int = 1
        world_size: int = 0
        communicator: str = "gloo"
        timeout_s: float = 300.0

    @dataclass
    class CollectiveUpdateInfo(WeightTransferUpdateInfo):
        names: list[str] = field(default_factory=list)
        dtype_names: list[str] = field(default_factory=list)
        shapes: list[list[int]] = field(default_factory=list)
        bucket_bytes: int = 256 << 20

    class CollectiveWeightTransferEngine(
        ReceiveSession, WeightTransferEngine[CollectiveInitInfo, CollectiveUpdateInfo]
    ):
        """Receives the learner's broadcast (see the module docstring)."""

        init_info_cls = CollectiveInitInfo
        update_info_cls = CollectiveUpdateInfo
        supports_draft_weight_update = False

        def init_transfer_engine(self, init_info: CollectiveInitInfo) -> None:
            """Join (or re-join: the previous group is dropped first) the transfer group."""
            self.shutdown()
            self._reset_session()
            rank = init_info.rank_offset + int(self.parallel_config.rank)
            self.communicator = init_info.communicator
            self.wire = torch.device("cpu") if init_info.communicator == "gloo" else self.device
            self.group = open_group(
                init_info.master_address,
                init_info.master_port,
                rank,
                init_info.world_size,
                init_info.communicator,
                init_info.timeout_s,
            )

        def receive_weights(self, update_info: CollectiveUpdateInfo) -> None:
            if getattr(self, "group", None) is None:
                raise RuntimeError("weight transfer group not joined: init_weight_transfer_engine first")
            for weights in receive_buckets(self.group, self.wire, metas_of(update_info), update_info.bucket_bytes):
                self._load(weights)

        def shutdown(self) -> None:
            self.group = None  # the process group closes its connections when collected

    return CollectiveWeightTransferEngine


def register_with_vllm() -> None:
    """Register the engine under :data:`BACKEND_NAME` (idempotent)."""
    from ivgr_dist.sync.receive import register_engine

    register_engine(BACKEND_NAME, _engine_class)


# ---------------------------------------------------------------------------------------- driver side


class CollectiveWeightSync:
    """Driver-side orchestration (see the module docstring); ``communicator`` is ``gloo`` or ``nccl``. ``call``: the
    per-engine fan-out (:func:`~ivgr_dist.sync.fanout.call_engines`)."""

    engine_backend = BACKEND_NAME

    def __init__(
        self,
        communicator: str = "gloo",
        bucket_bytes: int = 256 << 20,
        dtype: str | None = None,
        timeout_s: float = 300.0,
        grace_s: float = 10.0,
        call: Callable[..., dict[int, Any]] = call_engines,
    ):
        if communicator not in COMMUNICATORS:
            raise ValueError(f"communicator={communicator!r}: must be one of {list(COMMUNICATORS)}")
        self.communicator, self.bucket_bytes, self.dtype = communicator, bucket_bytes, dtype
        self.timeout_s, self.grace_s = timeout_s, grace_s
        self.call = call
        self.members: list[int] | None = None  # engines in the current group (None: form one before pushing)
        self.metas: list[TensorMeta] | None = None
        self.forms = 0

    def setup(self, learners, rollouts) -> None:
        self._form(learners, rollouts.engine_view())

    def _form(self, learners, view: EngineView) -> None:
        """(Re-)form the group with the live engines: learner rank 0 hosts it at a fresh port of its node."""
        members = view.ids
        if not members:
            raise SyncError("no live rollout engine to form a weight-transfer group with", version=None)
        tps = [view.tensor_parallel_size] * len(members)
        offsets = rank_offsets(tps)
        world = 1 + sum(tps)
        addr, port = learners.master_address()
        payloads = {
            e: {
                "master_address": addr,
                "master_port": port,
                "rank_offset": off,
                "world_size": world,
                "communicator": self.communicator,
                "timeout_s": self.timeout_s,
            }
            for e, off in zip(members, offsets, strict=True)
        }
        rendezvous = {"addr": addr, "port": port, "world_size": world, "timeout_s": self.timeout_s}
        self.members = None
        t0 = time.perf_counter()
        hosts = learners.push_weights_async(
            None, {"backend": self.communicator, "dtype": self.dtype, "rendezvous": rendezvous}
        )
        try:
            self.call(
                view,
                "wt_init",
                {e: (payloads[e],) for e in members},
                self.timeout_s + self.grace_s,
                f"joining the weight-transfer group at {addr}:{port} ({world} ranks, {self.communicator})",
                None,
            )
        finally:
            # learner rank 0 ends within timeout_s either way (its rendezvous wait is bounded)
            learners.wait(hosts, self.timeout_s + self.grace_s)
        formed = learners.collect(hosts, "forming the weight-transfer group")[0]
        self.metas = [TensorMeta(n, d, tuple(s)) for n, d, s in formed["metas"]]
        self.members = members
        self.forms += 1
        log.info(
            "weight-transfer group formed: %d engines, %d ranks, %s at %s:%d in %.1fs",
            len(members), world, self.communicator, addr, port, time.perf_counter() - t0,
        )  # fmt: skip

    def push(self, learners, rollouts, version: int, engines: list[int] | None = None) -> dict[str, float]:
        """Send the learner's weights to every live engine as ``version`` (see the module docstring). ``engines``
        (engines joining the fleet) changes nothing: a broadcast reaches every member of the group, which is
        re-formed first whenever the live engines changed."""
        t0 = time.perf_counter()
        view = rollouts.engine_view()
        reformed = self.members != view.ids
        if reformed:
            self._form(learners, view)
        members = list(self.members or [])
        info = update_description(self.metas, self.bucket_bytes)
        deadline = self.timeout_s + self.grace_s
        plan = {"backend": self.communicator, "bucket_bytes": self.bucket_bytes, "dtype": self.dtype}
        try:
            self.call(view, "wt_start", {e: () for e in members}, deadline, "start_weight_update", version)
            send = learners.push_weights_async(version, plan)
            try:
                self.call(
                    view, "wt_update", {e: (info, version) for e in members}, deadline, "receiving the weights", version
                )
            finally:
                learners.wait(send, deadline)  # learner rank 0 stops within timeout_s
            sent = learners.collect(send, f"push_weights(version={version})")[0]
            self.call(view, "wt_finish", {e: (version,) for e in members}, deadline, "finish_weight_update", version)
        except SyncError as err:
            self.members = None  # the next push re-forms the group first
            self._abort(view, [e for e in members if e not in err.failed_engines], version, err)
            raise
        except BaseException:
            self.members = None
            raise
        return {
            "sync/bytes": sent["bytes"],
            "sync/buckets": sent["buckets"],
            "sync/send_s": sent["send_s"],
            "sync/group_formed": float(reformed),
            "time/sync_s": time.perf_counter() - t0,
        }

    def _abort(self, view: EngineView, engines: list[int], version: int, err: SyncError) -> None:
        """Close the update session of every engine still standing (best effort, bounded): those whose receive
        completed are still inside it, and vLLM refuses the next ``start_weight_update`` until it ends."""
        reason = f"the push to version {version} failed: {str(err)[:200]}"
        try:
            self.call(view, "wt_abort", {e: (reason,) for e in engines}, self.grace_s, "closing the update", version)
        except SyncError as again:
            log.warning("after a failed push, closing the update failed too: %s", again)

    def close(self) -> None:
        self.members = None
