"""Per-step metrics: one record per step, fanned out to the loggers (``trainer.loggers``).

The record is built once (:meth:`MetricsLogger.log`) and every sink gets the same one: ``metrics.jsonl`` (one JSON
object per line), TensorBoard event files, a Weights & Biases run. Every value written is a finite float (or int);
a non-finite value is logged as ``null`` in JSON (left out of TensorBoard and W&B) and counted in
``metrics/non_finite`` so a NaN never disappears silently.

A resumed run continues the logs of its checkpoint's step ``s``: records of later steps, written before the
interruption and about to be redone, are dropped (``metrics.jsonl``/``samples.jsonl`` truncated, TensorBoard purged
from ``s + 1``) and W&B continues the same run (its id is kept in ``wandb_run_id``; W&B ignores a step logged again,
so there the redone steps keep the values logged before the interruption).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
import uuid
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ivgr_dist.runtime.logs import quiet

if TYPE_CHECKING:
    from ivgr_dist.config import Config

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
SAMPLES_FILE = "samples.jsonl"
WANDB_ID_FILE = "wandb_run_id"


class JsonlSink:
    """``metrics.jsonl`` and the sample log ``samples.jsonl``: appended, one JSON object per line."""

    def __init__(self, directory: Path):
        self.path, self.samples_path = directory / METRICS_FILE, directory / SAMPLES_FILE

    def write(self, step: int, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def write_samples(self, step: int, samples: list[dict]) -> None:
        with self.samples_path.open("a") as f:
            for sample in samples:
                f.write(json.dumps(sample) + "\n")

    def close(self) -> None:
        return None


class TensorBoardSink:
    """Scalars in ``<dir>/tensorboard``; ``purge_step``: TensorBoard discards the directory's earlier events from
    that step on (a resumed run redoes them)."""

    def __init__(self, directory: Path, purge_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(directory / "tensorboard"), purge_step=purge_step)

    def write(self, step: int, record: dict) -> None:
        for key, value in record.items():
            if key != "step" and value is not None:
                self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def write_samples(self, step: int, samples: list[dict]) -> None:
        return None  # scalars only; the samples are in samples.jsonl and W&B

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """One W&B run per output directory: its id is kept in ``<dir>/wandb_run_id`` and reused on resume
    (``resume="allow"``). The API key and the mode (``WANDB_MODE=offline``) come from the environment, never from the
    config; W&B writes its local files under ``<dir>/wandb`` unless ``WANDB_DIR`` says otherwise."""

    def __init__(
        self,
        directory: Path,
        *,
        project: str = "ivgr-dist",
        entity: str | None = None,
        name: str | None = None,
        tags: Sequence[str] = (),
        config: dict | None = None,
        resume: bool = True,
    ):
        self.wandb = wandb = _import_wandb()
        id_file = directory / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if resume and id_file.is_file() else ""
        if not run_id:
            run_id = uuid.uuid4().hex[:16]
            id_file.write_text(run_id + "\n")  # before the run starts, so that a run killed early resumes it
        try:
            self.run = wandb.init(
                project=project,
                entity=entity,
                name=name or directory.resolve().name,
                tags=list(tags) or None,
                config=config,
                id=run_id,
                resume="allow",
                dir=None if os.environ.get("WANDB_DIR") else str(directory),
                settings=wandb.Settings(silent=True) if quiet() else None,  # its banner: logs/driver.log
            )
        except Exception as exc:  # noqa: BLE001 - say what to do, keep W&B's reason
            raise RuntimeError(
                f"wandb.init failed: {exc} (online runs need WANDB_API_KEY or `wandb login`; WANDB_MODE=offline "
                "logs locally)"
            ) from exc
        log.info("W&B run %s (id %s, project %s)", self.run.name, run_id, project)

    def write(self, step: int, record: dict) -> None:
        self.run.log({k: v for k, v in record.items() if k != "step" and v is not None}, step=step)

    def write_samples(self, step: int, samples: list[dict]) -> None:
        columns = list(dict.fromkeys(k for s in samples for k in s))
        rows = [[_table_cell(s.get(c)) for c in columns] for s in samples]
        self.run.log({"samples": self.wandb.Table(columns=columns, data=rows)}, step=step)

    def close(self) -> None:
        self.run.finish()


def _import_wandb():
    try:
        import wandb
    except ImportError:
        raise ImportError(
            "trainer.loggers has wandb but the wandb package is not installed: pip install wandb "
            "(or pip install -e .[wandb])"
        ) from None
    return wandb


def require_loggers(loggers: Sequence[str]) -> None:
    """Raise now (one line) if a logger's package is missing, rather than once the run's actors are up."""
    if "wandb" in loggers:
        _import_wandb()


def wandb_options(cfg: Config, name_suffix: str = "") -> dict:
    """:class:`WandbSink` arguments from ``cfg.trainer``; the run's config is the whole resolved config."""
    t = cfg.trainer
    return {
        "project": t.wandb_project,
        "entity": t.wandb_entity,
        "name": (t.wandb_run_name or Path(t.output_dir).resolve().name) + name_suffix,
        "tags": list(t.wandb_tags),
        "config": dataclasses.asdict(cfg),
    }


def _table_cell(value: Any) -> Any:
    """A W&B table cell: nested values (reward components, boxes) as JSON text."""
    return json.dumps(value) if isinstance(value, (dict, list)) else value


