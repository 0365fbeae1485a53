"""Sharded model initialisation: no learner rank ever holds the full model.

``transformers.from_pretrained`` on every rank, then ``fully_shard``, costs each rank the whole model in
host memory first (8 ranks x 7B x 4 bytes is ~220 GB on one node). Here each rank instead

1. builds the model with its PARAMETERS on the meta device (no memory; buffers such as the rotary
   frequencies stay real, they are small and not in checkpoints),
2. shards it (``wrap``: the caller's ``fully_shard`` calls), so every parameter is a ``Shard(0)`` DTensor,
3. allocates only its local shards (``to_empty``) and puts the buffers back,
4. reads exactly its own rows of every tensor from the safetensors files (``safe_open(...).get_slice``
   reads only those bytes), cast to the parameter dtype.

Which checkpoint tensor fills which parameter comes from ``ivgr_dist.models.naming.load_names``
(transformers' own load-time renaming, legacy layouts included), so the model loads exactly as
``from_pretrained`` would load it, and afterwards the weight push and the export write the checkpoint's own
layout back. A parameter with no tensor in the files stops the load naming it (tied output embeddings
excepted).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

__all__ = ["load_sharded", "params_on_meta"]


@contextmanager
def params_on_meta() -> Iterator[None]:
    """Every parameter registered inside goes to the meta device (buffers do not). A module's ``__init__``
    allocates a parameter with ``torch.empty`` (pages never touched) and initialises it after registering,
    i.e. on meta: nothing of the model's size is ever resident."""
    register = nn.Module.register_parameter

    def to_meta(module: nn.Module, name: str, param) -> None:
        register(module, name, param)
        p = module._parameters.get(name)
        if p is not None and p.device.type != "meta":
            module._parameters[name] = nn.Parameter(p.to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = to_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _weight_files(path: Path) -> dict[str, Path]:
    """Checkpoint tensor name -> the safetensors file that holds it."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return {k: path / v for k, v in json.loads(index.read_text())["weight_map"].items()}
    single = path / "model.safetensors"
    if not single.is_file():
        raise FileNotFoundError(
            f"{path}: no model.safetensors or model.safetensors.index.json (sharded initialisation reads "
            "safetensors; set learner.sharded_init=false to load other formats through transformers)"
        )
    from safetensors import safe_open

    with safe_open(str(single), framework="pt") as f:
        return dict.fromkeys(f.keys(), single)


def load_sharded(
    path: str | Path,
    build: Callable[[], nn.Module],
    wrap: Callable[[nn.Module], None],
    device: torch.device,
) -> nn.Module:
    """The model ``build()`` makes (called under :func:`params_on_meta`), sharded by ``wrap``, with this rank's
    rows of every parameter read from the safetensors files in ``path``."""
    from safetensors import safe_open
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    from ivgr_dist.models.naming import load_names

    path = Path(path)
    files = _weight_files(path)
    with params_on_meta():
        model = build()
    # before sharding: transformers finds a model's conversions by class name, and fully_shard renames classes
    names = load_names(model, files)  # in-memory name -> checkpoint key, as from_pretrained maps them
    wrap(model)
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    model.to_empty(device=device)
    for name, value in buffers.items():
        owner, _, leaf = name.rpartition(".")
        model.get_submodule(owner)._buffers[leaf] = value.to(device)

    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    handles: dict[Path, object] = {}
    try:
        with torch.no_grad():
            for name, param in model.named_parameters():
                ckpt = names.get(name)
                if ckpt is None:
                    if tied and name.endswith("lm_head.weight"):
                        continue  # shares the input embedding's storage
                    raise KeyError(
                        f"{path}: no tensor for parameter {name!r} in the checkpoint "
                        f"({len(files)} tensors); the model directory does not match its config"
                    )
                f = handles.get(files[ckpt])
                if f is None:
                    f = handles[files[ckpt]] = safe_open(str(files[ckpt]), framework="pt")
                sl = f.get_slice(ckpt)
                shape = tuple(param.shape)
                if tuple(sl.get_shape()) != shape:
                    raise ValueError(f"{path}: {ckpt!r} has shape {tuple(sl.get_shape())}, the model expects {shape}")
                if isinstance(param, DTensor):
                    local = param.to_local()
                    placements = tuple(param.placements)
                    if placements == (Shard(0),):
                        _, offset = compute_local_shape_and_global_offset(shape, param.device_mesh, placements)
                        rows = local.shape[0] if local.ndim else 0
                        piece = sl[offset[0] : offset[0] + rows] if rows else None
                    elif all(isinstance(p, Replicate) for p in placements):
                        piece = sl[:]
                    else:
                        raise ValueError(f"parameter {name!r}: placement {placements} is not supported here")
                    if piece is not None:
                        local.copy_(piece.to(local.dtype))
                else:
                    param.copy_(sl[:].to(param.dtype))
    finally:
        handles.clear()
    return model
