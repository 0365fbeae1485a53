"""A run's checkpoints and exported model directories: written so that no crash, full disk or corrupt file can
destroy the run.

Layout: ``<trainer.output_dir>/checkpoints/step_NNNNNN/`` holds ``learner/`` (the ranks' DCP shards),
``trainer_state.json`` (the driver's state) and ``COMPLETE``. Only a directory named exactly ``step_NNNNNN`` with
``COMPLETE`` in it is a checkpoint; other names are never loaded:

- ``step_N.tmp``: a save in progress. :func:`save` writes everything there (DCP's writer fsyncs each shard and
  ``.metadata``, which names the shards by relative path, so a directory rename keeps it valid), fsyncs
  ``trainer_state.json``, ``COMPLETE`` and the directories, then renames it to ``step_N`` and fsyncs the parent.
  A leftover (a crash mid-save) is removed by the next save.
- ``step_N.trash``: being removed (pruning, a replaced ``step_N``); removed by the next save.
- ``step_N.corrupt``: a checkpoint that did not load while an older one did (:func:`resume`); kept for
  inspection, never loaded or deleted.

Pruning (``trainer.keep_checkpoints``) deletes only complete checkpoints older than the one just written.
:func:`replace_dir` swaps a finished directory in (checkpoint or Hugging Face export) with Linux's
``renameat2(RENAME_EXCHANGE)``, so the old one is there until the new one is.

Import-light (no torch, no Ray): ``ivgr-dist train`` asks :func:`latest_checkpoint` and
:func:`existing_checkpoints` before it starts anything.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from ivgr_dist.quote import short_text
from ivgr_dist.runtime.storage import StorageError

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "CorruptCheckpoint",
    "check_shards",
    "complete_checkpoints",
    "dcp_load",
    "dcp_save",
    "existing_checkpoints",
    "latest_checkpoint",
    "move_run_aside",
    "prune",
    "read_state",
    "replace_dir",
    "resume",
    "save",
]

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
COMPLETE_FILE = "COMPLETE"
REQUIRED_KEYS = ("step", "weight_version", "sampler", "scorer")
"""What ``Trainer.maybe_resume`` reads from ``trainer_state.json``; a state without one of them does not load."""
_NAME = re.compile(r"step_(\d+)$")
_GARBAGE = re.compile(r"step_\d+\.(tmp|trash)$")


class CheckpointError(StorageError):
    """A checkpoint could not be written, or none of a run's checkpoints loads; the message names the directory."""


class CorruptCheckpoint(ValueError):
    """This checkpoint does not load (its state file or the learner's shards); an older one may."""


@dataclass(frozen=True)
class Checkpoint:
    """A complete checkpoint: its directory and the driver state saved in it."""

    path: Path
    state: dict

    @property
    def step(self) -> int:
        """The RL step it was written after."""
        return int(self.state["step"])


def _name(step: int) -> str:
    return f"step_{step:06d}"


# ------------------------------------------------------------------------------------------ durable files


