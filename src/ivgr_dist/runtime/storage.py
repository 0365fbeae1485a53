"""The storage contract of a multi-node run, and the start-up check that holds every node to it.

Contract: everything one process writes and another reads lives under ``trainer.output_dir`` (metrics,
checkpoints with every learner rank's shards, the warm start's and the final policy's exports) or is read
from ``model.path``; both must be the same directory on every node (a shared file system). The process that
writes a file finalises it: learner rank 0 writes its export to a temporary sibling and renames it itself;
each rank confirms the checkpoint shards it wrote and the driver writes ``COMPLETE`` only once it sees all
of them. Data files are read by the driver only.

Paths are made absolute once, on the driver (:func:`resolve_paths`), before any actor sees them. A relative
path under ``ray job submit --working-dir`` resolves into the job's working-directory copy, which every node
unpacks for itself: such a path is node-local by construction, and :func:`check_not_node_local` refuses it
at once. Then :class:`StorageProbe` checks what a path cannot say by itself: before a role's actors start,
a probe task in each of their placement-group bundles reads the driver's probe file, writes its own and checks
it sees ``model.path``; the driver then reads every probe file. A node that cannot see them stops the run,
naming the node, the path and the fix.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import socket
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ivgr_dist.config import Config

log = logging.getLogger(__name__)

__all__ = ["StorageError", "StorageProbe", "check_not_node_local", "resolve_paths"]

SHARED = ("trainer.output_dir", "model.path", "sft.output_dir")
"""Config keys whose directories several nodes' processes read or write."""
_FIX = (
    "Everything the learner ranks, the engines and the driver exchange lives under trainer.output_dir and "
    "model.path: give them absolute paths on storage every node mounts (NFS, Lustre, a cloud file system)"
)


class StorageError(RuntimeError):
    """A path is not shared the way the storage contract needs; the message names the node and the fix."""


def _abs(p: str | None) -> str | None:
    return None if p is None else os.path.abspath(os.path.expanduser(p))


def resolve_paths(cfg: Config) -> Config:
    """``cfg`` with every path made absolute against the driver's working directory (done once, here)."""
    return dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, path=_abs(cfg.model.path)),
        data=dataclasses.replace(
            cfg.data,
            train_files=[_abs(f) for f in cfg.data.train_files],
            val_files=[_abs(f) for f in cfg.data.val_files],
            image_root=_abs(cfg.data.image_root),
        ),
        sft=dataclasses.replace(cfg.sft, output_dir=_abs(cfg.sft.output_dir)),
        trainer=dataclasses.replace(cfg.trainer, output_dir=_abs(cfg.trainer.output_dir)),
    )


def _get(cfg: Config, key: str) -> str | None:
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def _runtime_dir(path: str) -> str | None:
    """The Ray per-node runtime-resources directory ``path`` is in (a job's working-dir copy), if any."""
    marker = f"{os.sep}runtime_resources{os.sep}"
    i = path.find(marker)
    return path[: i + len(marker) - 1] if i >= 0 else None


def check_not_node_local(original: Config, resolved: Config) -> None:
    """Refuse a shared path that resolved into the job's working-directory copy (one per node)."""
    for key in SHARED:
        value, where = _get(original, key), _get(resolved, key)
        if value is None or where is None:
            continue
        if _runtime_dir(where) is not None:
            raise StorageError(
                f"{key}={value!r} resolves to {where}, inside this node's copy of the job's working directory "
                f"({_runtime_dir(where)}): under ray job submit --working-dir every node unpacks its own copy, so "
                f"the other nodes' processes would not see it. {_FIX}"
            )


def _probe(root: str, label: str, model_path: str) -> dict[str, Any]:
    """Runs in a placement-group bundle of a role (a Ray task): what this node sees of the shared paths."""
    import ray

    node = {"label": label, "host": socket.gethostname(), "ip": ray.util.get_node_ip_address()}
    node["node_id"] = ray.get_runtime_context().get_node_id()
    errors = []
    driver = Path(root) / "driver.json"
    if not driver.is_file():
        errors.append(f"cannot see {driver}, which the driver wrote")
    try:
        (Path(root) / f"{label.replace(' ', '_')}.json").write_text(json.dumps(node))
    except OSError as exc:
        errors.append(f"cannot write under {root}: {exc}")
    if model_path and not (Path(model_path) / "config.json").is_file():
        errors.append(f"cannot see model.path={model_path} (no config.json there)")
    return {**node, "errors": errors}


class StorageProbe:
    """The driver's side of the start-up check (see the module docstring)."""

    def __init__(self, output_dir: str | Path, model_path: str | Path | None = None, timeout_s: float = 60.0):
        self.root = Path(output_dir) / ".ivgr_storage" / uuid.uuid4().hex[:12]
        self.model_path = str(model_path) if model_path else ""
        self.timeout_s = timeout_s
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "driver.json").write_text(json.dumps({"host": socket.gethostname(), "time": time.time()}))
        self.checked: list[dict[str, Any]] = []

    def probe(self, targets: Sequence[tuple[str, Any, int]]) -> list[dict[str, Any]]:
        """Probe each ``(label, placement group, bundle index)``; :class:`StorageError` if any node fails."""
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        task = ray.remote(num_cpus=0, max_retries=0)(_probe)
        refs = [
            task.options(
                scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=pg, placement_group_bundle_index=b)
            ).remote(str(self.root), label, self.model_path)
            for label, pg, b in targets
        ]
        ready, pending = ray.wait(refs, num_returns=len(refs), timeout=self.timeout_s)
        if pending:
            late = [targets[refs.index(r)][0] for r in pending]
            raise StorageError(f"storage probe: {late} did not answer within {self.timeout_s:g}s")
        results = ray.get(refs)
        problems = []
        for r in results:
            where = f"{r['label']} on node {r['ip']} ({r['host']}, {r['node_id'][:8]})"
            problems += [f"{where} {e}" for e in r["errors"]]
            mine = self.root / f"{r['label'].replace(' ', '_')}.json"
            if not r["errors"] and not mine.is_file():
                problems.append(f"the driver cannot see {mine}, which {where} wrote")
        if problems:
            raise StorageError(
                f"trainer.output_dir={self.root.parent.parent} is not shared: {'; '.join(problems)}. {_FIX}"
            )
        self.checked += results
        return results

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
