"""Records from parquet files: validated at load, materialised lazily, expanded into streams.

:class:`RecordTable` opens one or more parquet files in the iVGR-RL-51K layout (memory-mapped, kept
as Arrow tables; a row becomes a Python dict only when it is asked for). ``original_idx`` is the row
index across the files in order, bad rows included, so it is stable whatever is dropped.

At load every row is checked (vectorised over Arrow columns; image files probed in a small thread
pool):

====================  ====================================================================
reason                the row ...
====================  ====================================================================
``empty_answer``      has a null or blank ``answer``
``bad_bbox``          has a target whose ``bbox`` is not 4 finite numbers, has ``x1 >= x2`` or
                      ``y1 >= y2``, a negative coordinate, lies outside its image (boxes refer to
                      the first image), or has target boxes but no image
``missing_image``     names an image file that does not exist, or has an empty image entry
``unreadable_image``  has an image (file or bytes) PIL cannot open and verify
``image_outside_root`` names an image path that leaves the image root (absolute, or ``..``), unless
                      ``data.allow_outside_image_root=true`` (:mod:`ivgr_dist.data.sources`)
``bad_image_size``    has an image the Qwen resize rule cannot handle (aspect ratio > 200 ...)
``too_many_images``   has more images than the rollout engines take per prompt
====================  ====================================================================

Before any row, each column the pipeline reads is checked for its type (:mod:`ivgr_dist.data.schema`); a wrong
type raises :class:`DataError` naming the file, the column, the type found and the types accepted. ``images``
may hold paths, raw bytes or ``datasets``-style ``{bytes, path}`` structs (:mod:`ivgr_dist.data.sources`).

At prompt time (:meth:`RecordTable.prompts`) an image that does not decode (a JPEG truncated in its pixel data
passes ``verify()``) or is gone drops its record, all streams together: counted under its reason, named in a
warning with the file and the row, and remembered (:attr:`RecordTable.dropped`) so that it is not read again;
the producer also keeps it out of later draws (``PairSampler.exclude``). With ``data.bad_rows=raise`` it
raises instead. The ``max_bad_row_fraction`` ceiling counts these drops too.

With ``data.bad_rows=raise`` the first bad row (lowest row index) raises :class:`DataError` naming
the file, the row and the problem. With ``skip`` bad rows are dropped, counted per reason and a
warning shows the first few; if more than ``data.max_bad_row_fraction`` of all rows are bad, it
raises anyway.

Streams: a record with non-empty ``target_instances`` becomes an A/B pair (``grounded`` +
``textual``), any other record one ``single`` prompt; ``data.paired_datasources`` and
``data.single_datasources`` override this per datasource. With a :class:`PromptBuilder`, every
record's prompt is measured per stream (image tokens included); a record whose prompt is longer
than ``data.max_prompt_length`` in any of its streams is dropped as a whole, so pairs stay intact.
"""

from __future__ import annotations

import logging
import math
import threading
from bisect import bisect_right
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from ivgr_dist.config import DataConfig
from ivgr_dist.data.image import FACTOR, smart_resize
from ivgr_dist.data.prompts import PromptBuilder, instances_list
from ivgr_dist.data.schema import column_problem, is_binary
from ivgr_dist.data.sources import ImageError, image_source, probe_image
from ivgr_dist.quote import short_repr
from ivgr_dist.types import Prompt

__all__ = ["BAD_ROW_REASONS", "DataError", "RecordTable", "read_parquet"]

log = logging.getLogger(__name__)

BAD_ROW_REASONS = (
    "empty_answer",
    "bad_bbox",
    "missing_image",
    "unreadable_image",
    "image_outside_root",
    "bad_image_size",
    "too_many_images",
)
"""Every reason a row can be rejected for (metric keys ``data/bad_rows/<reason>``)."""
PAIRED, SINGLE, DROPPED = 1, 2, 0
_PROGRESS_MIN_ROWS = 5000
_MAX_EXAMPLES = 5
_PROBE_CHUNK = 64  # images probed per round: bounds the image bytes held at once
_BOX_PROBLEMS = {
    1: "is not 4 finite numbers",
    2: "has x1 >= x2 or y1 >= y2 (empty or swapped corners)",
    3: "has a negative coordinate",
    4: "lies outside the image",
}


