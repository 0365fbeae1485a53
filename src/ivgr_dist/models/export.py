"""Writing a Hugging Face model directory: weights (safetensors, checkpoint naming), the source model's other
files, and a ``config.json`` whose dtype is the dtype the weights are stored in.

Files get the mode an ordinary ``open()`` gives them (``0o666`` less the process umask: 0644 with umask 022).
``safetensors`` writes through a private temporary file, which leaves ``0600``, and a model directory on a
shared cluster must be readable to the other users and services that load it.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

import torch

__all__ = ["WEIGHT_SUFFIXES", "default_file_mode", "make_files_readable", "set_config_dtype", "write_hf_model"]

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".safetensors.index.json", ".bin.index.json")
"""Files of a model directory that hold (or index) weights: not copied from the source, the export writes its own."""
DTYPE_KEYS = ("dtype", "torch_dtype")
"""Keys of ``config.json`` (and its sub-configs) naming the weights' dtype (transformers 5 / earlier)."""


def _umask() -> int:
    try:  # Linux: read it without changing it (os.umask would, for a moment, for every thread)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def default_file_mode() -> int:
    """The mode ``open(path, "w")`` gives a new file: ``0o666`` less the umask."""
    return 0o666 & ~_umask()


def make_files_readable(directory: str | Path) -> None:
    """Give every file under ``directory`` the :func:`default_file_mode` (``0600`` temporaries included)."""
    mode = default_file_mode()
    for root, _dirs, files in os.walk(directory):
        for name in files:
            os.chmod(os.path.join(root, name), mode)


def set_config_dtype(config: dict, dtype: str) -> dict:
    """``config`` (a parsed ``config.json``) with every dtype entry, sub-configs' included, set to ``dtype``."""
    out = {k: set_config_dtype(v, dtype) if isinstance(v, dict) else v for k, v in config.items()}
    for key in DTYPE_KEYS:
        if key in out:
            out[key] = dtype
    return out


def write_hf_model(out: str | Path, src: str | Path, buckets: Iterable[list[tuple[str, torch.Tensor]]], dtype: str):
    """Write a Hugging Face model directory into ``out`` (created; the caller renames it into place).

    ``buckets``: lists of ``(checkpoint name, tensor)``, one safetensors shard each, stored in ``dtype``
    (``model.safetensors`` for one, ``model-0000i-of-0000n.safetensors`` and an index for several). Every other
    file of the model directory ``src`` is copied, ``config.json`` with its dtype set to ``dtype``."""
    from safetensors.torch import save_file

    out, src = Path(out), Path(src)
    torch_dtype = getattr(torch, dtype)
    out.mkdir(parents=True)
    files: list[tuple[str, list[str]]] = []
    for bucket in buckets:
        name = f"model-part{len(files):05d}.safetensors"
        tensors = {n: t.to(torch_dtype).contiguous().cpu() for n, t in bucket}
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        files.append((name, list(tensors)))
    if len(files) == 1:
        (out / files[0][0]).rename(out / "model.safetensors")
    else:
        weight_map = {}
        for i, (name, keys) in enumerate(files):
            final = f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
            (out / name).rename(out / final)
            weight_map.update(dict.fromkeys(keys, final))
        index = {"metadata": {}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    for f in src.iterdir():
        if not f.is_file() or f.name.endswith(WEIGHT_SUFFIXES):
            continue
        if f.name == "config.json":
            config = set_config_dtype(json.loads(f.read_text()), dtype)
            (out / f.name).write_text(json.dumps({**config, "dtype": dtype}, indent=2) + "\n")
        else:
            shutil.copy2(f, out / f.name)
    make_files_readable(out)  # safetensors' 0600 temporaries, and copies keep the source's modes