class MetricsLogger:
    """Builds each step's record and hands the same record to every sink (``loggers``).

    ``resume_step``: the run continues after this step (a resumed checkpoint's, 0 for a fresh start in an old
    directory): ``metrics.jsonl`` and ``samples.jsonl`` keep only the records up to it, TensorBoard purges later
    events and W&B continues the run whose id ``wandb_run_id`` holds. None: append, and start a new W&B run.
    ``wandb``: keyword arguments of :class:`WandbSink` (project, entity, name, tags, config).
    """

    def __init__(
        self,
        output_dir: str | Path,
        loggers: Sequence[str] = ("jsonl", "tensorboard"),
        *,
        resume_step: int | None = None,
        wandb: dict | None = None,
    ):
        self.dir = Path(output_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / METRICS_FILE
        self.samples_path = self.dir / SAMPLES_FILE
        if resume_step is not None:
            for path in (self.path, self.samples_path):
                dropped = truncate_jsonl(path, resume_step)
                if dropped:
                    log.info("%s: dropped %d record(s) after step %d (redone after resume)", path, dropped, resume_step)
                if dropped and path == self.path and "wandb" in loggers:
                    log.warning(
                        "W&B keeps what it logged after step %d before the interruption: it ignores a step logged "
                        "again (steps only increase), so those steps keep their old values there",
                        resume_step,
                    )
        self.sinks: list = []
        try:
            for name in loggers:
                sink = self._sink(name, resume_step, wandb or {})
                if sink is not None:
                    self.sinks.append(sink)
        except BaseException:
            self.close()
            raise

    def _sink(self, name: str, resume_step: int | None, wandb: dict):
        if name == "jsonl":
            return JsonlSink(self.dir)
        if name == "tensorboard":
            try:
                return TensorBoardSink(self.dir, None if resume_step is None else resume_step + 1)
            except ImportError as exc:  # tensorboard is a core dependency; tolerate its absence in slim installs
                log.warning("no TensorBoard logs (%s)", exc)
                return None
        if name == "wandb":
            return WandbSink(self.dir, resume=resume_step is not None, **wandb)
        raise ValueError(f"unknown logger {name!r}: expected jsonl, tensorboard or wandb")

    def log(self, step: int, metrics: dict[str, float]) -> dict:
        """Write one step's metrics to every sink; returns the record written."""
        record: dict[str, float | int | None] = {"step": step}
        bad = 0
        for key, value in sorted(metrics.items()):
            value = float(value)
            if math.isfinite(value):
                record[key] = value
            else:
                record[key] = None
                bad += 1
        record["metrics/non_finite"] = bad
        for sink in self.sinks:
            sink.write(step, record)
        return record

    def log_samples(self, step: int, samples: list[dict]) -> None:
        """Write one step's sample rollouts (:func:`ivgr_dist.driver.samples.sample_records`) where a sink keeps them."""
        if samples:
            for sink in self.sinks:
                sink.write_samples(step, samples)

    def close(self) -> None:
        for sink in self.sinks:
            try:
                sink.close()
            except Exception as exc:  # noqa: BLE001 - closing one logger must not keep the others open
                log.warning("closing %s: %s", type(sink).__name__, exc)
        self.sinks = []


def truncate_jsonl(path: str | Path, last_step: int) -> int:
    """Keep the records of ``path`` whose ``step`` is at most ``last_step`` (a missing file stays missing); the
    file is replaced at once (temporary file + rename), never left half-written. Returns the records dropped."""
    path = Path(path)
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    with path.open() as f:
        for line in f:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by the interruption
                dropped += 1
                continue
            step = record.get("step") if isinstance(record, dict) else None
            if isinstance(step, (int, float)) and step > last_step:
                dropped += 1
            else:
                kept.append(line if line.endswith("\n") else line + "\n")
    if dropped:
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(kept))
        tmp.replace(path)
    return dropped


class Timer:
    """Named wall-clock sections: ``with timer("generate"): ...`` -> ``time/generate_s``."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0

    def metrics(self) -> dict[str, float]:
        return {f"time/{k}_s": v for k, v in self.seconds.items()}


class Tracer:
    """A Chrome/Perfetto trace (``trainer.trace``): complete events on named tracks, one track per engine,
    reward worker, learner phase and weight push; thread-safe (the batch producer records from its thread).
    Times are ``time.perf_counter()`` values, written in microseconds from the tracer's start."""

    def __init__(self, path: str | Path):
        import threading

        self.path = Path(path)
        self.t0 = time.perf_counter()
        self._events: list[dict] = []
        self._tracks: dict[str, int] = {}
        self._lock = threading.Lock()

    def span(self, track: str, name: str, start: float, end: float, **args) -> None:
        with self._lock:
            tid = self._tracks.setdefault(track, len(self._tracks) + 1)
            event = {"name": name, "ph": "X", "pid": 1, "tid": tid, "ts": (start - self.t0) * 1e6}
            event["dur"] = max(0.0, end - start) * 1e6
            if args:
                event["args"] = args
            self._events.append(event)

    @contextmanager
    def __call__(self, track: str, name: str, **args):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.span(track, name, t0, time.perf_counter(), **args)

    def write(self) -> Path:
        """Write everything recorded so far (the file is replaced, so it is complete at any time)."""
        with self._lock:
            meta = [
                {"name": "thread_name", "ph": "M", "pid": 1, "tid": tid, "args": {"name": track}}
                for track, tid in self._tracks.items()
            ]
            doc = {"traceEvents": meta + list(self._events), "displayTimeUnit": "ms"}
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(json.dumps(doc))
        tmp.replace(self.path)
        return self.path


def read_metrics(path: str | Path) -> list[dict]:
    """All records of a metrics.jsonl file."""
    with Path(path).open() as f:
        return [json.loads(line) for line in f if line.strip()]