class DataError(ValueError):
    """A data file or row is unusable; the message names the file, the row and the problem."""


# --------------------------------------------------------------------------------------- helpers


def _column(table, name: str):
    """The column as one Arrow array (chunks combined, dictionary-encoded text decoded), or None when absent."""
    import pyarrow as pa

    if name not in table.column_names:
        return None
    col = table[name].combine_chunks()
    return col.dictionary_decode() if pa.types.is_dictionary(col.type) else col


def _blank_answers(col) -> np.ndarray:
    import pyarrow as pa
    import pyarrow.compute as pc

    if not pa.types.is_string(col.type) and not pa.types.is_large_string(col.type):
        col = pc.cast(col, pa.string())
    blank = pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(col)), 0)
    return np.asarray(pc.fill_null(blank, True).to_numpy(zero_copy_only=False), dtype=bool)


def _present(col) -> np.ndarray:
    """Which cells of a one-image-per-row column hold an image: non-blank text, non-empty bytes, or a non-null
    struct with either."""
    import pyarrow as pa
    import pyarrow.compute as pc

    t = col.type
    if pa.types.is_struct(t):
        out = np.zeros(len(col), dtype=bool)
        for name in ("bytes", "path"):
            if t.get_field_index(name) >= 0:
                out |= _present(pc.struct_field(col, name))
        return out & np.asarray(col.is_valid().to_numpy(zero_copy_only=False), dtype=bool)
    if pa.types.is_null(t):
        return np.zeros(len(col), dtype=bool)
    if is_binary(t):
        ok = pc.greater(pc.binary_length(col), 0)
    else:
        ok = pc.greater(pc.utf8_length(pc.utf8_trim_whitespace(col)), 0)
    return np.asarray(pc.fill_null(ok, False).to_numpy(zero_copy_only=False), dtype=bool)


