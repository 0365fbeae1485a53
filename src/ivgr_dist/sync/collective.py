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

Deadlines and failures: NCCL only queues an operation (``wait()`` returns before the bytes moved; a peer that
dies mid-broadcast is seen by no ``try``/``except``), so every broadcast is polled to completion (a CUDA event
recorded after it on GPU; :mod:`ivgr_dist.sync.completion`). The sender keeps at most :data:`MAX_IN_FLIGHT`
buckets queued and all must have completed ``sync.timeout_s`` after the push started; a receiver hands a
bucket to vLLM only once it arrived, under the same deadline from the start of its receive. A failure or a
missed deadline aborts the group (NCCL: ``abort()``, which ends a kernel hung on a dead peer) on that side,
which drops it. The group's own timeout (NCCL's watchdog, which would end the process) is
:data:`BACKSTOP_FACTOR` times ``sync.timeout_s``, so the push's deadline acts first. Plain gloo has completed
every operation when ``wait()`` returns; there the group's timeout is ``sync.timeout_s`` per operation.
``sync/send_s`` is the time until the last bucket completed.

After the first failed broadcast, learner rank 0 keeps iterating (so the other learner ranks' all-gathers
complete and the learner group stays usable) but sends nothing more, and raises at the end. An engine that
fails while receiving closes its reload session (``ivgr_dist.sync.receive``) and is marked as needing a full
push. The driver waits for the whole push until ``sync.timeout_s`` plus a short grace and names the engines
that died or did not answer (:class:`~ivgr_dist.sync.fanout.SyncError`); the trainer drops them and pushes
again, and the group is re-formed, without them, first (a group of fixed membership cannot shrink, so joins
and leaves re-form it).

Rehearsed on CPU, not verified on GPU: the test-mode communicator ``gloo_queued``
(:class:`~ivgr_dist.sync.completion.QueuedGloo`, tests only) queues like NCCL and has a watchdog that ends the
process, and ``tests/integration/test_sync_queued.py`` kills an engine's workers mid-push under it (the push
fails in time, learner rank 0 outlives the watchdog, the next push succeeds). Only a real NCCL run can show
that the CUDA events complete (or not) as assumed, that ``abort()`` ends a kernel hung on a dead or stopped
peer and leaves the process usable, and that the watchdog (``TORCH_NCCL_ASYNC_ERROR_HANDLING``, default: tear
down) does not act first on an error NCCL reports asynchronously (``ncclRemoteError``) before the poll sees it.
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
from ivgr_dist.sync.completion import COMPLETED, Completion, QueuedGloo, await_completion
from ivgr_dist.sync.fanout import EngineView, SyncError, call_engines

log = logging.getLogger(__name__)

BACKEND_NAME = "ivgr_collective"
"""The vLLM weight-transfer engine (registered by ``ivgr_dist.sync.vllm_plugin``) both communicators use."""
COMMUNICATORS = ("gloo", "nccl")
QUEUED_GLOO = "gloo_queued"
"""The test-mode communicator: gloo queued the way NCCL queues (``ivgr_dist.sync.completion.QueuedGloo``); named
only by tests, never chosen by ``sync.backend``."""
BACKSTOP_FACTOR = 2.0
"""On the queued communicators (nccl, gloo_queued) the process group's own per-operation timeout (NCCL's watchdog)
is this many times ``timeout_s``: the push's own deadline, ``timeout_s`` from its start, always acts first."""
MAX_IN_FLIGHT = 2
"""Buckets the sender has queued and not yet seen complete: packing the next overlaps the transfer, and no more
than this many packed buffers wait in the communicator's queue."""

