"""Per-step metrics: one JSON object per line in ``metrics.jsonl``, mirrored to TensorBoard.

Every value written is a finite float (or int); a non-finite value is logged as ``null`` in JSON
and counted in ``metrics/non_finite`` so a NaN never disappears silently.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import contextmanager
from pathlib import Path


class MetricsLogger:
    """Appends step records to ``<output_dir>/metrics.jsonl`` and TensorBoard event files."""

    def __init__(self, output_dir: str | Path, tensorboard: bool = True):
        self.dir = Path(output_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / "metrics.jsonl"
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.dir / "tensorboard"))
            except ImportError:  # tensorboard is a core dependency; tolerate its absence in slim installs
                self._tb = None

    def log(self, step: int, metrics: dict[str, float]) -> dict:
        record: dict[str, float | int | None] = {"step": step}
        bad = 0
        for key, value in sorted(metrics.items()):
            value = float(value)
            if math.isfinite(value):
                record[key] = value
                if self._tb is not None:
                    self._tb.add_scalar(key, value, step)
            else:
                record[key] = None
                bad += 1
        record["metrics/non_finite"] = bad
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            self._tb.flush()
        return record

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


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
