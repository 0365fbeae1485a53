"""Weight buckets as they travel, whatever the transport: each tensor's name, wire dtype and global shape
(:class:`TensorMeta`), the cut of a push into buckets from global sizes alone (:func:`plan_buckets`: every
learner rank and every receiver cuts the same buckets without talking), and one bucket packed into a single
16-byte-aligned uint8 buffer and viewed back without a copy (:func:`pack`, :func:`unpack`).

Used by the collective backends (``ivgr_dist.sync.collective``) and by the learner's Hugging Face export
(``LearnerWorker.iter_full_state``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["TensorMeta", "bucket_layout", "pack", "plan_buckets", "unpack"]

_ALIGN = 16  # byte alignment of each tensor inside a packed bucket (any dtype's view stays aligned)


@dataclass(frozen=True)
class TensorMeta:
    """One tensor as it travels: checkpoint name, wire dtype name (``bfloat16``), global shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = getattr(torch, self.dtype).itemsize
        for d in self.shape:
            n *= int(d)
        return n


def plan_buckets(metas: Sequence[TensorMeta], bucket_bytes: int) -> list[list[int]]:
    """Consecutive tensor indices per bucket: a bucket closes at the tensor that brings it to ``bucket_bytes``
    or more (a tensor larger than the budget is a bucket of its own). Sender and receivers both call this."""
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes={bucket_bytes}: must be >= 1")
    buckets: list[list[int]] = []
    current: list[int] = []
    size = 0
    for i, meta in enumerate(metas):
        current.append(i)
        size += meta.nbytes
        if size >= bucket_bytes:
            buckets.append(current)
            current, size = [], 0
    if current:
        buckets.append(current)
    return buckets


def bucket_layout(metas: Sequence[TensorMeta]) -> tuple[list[int], int]:
    """Byte offset of each tensor in the packed buffer (aligned to 16) and the buffer's size."""
    offsets, end = [], 0
    for meta in metas:
        start = -(-end // _ALIGN) * _ALIGN
        offsets.append(start)
        end = start + meta.nbytes
    return offsets, end


def pack(
    tensors: Sequence[torch.Tensor], metas: Sequence[TensorMeta], device: torch.device | str = "cpu"
) -> torch.Tensor:
    """One uint8 buffer holding ``tensors`` (which must match ``metas``) at :func:`bucket_layout`'s offsets."""
    offsets, total = bucket_layout(metas)
    buf = torch.empty(total, dtype=torch.uint8, device=device)
    for tensor, meta, off in zip(tensors, metas, offsets, strict=True):
        if tensor.dtype != getattr(torch, meta.dtype) or tuple(tensor.shape) != tuple(meta.shape):
            raise ValueError(
                f"{meta.name}: got {tensor.dtype} {tuple(tensor.shape)}, the update declared {meta.dtype} {meta.shape}"
            )
        buf[off : off + meta.nbytes].copy_(tensor.detach().contiguous().reshape(-1).view(torch.uint8))
    return buf


def unpack(buf: torch.Tensor, metas: Sequence[TensorMeta]) -> list[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` views into a buffer made by :func:`pack` (no copy)."""
    offsets, total = bucket_layout(metas)
    if buf.numel() != total:
        raise ValueError(f"packed bucket has {buf.numel()} bytes, its layout {total}")
    return [
        (m.name, buf[off : off + m.nbytes].view(getattr(torch, m.dtype)).view(m.shape))
        for m, off in zip(metas, offsets, strict=True)
    ]