__all__ = [
    "BACKEND_NAME",
    "COMMUNICATORS",
    "QUEUED_GLOO",
    "abort_group",
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
    ``timeout_s``. Every later operation of plain gloo times out after ``timeout_s``; on the queued communicators
    (``nccl``, ``gloo_queued``) the group's own timeout is the backstop (:data:`BACKSTOP_FACTOR`): the pushes poll
    completion against their own deadline and abort the group before it."""
    import torch.distributed as dist

    if communicator not in (*COMMUNICATORS, QUEUED_GLOO):
        raise ValueError(f"communicator={communicator!r}: must be one of {[*COMMUNICATORS, QUEUED_GLOO]}")
    timeout = timedelta(seconds=timeout_s)
    backstop = timedelta(seconds=timeout_s * BACKSTOP_FACTOR)
    store = open_store(host, port, world_size, rank == 0, timeout)  # rank 0 listens on ``host`` only
    prefix = dist.PrefixStore("ivgr_weight_transfer", store)
    if communicator == "gloo":
        return dist.ProcessGroupGloo(prefix, rank, world_size, timeout)
    if communicator == QUEUED_GLOO:
        return QueuedGloo(dist.ProcessGroupGloo(prefix, rank, world_size, backstop), backstop.total_seconds())
    options = dist.ProcessGroupNCCL.Options()
    options._timeout = backstop
    return dist.ProcessGroupNCCL(prefix, rank, world_size, options)


def wire_device(communicator: str, device: torch.device | str | None = None) -> torch.device:
    """Where the packed buckets live: the accelerator for nccl, else the CPU."""
    return torch.device(device) if communicator == "nccl" else torch.device("cpu")


def broadcast(group, buf: torch.Tensor) -> Completion:
    """Broadcast ``buf`` from rank 0 of ``group`` (in place on every other rank); returns when it has completed
    (:func:`~ivgr_dist.sync.completion.await_completion`). Plain gloo has completed when this returns; NCCL has
    only queued it (``wait()`` orders the current CUDA stream after it, the event recorded there then completes
    with it); ``gloo_queued`` has only queued it too."""
    import torch.distributed as dist

    opts = dist.BroadcastOptions()
    opts.rootRank = 0
    opts.rootTensor = 0
    work = group.broadcast([buf], opts)
    if isinstance(group, QueuedGloo):
        return work.event()
    work.wait()
    if buf.is_cuda:
        event = torch.cuda.Event()
        event.record()
        return event
    return COMPLETED


def abort_group(group) -> None:
    """Abort ``group`` after a missed deadline or a failed operation (best effort): NCCL's ``abort`` ends its
    communicators, and with them a kernel hung on a dead peer, before the watchdog would end the process;
    gloo's ends nothing that runs (a running operation ends at the group's own timeout), ``gloo_queued``'s fails
    what is still queued and stands its watchdog down."""
    try:
        group.abort()
    except Exception as exc:  # noqa: BLE001 - the group is dropped next either way
        log.warning("aborting the weight-transfer group failed: %s", exc)


def release_group(group) -> None:
    """Drop ``group`` (the process group closes its connections when collected; ``gloo_queued`` stops its thread)."""
    if isinstance(group, QueuedGloo):
        group.close()


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
    timeout_s: float = 300.0,
) -> dict[str, float]:
    """Broadcast ``pairs`` (one per entry of ``metas``, in order) bucket by bucket from rank 0 of ``group``, packed
    on ``wire``. ``pairs`` must be drained to the end whatever happens: on the learner ranks it is a collective
    (all-gathers). Each bucket's completion is polled (at most :data:`MAX_IN_FLIGHT` queued at once); all must
    have completed ``timeout_s`` after the start. After the first failure or a missed deadline the group is
    aborted (:func:`abort_group`: the caller must not use it again), nothing more is sent and the error is
    raised once the iteration is complete. Returns ``bytes``, ``buckets``, ``send_s`` (until the last bucket
    completed)."""
    plan = plan_buckets(metas, bucket_bytes)
    error: BaseException | None = None
    sent = 0
    t0 = time.perf_counter()
    deadline = time.monotonic() + timeout_s
    in_flight: list[tuple[Completion, int, torch.Tensor]] = []  # (completion, bytes, the packed buffer it reads)

    def settle(keep: int) -> None:
        nonlocal sent
        while len(in_flight) > keep:
            done, nbytes, _ = in_flight.pop(0)
            await_completion(done, deadline, f"broadcast of bucket to the weight-transfer group ({sent} bytes in)")
            sent += nbytes

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
            buf = pack(tensors, [metas[i] for i in bucket], wire)
            in_flight.append((broadcast(group, buf), sum(metas[i].nbytes for i in bucket), buf))
            settle(MAX_IN_FLIGHT)
        except Exception as exc:  # noqa: BLE001 - re-raised below, after the collective iteration ends
            error = exc
            abort_group(group)
    if error is None:
        try:
            settle(0)
        except Exception as exc:  # noqa: BLE001 - re-raised below
            error = exc
            abort_group(group)
    for _ in it:  # drain: the other learner ranks are still gathering
        pass
    elapsed = time.perf_counter() - t0
    if error is not None:
        raise RuntimeError(f"broadcast failed after {sent} of {sum(m.nbytes for m in metas)} bytes: {error}") from error
    return {"bytes": float(sent), "buckets": float(len(plan)), "send_s": elapsed}


def receive_buckets(
    group, wire: torch.device | str, metas: Sequence[TensorMeta], bucket_bytes: int, timeout_s: float = 300.0
) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """The receiving end of :func:`send_buckets`: each bucket's ``(name, tensor)`` views, bucket by bucket, each
    once its broadcast has completed (on GPU: its event, so the bytes are there before the engine reports
    success; the views are valid until the next bucket arrives). All must have arrived ``timeout_s`` after the
    start; a failure or a missed deadline aborts the group (:func:`abort_group`) and raises."""
    deadline = time.monotonic() + timeout_s
    for k, bucket in enumerate(plan_buckets(metas, bucket_bytes)):
        bucket_metas = [metas[i] for i in bucket]
        buf = torch.empty(bucket_layout(bucket_metas)[1], dtype=torch.uint8, device=wire)
        try:
            await_completion(broadcast(group, buf), deadline, f"receiving bucket {k} of the weight push")
        except Exception:
            abort_group(group)
            raise
        yield unpack(buf, bucket_metas)


# ------------------------------------------------------------------------------------ learner side


class CollectiveSender:
    """The learner ranks' end. A plan with ``rendezvous`` (``addr``, ``port``, ``world_size``, ``timeout_s``) (re)forms
    the transfer group: learner rank 0 hosts and joins it (blocks until every engine worker joined, at most
    ``timeout_s``; the previous group is dropped first) and returns ``{"metas": what a push sends}``. Any other plan
    (``bucket_bytes``, ``dtype``) sends: every rank gathers the full tensors together, rank 0 broadcasts them and
    returns ``bytes``, ``buckets``, ``send_s``; the other ranks return ``{}``. ``plan["communicator"]`` (else
    ``plan["backend"]``) names the communicator (``gloo``, ``nccl`` or the test mode ``gloo_queued``). A failed
    send has aborted the group: it is dropped, and a push before the next rendezvous says so."""

    def __init__(self) -> None:
        self.group = None
        self.timeout_s = 300.0

    def push(self, source: WeightSource, version: int | None, plan: dict[str, Any]) -> dict[str, Any]:
        communicator, dtype = plan.get("communicator", plan["backend"]), plan.get("dtype")
        if "rendezvous" in plan:
            if source.rank != 0:
                return {}
            r = plan["rendezvous"]
            self.close()
            self.group = open_group(r["addr"], r["port"], 0, r["world_size"], communicator, r["timeout_s"])
            self.timeout_s = float(r["timeout_s"])
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
        wire = wire_device(communicator, source.device())
        try:
            return send_buckets(self.group, wire, tensors, metas, int(plan["bucket_bytes"]), self.timeout_s)
        except RuntimeError:
            self.close()  # aborted: the driver re-forms the group before the next push
            raise

    def close(self) -> None:
        if self.group is not None:
            release_group(self.group)
        self.group = None


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
            self.communicator, self.timeout_s = init_info.communicator, init_info.timeout_s
            self.wire = wire_device(init_info.communicator, self.device)
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
            buckets = receive_buckets(
                self.group, self.wire, metas_of(update_info), update_info.bucket_bytes, self.timeout_s
            )
            try:
                for weights in buckets:
                    self._load(weights)
            except BaseException:
                self.shutdown()  # aborted (or unusable): the driver re-forms the group before the next push
                raise

        def shutdown(self) -> None:
            if getattr(self, "group", None) is not None:
                release_group(self.group)
            self.group = None

    return CollectiveWeightTransferEngine


def register_with_vllm() -> None:
    """Register the engine under :data:`BACKEND_NAME` (idempotent)."""
    from ivgr_dist.sync.receive import register_engine

    register_engine(BACKEND_NAME, _engine_class)


# ---------------------------------------------------------------------------------------- driver side


class CollectiveWeightSync:
    """Driver-side orchestration (see the module docstring); ``communicator`` is ``gloo``, ``nccl`` or the test mode
    ``gloo_queued``. ``call``: the per-engine fan-out (:func:`~ivgr_dist.sync.fanout.call_engines`)."""

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
        if communicator not in (*COMMUNICATORS, QUEUED_GLOO):
            raise ValueError(f"communicator={communicator!r}: must be one of {[*COMMUNICATORS, QUEUED_GLOO]}")
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
        hosts = learners.push_weights_async(None, {**self._plan(), "rendezvous": rendezvous})
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
        plan = {**self._plan(), "bucket_bytes": self.bucket_bytes}
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

    def _plan(self) -> dict[str, Any]:
        """What every learner plan carries: ``backend`` picks the sender (``ivgr_dist.sync.make_sender``) and names
        the group it opens; the test mode's sender is gloo's, told by ``communicator`` to open ``gloo_queued``."""
        if self.communicator == QUEUED_GLOO:
            return {"backend": "gloo", "communicator": QUEUED_GLOO, "dtype": self.dtype}
        return {"backend": self.communicator, "dtype": self.dtype}

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