def write_durable(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` and fsync it (a crash after this returns cannot leave it empty)."""
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    """Make the entries of directory ``path`` (creations, renames) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError as exc:  # some network file systems cannot fsync a directory; their renames are synchronous
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


@functools.lru_cache(maxsize=1)
def _renameat2():
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2  # glibc >= 2.28
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_AT_FDCWD, _RENAME_EXCHANGE = -100, 2
_fallbacks = {"count": 0}


def _exchange(a: Path, b: Path) -> bool:
    """Swap ``a`` and ``b`` in one atomic step; False where the system or file system cannot."""
    fn = _renameat2()
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):  # e.g. NFS: no RENAME_EXCHANGE
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def replace_dir(new: Path, final: Path) -> None:
    """Put the finished directory ``new`` at ``final`` (same file system), durably, with never a moment without
    a ``final`` once one existed: an existing ``final`` is exchanged with ``new`` atomically (renameat2) and
    removed after. Where the file system cannot exchange (counted, logged once): ``final`` is renamed aside,
    ``new`` renamed in (the old one put back if that fails) and the old one removed: two renames apart."""
    new, final = Path(new), Path(final)
    parent = final.parent
    if not os.path.lexists(final):
        os.rename(new, final)
        fsync_dir(parent)
        return
    if _exchange(new, final):
        fsync_dir(parent)
        _remove(new)
        return
    _fallbacks["count"] += 1
    if _fallbacks["count"] == 1:
        log.info("%s: no atomic directory exchange on this file system; replacing it with two renames", parent)
    aside = final.with_name(f"{final.name}.trash")
    _remove(aside)
    os.rename(final, aside)
    try:
        os.rename(new, final)
    except BaseException:
        os.rename(aside, final)
        raise
    fsync_dir(parent)
    _remove(aside)


def _remove(path: Path) -> None:
    """Delete a directory that is no longer needed; a failure leaves a leftover (logged), not an error."""
    if not os.path.lexists(path):
        return
    try:
        shutil.rmtree(path)
    except OSError as exc:
        log.warning("could not remove %s (%s); remove it by hand", path, short_text(exc))


# ----------------------------------------------------------------------------------------------- reading


def complete_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every ``step_N`` with ``COMPLETE`` under ``output_dir/checkpoints``, oldest first."""
    return _complete(Path(output_dir) / CHECKPOINTS)


def _complete(root: Path) -> list[tuple[int, Path]]:
    if not root.is_dir():
        return []
    found = ((_NAME.fullmatch(p.name), p) for p in root.iterdir())
    return sorted((int(m.group(1)), p) for m, p in found if m and (p / COMPLETE_FILE).is_file())


def existing_checkpoints(output_dir: str | Path) -> list[Path]:
    """Everything under ``output_dir/checkpoints`` that a run left (complete or not), sorted by name."""
    root = Path(output_dir) / CHECKPOINTS
    return sorted(p for p in root.glob("step_*")) if root.is_dir() else []


def read_state(path: Path, step: int | None = None) -> dict:
    """The parsed ``trainer_state.json`` of checkpoint ``path``; :class:`CorruptCheckpoint` saying why not."""
    f = Path(path) / STATE_FILE
    try:
        text = f.read_text()
    except FileNotFoundError:
        raise CorruptCheckpoint(f"{STATE_FILE} is missing") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CorruptCheckpoint(f"{STATE_FILE} cannot be read: {short_text(exc)}") from exc
    if not text.strip():
        raise CorruptCheckpoint(f"{STATE_FILE} is empty")
    try:
        state = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CorruptCheckpoint(f"{STATE_FILE} is not JSON ({exc}): {short_text(repr(text))}") from None
    if not isinstance(state, dict):
        raise CorruptCheckpoint(f"{STATE_FILE} holds {type(state).__name__}, not an object")
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise CorruptCheckpoint(f"{STATE_FILE} lacks {missing} (needs {list(REQUIRED_KEYS)})")
    if not isinstance(state["step"], int) or (step is not None and state["step"] != step):
        raise CorruptCheckpoint(f"{STATE_FILE} says step={short_text(repr(state['step']))}, the directory step {step}")
    return state


def latest_checkpoint(output_dir: str | Path) -> Checkpoint | None:
    """The newest complete checkpoint whose driver state reads (path + parsed state), or None. A query: it
    warns about nothing and renames nothing (:func:`resume` does, and also loads the learner's shards)."""
    for step, path in reversed(complete_checkpoints(output_dir)):
        try:
            return Checkpoint(path, read_state(path, step))
        except CorruptCheckpoint as exc:
            log.debug("skipping checkpoint %s: %s", path, exc)
    return None


def _corruption(exc: BaseException | None) -> str | None:
    """Why, if ``exc`` or an exception it wraps says a checkpoint does not load (through Ray too: a rank's error
    arrives as a RayTaskError whose ``cause`` is the rank's exception, wrapped by ``LearnerGroup._gather``)."""
    for _ in range(20):
        if exc is None:
            return None
        cause = getattr(exc, "cause", None)
        if isinstance(cause, CorruptCheckpoint):
            return short_text(cause)
        if isinstance(exc, CorruptCheckpoint):
            return short_text(exc)
        exc = exc.__cause__ or exc.__context__
    return None


def resume(output_dir: str | Path, load: Callable[[Checkpoint], None]) -> Checkpoint | None:
    """The newest checkpoint that is complete AND loads: its state file reads and ``load`` (the learner's
    shards, the sampler, the scorer) does not raise :class:`CorruptCheckpoint`. A corrupt one gets one warning
    naming it and why and the previous one is tried; once one loads, the corrupt newer ones are renamed
    ``step_N.corrupt`` (kept, never tried again). Any other error from ``load`` stops here (nothing renamed).
    None without checkpoints; :class:`CheckpointError` when there are some and none loads."""
    root = Path(output_dir) / CHECKPOINTS
    failed: list[tuple[Path, str]] = []
    for step, path in reversed(_complete(root)):
        try:
            if not (path / "learner" / ".metadata").is_file():
                raise CorruptCheckpoint("learner/.metadata is missing")
            found = Checkpoint(path, read_state(path, step))
            load(found)
        except Exception as exc:
            why = _corruption(exc)
            if why is None:
                raise
            log.warning("checkpoint %s does not load (%s); trying the previous one", path, why)
            failed.append((path, why))
            continue
        for bad, _ in failed:
            _quarantine(bad)
        return found
    if failed:
        reasons = "; ".join(f"{p.name}: {why}" for p, why in failed)
        raise CheckpointError(
            f"no checkpoint in {root} loads ({reasons}); start over with `ivgr-dist train --overwrite` (moves them "
            "aside) or set trainer.output_dir to a new directory"
        )
    return None


def _quarantine(path: Path) -> None:
    aside = path.with_name(f"{path.name}.corrupt")
    n = 1
    while os.path.lexists(aside):
        n += 1
        aside = path.with_name(f"{path.name}.corrupt-{n}")
    os.rename(path, aside)
    fsync_dir(path.parent)
    log.info("moved %s to %s: not tried again, kept for inspection (nothing deleted)", path, aside.name)


# ------------------------------------------------------------------------------------------ the learner's part


def _dcp_failure(exc: BaseException) -> str:
    """The first rank's error of a DCP ``CheckpointException`` (its str is every rank's whole traceback)."""
    for error, _trace in getattr(exc, "failures", {}).values():
        return short_text(f"{type(error).__name__}: {error}")
    return short_text(exc)


def dcp_save(state: dict, path: str | Path) -> None:
    """``torch.distributed.checkpoint.save`` (collective); a failure raises ``OSError`` naming ``path`` and the
    error. DCP raises ``CheckpointException``, a BaseException that ``except Exception`` (and Ray) would take for
    an interrupt."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        dcp.save(state, checkpoint_id=str(path))
    except CheckpointException as exc:
        raise OSError(f"DCP cannot write {path}: {_dcp_failure(exc)}") from exc


STORAGE_ERRNOS = frozenset(
    {errno.EIO, errno.ESTALE, errno.EACCES, errno.EPERM, errno.ETIMEDOUT, errno.ENOTCONN, errno.EHOSTDOWN,
     errno.EHOSTUNREACH, errno.ENETDOWN, errno.ENETUNREACH, errno.ECONNRESET, errno.ENOLINK}
)  # fmt: skip
"""Read errors that blame the storage (a network file system's hiccup, permissions), not the checkpoint's bytes."""


def _errors(exc: BaseException):
    """``exc``, the per-rank errors a DCP ``CheckpointException`` carries, and what each was raised from."""
    seen, todo = set(), [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [err for err, _trace in getattr(e, "failures", {}).values()]
        todo += [e.__cause__, e.__context__]


def dcp_load(state: dict, path: str | Path) -> None:
    """``torch.distributed.checkpoint.load`` into ``state`` (collective). A read error that blames the storage
    (:data:`STORAGE_ERRNOS`: EIO, ESTALE, EACCES, ... on a network file system) raises ``StorageError``, which
    stops the run with the checkpoint left as it is (a transient fault must not mark a good checkpoint corrupt);
    any other error (a truncated shard, a missing file, bad metadata) raises :class:`CorruptCheckpoint`."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        dcp.load(state, checkpoint_id=str(path))
    except (Exception, CheckpointException) as exc:
        fault = next((e for e in _errors(exc) if isinstance(e, OSError) and e.errno in STORAGE_ERRNOS), None)
        if fault is not None:
            raise StorageError(
                f"cannot read checkpoint {path}: {short_text(fault)}; a storage fault, not a corrupt checkpoint: it is "
                "left as it is; resume once the storage answers"
            ) from exc
        raise CorruptCheckpoint(f"DCP cannot load {path}: {_dcp_failure(exc)}") from exc


# ----------------------------------------------------------------------------------------------- writing


def check_shards(path: Path, confirmed: list[dict]) -> None:
    """Every file each learner rank says it wrote is visible here with its size (else the storage is not shared)."""
    for c in confirmed:
        for name, size in c["files"].items():
            f = Path(path) / name
            if not f.is_file() or f.stat().st_size != size:
                raise StorageError(
                    f"checkpoint {path}: learner rank {c['rank']} (node {c['node'][:8]}) wrote {name} ({size} bytes) "
                    f"but the driver {'sees ' + str(f.stat().st_size) + ' bytes' if f.is_file() else 'cannot see it'}: "
                    "trainer.output_dir must be on storage every node mounts; the checkpoint is not written"
                )


def save(output_dir: str | Path, step: int, write_learner: Callable[[Path], None], state: dict, keep: int) -> Path:
    """Write checkpoint ``step_N`` (see the module docstring): ``write_learner(dir)`` writes the learner's shards
    into ``dir``, ``state`` is the driver's. Then :func:`prune`. On a failure the partial ``step_N.tmp`` is
    removed, the older checkpoints are as they were, and :class:`CheckpointError` names the directory."""
    root = Path(output_dir) / CHECKPOINTS
    final, tmp = root / _name(step), root / f"{_name(step)}.tmp"
    root.mkdir(parents=True, exist_ok=True)
    for p in root.iterdir():
        if _GARBAGE.fullmatch(p.name):
            log.info("removing %s (left by an interrupted save or removal)", p)
            _remove(p)
    try:
        tmp.mkdir()
        write_learner(tmp / "learner")
        write_durable(tmp / STATE_FILE, json.dumps(state))
        write_durable(tmp / COMPLETE_FILE, str(time.time()))
        fsync_dir(tmp / "learner")
        fsync_dir(tmp)
        replace_dir(tmp, final)  # a step_N saved before (resumed from an older one): swapped, then removed
    except Exception as exc:
        _remove(tmp)
        if isinstance(exc, StorageError):
            raise
        previous = [p for s, p in _complete(root) if s < step]
        raise CheckpointError(
            f"checkpoint after step {step} not written: {tmp}: {short_text(exc)}; the older checkpoints are untouched "
            f"(newest: {previous[-1] if previous else 'none'})"
        ) from exc
    log.info("checkpoint written to %s", final)
    prune(root, step, keep)
    return final


def prune(root: Path, step: int, keep: int) -> None:
    """Keep the newest ``keep`` complete checkpoints up to ``step`` (the one just written; 0: keep all): older
    ones are renamed ``.trash`` (never half-deleted under their name) and deleted. Newer-numbered ones (another
    run's, or steps about to be redone) are never touched."""
    if keep <= 0:
        return
    upto = [p for s, p in _complete(root) if s <= step]
    for p in upto[:-keep]:
        log.info("removing old checkpoint %s (trainer.keep_checkpoints=%d)", p, keep)
        trash = p.with_name(f"{p.name}.trash")
        try:
            _remove(trash)
            os.rename(p, trash)
        except OSError as exc:  # the run goes on; the next save tries again
            log.warning("could not remove old checkpoint %s: %s", p, short_text(exc))
            continue
        _remove(trash)


# ----------------------------------------------------------------------------------------------- starting over


def move_run_aside(output_dir: str | Path, keep: Iterable[str | Path] = ()) -> Path | None:
    """``ivgr-dist train --overwrite``: move an earlier run's files (checkpoints, metrics.jsonl, trained.jsonl,
    samples.jsonl, TensorBoard events, logs/, model/, ...) from ``output_dir`` into a new sibling
    ``<output_dir>.old-<YYYYmmdd-HHMMSS>`` (nothing deleted; it is a run directory of its own). Entries that are
    or hold a path in ``keep`` (the warm start, inputs the config reads) stay. Returns the sibling, or None when
    there was nothing to move."""
    out = Path(output_dir)
    kept = [Path(k).resolve() for k in keep]

    def stays(p: Path) -> bool:
        p = p.resolve()
        return any(k == p or p in k.parents for k in kept)

    entries = sorted(p for p in out.iterdir() if not stays(p)) if out.is_dir() else []
    if not entries:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside, n = out.with_name(f"{out.name}.old-{stamp}"), 1
    while os.path.lexists(aside):
        n += 1
        aside = out.with_name(f"{out.name}.old-{stamp}-{n}")
    aside.mkdir()
    for p in entries:
        try:
            os.rename(p, aside / p.name)
        except OSError as exc:
            raise CheckpointError(
                f"--overwrite: cannot move {p} to {aside}: {short_text(exc)}; what was moved is in {aside}; move the "
                "rest yourself or set trainer.output_dir to a new directory"
            ) from exc
    fsync_dir(aside)
    fsync_dir(out)
    return aside