def _image_cells(col, n_rows: int) -> tuple[Any, np.ndarray, np.ndarray]:
    """(flat Arrow array of images, row of each, index of each row's first image or -1) for an ``images``
    column of any accepted type (:mod:`ivgr_dist.data.schema`)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    first = np.full(n_rows, -1, dtype=np.int64)
    if col is None or pa.types.is_null(col.type):
        return None, np.zeros(0, dtype=np.int64), first
    t = col.type
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        flat = pc.list_flatten(col)
        rows = np.asarray(pc.list_parent_indices(col).to_numpy(zero_copy_only=False), dtype=np.int64)
    else:  # one image per row; a null or blank cell holds none
        present = _present(col)
        rows = np.flatnonzero(present).astype(np.int64)
        flat = col.filter(pa.array(present))
    if len(rows):
        starts = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]])
        first[rows[starts]] = starts
    return flat, rows, first


def _path_key(item: Any) -> str | None:
    """The path of a path image (rows sharing a file probe it once); None for bytes or an empty entry."""
    try:
        kind, value = image_source(item)
    except ImageError:
        return None
    return value if kind == "path" else None


def _boxes_struct(col) -> tuple[np.ndarray, np.ndarray] | None:
    """Vectorised (row of each target, (k, 4) float boxes, NaN rows where malformed) for list<struct<bbox>>."""
    import pyarrow as pa
    import pyarrow.compute as pc

    t = col.type
    if not (pa.types.is_list(t) or pa.types.is_large_list(t)) or not pa.types.is_struct(t.value_type):
        return None
    if t.value_type.get_field_index("bbox") < 0:
        return None
    bbox = pc.struct_field(pc.list_flatten(col), "bbox")
    if not (pa.types.is_list(bbox.type) or pa.types.is_large_list(bbox.type)):
        return None
    try:
        bbox = bbox.cast(pa.list_(pa.float64()))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return None
    rows = np.asarray(pc.list_parent_indices(col).to_numpy(zero_copy_only=False), dtype=np.int64)
    lengths = np.asarray(pc.fill_null(pc.list_value_length(bbox), -1).to_numpy(zero_copy_only=False))
    boxes = np.full((len(rows), 4), np.nan)
    ok = lengths == 4
    if ok.any():
        vals = pc.list_flatten(bbox.filter(pa.array(ok))).to_numpy(zero_copy_only=False)
        boxes[ok] = np.asarray(vals, dtype=np.float64).reshape(-1, 4)
    return rows, boxes


def _as_box(value: Any) -> list[float] | None:
    box = value.get("bbox") if isinstance(value, dict) else value
    if isinstance(box, (str, bytes)) or not hasattr(box, "__len__") or len(box) != 4:
        return None
    try:
        if any(isinstance(v, (str, bytes, bool)) or v is None for v in box):
            return None
        return [float(v) for v in box]
    except (TypeError, ValueError):
        return None


def _boxes_python(col) -> tuple[np.ndarray, np.ndarray]:
    """Fallback for other ``target_instances`` types: JSON strings, lists of 4-lists ..."""
    rows, boxes = [], []
    for r, cell in enumerate(col.to_pylist()):
        for inst in instances_list(cell):
            box = _as_box(inst)
            rows.append(r)
            boxes.append(box if box is not None else [math.nan] * 4)
    return np.asarray(rows, dtype=np.int64), np.asarray(boxes, dtype=np.float64).reshape(-1, 4)


def read_parquet(path: str | Path, *, schema_only: bool = False):
    """The file's Arrow table (memory-mapped), or only its schema: the one checked open of a data file.
    A missing file or one that is not parquet (truncated, another format) raises :class:`DataError` with a
    one-line message naming the file."""
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such parquet file")
    try:
        return pq.read_schema(path, memory_map=True) if schema_only else pq.read_table(path, memory_map=True)
    except Exception as exc:  # pyarrow raises ArrowInvalid, OSError ... for a damaged file
        detail = " ".join(str(exc).split())
        raise DataError(f"{path}: cannot read as parquet ({type(exc).__name__}: {detail})") from exc


# ------------------------------------------------------------------------------------------ table


class RecordTable:
    """Validated, lazily materialised records of one or more parquet files, with their streams.

    ``builder`` enables prompt-length filtering and :meth:`prompt`; without it no length filter runs.
    ``progress``: show tqdm bars (default: for files of at least 5,000 rows). ``num_workers``: threads that
    check images at load and decode and resize them in :meth:`prompts` (default ``data.image_workers``; PIL
    releases the GIL while it decodes and resizes).
    """

    def __init__(
        self,
        files: str | Path | Sequence[str | Path],
        data_cfg: DataConfig,
        builder: PromptBuilder | None = None,
        *,
        progress: bool | None = None,
        num_workers: int | None = None,
        max_images: int | None = None,
    ):
        if isinstance(files, (str, Path)):
            files = [files]
        self.files = [Path(f) for f in files]
        if not self.files:
            raise DataError("no parquet files given")
        self.cfg = data_cfg
        self.builder = builder
        self._progress = progress
        self._num_workers = max(1, int(data_cfg.image_workers if num_workers is None else num_workers))
        self._max_images = max_images
        self._factor = builder.factor if builder is not None else FACTOR
        self._tables = []
        self._offsets = [0]
        for path in self.files:
            table = read_parquet(path)
            problem = column_problem(table.schema)
            if problem is not None:
                raise DataError(f"{path}: {problem}")
            if "answer" not in table.column_names:
                raise DataError(f"{path}: no 'answer' column (columns: {table.column_names})")
            if "problem" not in table.column_names and "query" not in table.column_names:
                raise DataError(f"{path}: needs a 'problem' or 'query' column (columns: {table.column_names})")
            self._tables.append(table)
            self._offsets.append(self._offsets[-1] + table.num_rows)
        self.num_rows = self._offsets[-1]
        self._roots = [Path(data_cfg.image_root) if data_cfg.image_root else p.parent for p in self.files]

        self.counts: dict[str, int] = {"data/rows_total": self.num_rows}
        self.counts.update({f"data/bad_rows/{r}": 0 for r in BAD_ROW_REASONS})
        self.counts.update({f"data/filtered_long/{s}": 0 for s in ("grounded", "textual", "single")})
        self.bad_examples: list[str] = []
        """Messages of the first few rejected rows (file, row, problem)."""
        self.dropped: dict[int, str] = {}
        """Records dropped when their prompt was built (``original_idx`` -> bad-row reason): never read again."""
        self._lock = threading.Lock()  # prompts() runs in the producer's threads; metrics() in the trainer's

        kind = np.zeros(self.num_rows, dtype=np.int8)
        sizes: list[list[tuple[int, int]]] = [[] for _ in range(self.num_rows)]
        for f in range(len(self._tables)):
            self._load_file(f, kind, sizes)
        n_bad = sum(self.counts[f"data/bad_rows/{r}"] for r in BAD_ROW_REASONS)
        self.counts["data/bad_rows/total"] = n_bad
        if n_bad:
            log.warning(
                "skipped %d bad row(s) of %d in %s; first: %s",
                n_bad,
                self.num_rows,
                [str(p) for p in self.files],
                "; ".join(self.bad_examples),
            )
            self._check_bad_fraction()
        if builder is not None:
            self._filter_long(kind, sizes)
        self._kind = kind
        self.paired_ids: list[int] = np.flatnonzero(kind == PAIRED).tolist()
        """``original_idx`` of the records that become grounded + textual pairs."""
        self.single_ids: list[int] = np.flatnonzero(kind == SINGLE).tolist()
        """``original_idx`` of the records that become one ``single`` prompt."""
        self.counts["data/records_paired"] = len(self.paired_ids)
        self.counts["data/records_single"] = len(self.single_ids)
        if not self.paired_ids and not self.single_ids:
            raise DataError(f"no usable records in {[str(p) for p in self.files]}: {self.counts}")

    def _check_bad_fraction(self) -> None:
        """With ``skip``: more than ``data.max_bad_row_fraction`` of all rows bad (at load and since) is a broken
        data set, not a few bad rows."""
        n_bad = self.counts["data/bad_rows/total"]
        if n_bad > self.cfg.max_bad_row_fraction * self.num_rows:
            per = {r: self.counts[f"data/bad_rows/{r}"] for r in BAD_ROW_REASONS if self.counts[f"data/bad_rows/{r}"]}
            raise DataError(
                f"{n_bad} of {self.num_rows} rows are bad ({n_bad / self.num_rows:.1%}), more than "
                f"data.max_bad_row_fraction={self.cfg.max_bad_row_fraction}: {per}; first: "
                + "; ".join(self.bad_examples)
            )

    # ---------------------------------------------------------------------------------- loading

    def _bar(self, n: int, desc: str):
        from tqdm import tqdm

        disable = (n < _PROGRESS_MIN_ROWS) if self._progress is None else not self._progress
        return tqdm(total=n, desc=desc, disable=disable)

    def _load_file(self, f: int, kind: np.ndarray, sizes: list) -> None:
        table, path, base = self._tables[f], self.files[f], self._offsets[f]
        n = table.num_rows
        bad: dict[int, tuple[str, str]] = {}  # row -> (reason, detail); the first reason found wins

        def mark(rows, reason: str, detail) -> None:
            for r in rows:
                r = int(r)
                if r not in bad:
                    bad[r] = (reason, detail(r) if callable(detail) else detail)

        # answers
        try:
            blank = _blank_answers(_column(table, "answer"))
        except Exception as exc:  # pyarrow cast errors
            raise DataError(f"{path}: 'answer' column of type {table.schema.field('answer').type} is not text") from exc
        mark(np.flatnonzero(blank), "empty_answer", "answer is null or blank")

        # target boxes: geometry first (image size comes later)
        col = _column(table, "target_instances")
        if col is None:
            t_rows, boxes = np.zeros(0, dtype=np.int64), np.zeros((0, 4))
        else:
            got = _boxes_struct(col)
            t_rows, boxes = got if got is not None else _boxes_python(col)
        n_targets = np.bincount(t_rows, minlength=n)[:n] if len(t_rows) else np.zeros(n, dtype=np.int64)
        code = np.zeros(len(t_rows), dtype=np.int8)
        finite = np.isfinite(boxes).all(axis=1)
        code[~finite] = 1
        with np.errstate(invalid="ignore"):
            code[(code == 0) & ~((boxes[:, 0] < boxes[:, 2]) & (boxes[:, 1] < boxes[:, 3]))] = 2
            code[(code == 0) & (boxes < 0).any(axis=1)] = 3
        self._mark_boxes(mark, table, t_rows, code)

        # images
        flat, p_rows, first = _image_cells(_column(table, "images"), n)
        if self._max_images is not None and len(p_rows):
            per_row = np.bincount(np.asarray(p_rows, dtype=np.int64), minlength=n)
            mark(
                np.flatnonzero(per_row > self._max_images),
                "too_many_images",
                lambda r: (
                    f"{per_row[r]} images; the rollout engines take at most "
                    f"rollout.engine.max_images_per_prompt={self._max_images} per prompt"
                ),
            )
        probes = self._probe_images(flat, p_rows, bad, self._roots[f], path)
        img_w = np.full(len(p_rows), np.nan)
        img_h = np.full(len(p_rows), np.nan)
        for k, r in enumerate(p_rows):
            r = int(r)
            if r in bad:
                continue
            reason, size, detail = probes[k]
            if reason is not None:
                mark([r], reason, f"image {k - first[r]}: {detail}")
                continue
            w, h = size
            try:
                smart_resize(h, w, self._factor, self.cfg.min_pixels, self.cfg.max_pixels)
            except ValueError as exc:
                mark([r], "bad_image_size", f"image {k - first[r]}: {exc}")
                continue
            img_w[k], img_h[k] = w, h
            sizes[base + r].append((w, h))

        # boxes against their (first) image
        has_image = first >= 0
        mark(
            np.flatnonzero((n_targets > 0) & ~has_image),
            "bad_bbox",
            "has target boxes but no image",
        )
        if len(t_rows):
            fi = first[t_rows]
            w = np.where(fi >= 0, img_w[np.maximum(fi, 0)], np.nan)
            h = np.where(fi >= 0, img_h[np.maximum(fi, 0)], np.nan)
            with np.errstate(invalid="ignore"):
                outside = (code == 0) & ((boxes[:, 2] > w) | (boxes[:, 3] > h))
            code[outside] = 4
            self._mark_boxes(mark, table, t_rows, code, sizes=(w, h))

        if bad:
            rows = sorted(bad)
            if self.cfg.bad_rows == "raise":
                r = rows[0]
                reason, detail = bad[r]
                raise DataError(f"{path} row {r} (original_idx {base + r}): {reason}: {detail}")
            for r in rows:
                reason, detail = bad[r]
                self.counts[f"data/bad_rows/{reason}"] += 1
                if len(self.bad_examples) < _MAX_EXAMPLES:
                    self.bad_examples.append(f"{path} row {r}: {reason}: {detail}")

        # streams
        ds_col = _column(table, "datasource")
        sources = ds_col.to_pylist() if ds_col is not None else [None] * n
        paired_ds, single_ds = set(self.cfg.paired_datasources), set(self.cfg.single_datasources)
        for r in range(n):
            if r in bad:
                continue
            ds = sources[r]
            paired = (n_targets[r] > 0 or ds in paired_ds) and ds not in single_ds
            kind[base + r] = PAIRED if paired else SINGLE

    def _probe_images(self, flat, rows: np.ndarray, bad: dict, root: Path, path: Path) -> list:
        """Load-time check of every image of the rows not already bad (``probe_image`` per image, in a thread
        pool, ``_PROBE_CHUNK`` at a time so image bytes stored in the file are never all in memory at once); a
        file shared by rows is probed once. One ``(reason, size, detail)`` per image, None for skipped rows."""
        import pyarrow as pa

        out: list = [None] * len(rows)
        todo = [k for k in range(len(rows)) if int(rows[k]) not in bad]
        allow = self.cfg.allow_outside_image_root
        by_path: dict[str, Any] = {}
        with (
            self._bar(len(todo), f"checking images of {path.name}") as bar,
            ThreadPoolExecutor(self._num_workers) as pool,
        ):
            for s in range(0, len(todo), _PROBE_CHUNK):
                chunk = todo[s : s + _PROBE_CHUNK]
                futures = []
                for k, item in zip(chunk, flat.take(pa.array(chunk, pa.int64())).to_pylist(), strict=True):
                    key = _path_key(item)
                    if key is None:
                        futures.append((k, pool.submit(probe_image, item, root, allow)))
                        continue
                    if key not in by_path:
                        by_path[key] = pool.submit(probe_image, key, root, allow)
                    futures.append((k, by_path[key]))
                for k, fut in futures:
                    out[k] = fut.result()
                    bar.update(1)
        return out

    @staticmethod
    def _mark_boxes(mark, table, t_rows: np.ndarray, code: np.ndarray, sizes=None) -> None:
        """Mark rows with a bad target box; the detail quotes the box as stored (read lazily)."""
        bad_k = np.flatnonzero(code > 0)
        if not len(bad_k):
            return
        starts = {}
        for k in range(len(t_rows)):
            starts.setdefault(int(t_rows[k]), k)

        def detail_for(k: int):
            def detail(r: int) -> str:
                j = k - starts[r]
                cell = table.slice(r, 1).column("target_instances").to_pylist()[0]
                inst = instances_list(cell)[j] if j < len(instances_list(cell)) else None
                shown = inst.get("bbox") if isinstance(inst, dict) else inst
                where = ""
                if code[k] == 4 and sizes is not None:
                    where = f" of size {int(sizes[0][k])}x{int(sizes[1][k])} (WxH)"
                return f"target {j} bbox {short_repr(shown)} {_BOX_PROBLEMS[int(code[k])]}{where}"

            return detail

        for k in bad_k:
            mark([t_rows[k]], "bad_bbox", detail_for(int(k)))

    def _filter_long(self, kind: np.ndarray, sizes: list) -> None:
        """Drop records whose prompt exceeds ``max_prompt_length`` in any of their streams."""
        builder, limit = self.builder, self.cfg.max_prompt_length
        kept = np.flatnonzero(kind != DROPPED)
        if not len(kept):
            return
        light = []
        for f, table in enumerate(self._tables):
            lo, hi = self._offsets[f], self._offsets[f + 1]
            cols = {c: _column(table, c) for c in ("problem", "query", "question_type")}
            vals = {c: (a.to_pylist() if a is not None else [None] * (hi - lo)) for c, a in cols.items()}
            for g in kept[(kept >= lo) & (kept < hi)]:
                r = int(g) - lo
                light.append(
                    {
                        "problem": vals["problem"][r],
                        "query": vals["query"][r],
                        "question_type": vals["question_type"][r],
                        "images": sizes[int(g)],
                    }
                )
        too_long: dict[str, np.ndarray] = {}
        with self._bar(len(kept), "measuring prompts") as bar:
            for stream in ("grounded", "textual", "single"):
                want = kind[kept] == (SINGLE if stream == "single" else PAIRED)
                flags = np.zeros(len(kept), dtype=bool)
                idx = np.flatnonzero(want)
                for s in range(0, len(idx), 1024):
                    chunk = idx[s : s + 1024]
                    texts = [builder.render(light[i], stream) for i in chunk]
                    for i, ids in zip(chunk, builder.token_ids(texts), strict=True):
                        flags[i] = builder.count_tokens(len(ids), light[i]["images"]) > limit
                    if stream != "textual":
                        bar.update(len(chunk))
                too_long[stream] = flags
                self.counts[f"data/filtered_long/{stream}"] += int(flags.sum())
        drop = too_long["grounded"] | too_long["textual"] | too_long["single"]
        kind[kept[drop]] = DROPPED

    # ----------------------------------------------------------------------------------- access

    def __len__(self) -> int:
        """Usable records (paired + single)."""
        return len(self.paired_ids) + len(self.single_ids)

    def _locate(self, original_idx: int) -> tuple[int, int]:
        i = int(original_idx)
        if not 0 <= i < self.num_rows:
            raise IndexError(f"original_idx={original_idx!r}: must be in [0, {self.num_rows})")
        f = bisect_right(self._offsets, i) - 1
        return f, i - self._offsets[f]

    def location(self, original_idx: int) -> tuple[Path, int]:
        """(parquet file, row within it) of a record."""
        f, r = self._locate(original_idx)
        return self.files[f], r

    def image_root(self, original_idx: int) -> Path:
        """Directory the record's ``images`` paths are relative to."""
        return self._roots[self._locate(original_idx)[0]]

    def record(self, original_idx: int) -> dict:
        """The row as a dict (materialised now, all columns)."""
        f, r = self._locate(original_idx)
        return self._tables[f].slice(r, 1).to_pylist()[0]

    def streams(self, original_idx: int) -> tuple[str, ...]:
        """``("grounded", "textual")``, ``("single",)``, or ``()`` for a dropped row."""
        self._locate(original_idx)  # range check
        k = self._kind[int(original_idx)]
        return {PAIRED: ("grounded", "textual"), SINGLE: ("single",)}.get(int(k), ())

    def prompt(self, original_idx: int, stream: str) -> Prompt:
        """The record as a :class:`Prompt` of ``stream`` (needs a builder); :class:`DataError` naming the file and
        row when its image cannot be read (the record is dropped, as in :meth:`prompts`)."""
        out = self.prompts([(original_idx, stream)])
        if not out:
            path, row = self.location(original_idx)
            raise DataError(f"{path} row {row} (original_idx {original_idx}): dropped: {self.dropped[original_idx]}")
        return out[0]

    def prompts(self, items: Sequence[tuple[int, str]]) -> list[Prompt]:
        """Prompts for ``(original_idx, stream)`` items, e.g. a sampler batch, in their order. The streams of a
        record share one read of its row and one load of its images (the same PIL objects); records load in
        ``num_workers`` threads. A record whose image cannot be read is left out with all its streams (see
        :meth:`drop`); with ``data.bad_rows=raise`` that raises :class:`DataError` instead."""
        if self.builder is None:
            raise ValueError("RecordTable was built without a PromptBuilder; pass builder= to build prompts")
        ids = list(dict.fromkeys(int(i) for i, _ in items))
        if len(ids) > 1 and self._num_workers > 1:
            with ThreadPoolExecutor(min(self._num_workers, len(ids)), thread_name_prefix="prompt-images") as pool:
                loaded = dict(zip(ids, pool.map(self._load, ids), strict=True))
        else:
            loaded = {i: self._load(i) for i in ids}
        out = []
        for i, s in items:
            got = loaded[int(i)]
            if got is not None:
                record, root, images = got
                out.append(self.builder.build(record, i, s, root, loaded=images))
        return out

    def _load(self, original_idx: int) -> tuple | None:
        """(row, image root, loaded images) of a record, or None when it is (now) dropped."""
        if original_idx in self.dropped:
            return None
        record, root = self.record(original_idx), self.image_root(original_idx)
        try:
            return record, root, self.builder.load_images(record, root)
        except ImageError as exc:
            self.drop(original_idx, exc.reason, str(exc))
            return None

    def drop(self, original_idx: int, reason: str, detail: str = "", *, restored: bool = False) -> None:
        """Drop a record found bad after load (an image that does not decode when its prompt is built): counted
        under ``data/bad_rows/<reason>``, named in a warning with its file and row, never built again. Raises
        :class:`DataError` with ``data.bad_rows=raise``, or when bad rows now exceed ``max_bad_row_fraction``.
        ``restored=True``: a drop carried over from before a resume (reported then): counted, not warned or raised."""
        if reason not in BAD_ROW_REASONS:
            raise ValueError(f"reason={reason!r}: must be one of {list(BAD_ROW_REASONS)}")
        path, row = self.location(original_idx)
        where = f"{path} row {row} (original_idx {original_idx})"
        if self.cfg.bad_rows == "raise" and not restored:
            raise DataError(f"{where}: {reason}: {detail} (data.bad_rows=skip drops such records instead)")
        with self._lock:
            if original_idx in self.dropped:
                return
            self.dropped[original_idx] = reason
            self._kind[original_idx] = DROPPED
            self.counts[f"data/bad_rows/{reason}"] += 1
            self.counts["data/bad_rows/total"] += 1
            if len(self.bad_examples) < _MAX_EXAMPLES:
                self.bad_examples.append(f"{where}: {reason}: {detail}")
        if not restored:
            log.warning(
                "%s: %s: %s; the record is dropped with all its streams (data/bad_rows/%s) and not read again",
                where, reason, detail, reason,
            )  # fmt: skip
        with self._lock:
            self._check_bad_fraction()

    def metrics(self) -> dict[str, int]:
        """Counts for logging: bad rows per reason (found at load and since, :meth:`drop`), long prompts per
        stream, records per kind (at load)."""
        with self._lock:
            return dict(self.counts)
