"""A synthetic visual-grounding set of coloured shapes, written in the iVGR-RL-51K layout.

Output of :func:`make_synthetic` (``out_dir`` is the image root)::

    out_dir/train.parquet
    out_dir/val.parquet
    out_dir/images/<split>_<row>.png

Columns (see :data:`SCHEMA`):

- ``problem``: the question with an ``<image>`` marker in front (text-only records: no marker);
- ``query``: the same question without the marker;
- ``answer``: colour word, shape word, a count, an option letter, or a number for arithmetic;
- ``images``: relative paths under ``out_dir`` (empty for text-only records);
- ``target_instances``: ``[{"bbox": [x1, y1, x2, y2], "label": "red circle"}, ...]`` in original image
  pixels; ``x2``/``y2`` are exclusive (the box of pixels ``x1 .. x2-1``), and the box is the tight box of
  the pixels actually drawn;
- ``datasource``: ``synthetic_shapes`` (task ``shapes``), ``synthetic_search`` (task ``search``) or
  ``synthetic_math``;
- ``question_type``: ``exact`` (colour, shape, count), ``multiple_choice`` (position) or ``math``;
- ``objects``: JSON list of every object in the image, ``{"color", "shape", "bbox"}``, for rule-based
  judges that need the facts of the scene (``[]`` for text-only records).

Two tasks (``SyntheticConfig.task``): ``shapes``, the question families below, and ``search``, described after
them. Question families of ``shapes`` (``SyntheticConfig.question_types``):

- ``color``: "What color is the circle?" (one object: "What color is the shape?"). The named shape occurs
  once in the image. Target: that object.
- ``shape``: "What shape is the red object?". The named colour occurs once. Target: that object.
- ``count``: "How many blue objects are there?" about a colour present in the image (answer >= 1).
  Targets: every object of that colour.
- ``position``: "Which object is closest to the top-left corner of the image?" with up to four lettered
  options ``the <colour> <shape>`` (descriptions unique in the image; the closest object, by box centre, is
  always an option and wins by at least one pixel). Targets: every option's object (the reasoning has
  to look at each). Needs at least two objects, so such images get ``max(n, 2)`` objects.

The ``search`` task (``SyntheticConfig.search``): one small target and ``min_distractors``-``max_distractors``
distractors in a ``min_image_size``-``max_image_size`` image, sized by ``*_target_frac`` / ``*_distractor_frac``.
The question names the target by one attribute and asks for the other (``search.ask``): "What color is the
star?" (answer: its colour) or "What shape is the red object?" (answer: its shape). Every distractor has
another colour AND another shape than the target, so the question means one object and no distractor
carries the answer. Target: that object alone (``objects[0]``; the target is placed first, distractors that
do not fit are shrunk). ``question_type`` is ``exact``.

Everything is drawn from ``numpy`` generators seeded with ``(seed, record index)``, so a seed gives the
same parquet content and the same image bytes on every run. Images are written first, the parquet
files last (temporary file + rename, ``train.parquet`` last of all); parquet files left by an earlier
run are deleted first, so an interrupted run never leaves a ``train.parquet`` whose images are missing.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from ivgr_dist.config import SyntheticConfig

__all__ = [
    "BACKGROUND",
    "DATASOURCE_MATH",
    "DATASOURCE_SEARCH",
    "DATASOURCE_SHAPES",
    "PALETTE",
    "SCHEMA",
    "SHAPES",
    "make_synthetic",
]

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 200, 20),
    "purple": (140, 50, 180),
    "orange": (245, 130, 20),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
    "brown": (140, 80, 30),
    "pink": (240, 120, 180),
    "cyan": (20, 200, 220),
}
"""Colour name -> RGB. Fixed, so the same colour name is always the same pixel value."""
BACKGROUND = (255, 255, 255)
"""White background (hence no ``white`` in the palette)."""
SHAPES = ("circle", "square", "triangle", "diamond", "rectangle", "star")
"""Shapes the generator can draw."""
DATASOURCE_SHAPES = "synthetic_shapes"
DATASOURCE_SEARCH = "synthetic_search"
DATASOURCE_MATH = "synthetic_math"
CORNERS = ("top-left", "top-right", "bottom-left", "bottom-right")
MAX_OPTIONS = 4
_GAP = 2  # pixels of white kept between the boxes of two objects
_HINT_SHAPES = "lower data.synthetic.max_objects or raise the image size"
_HINT_SEARCH = (
    "lower data.synthetic.search.max_distractors or search.max_distractor_frac, or raise search.min_image_size"
)
_PROGRESS_MIN_RECORDS = 2000


def _schema():
    import pyarrow as pa

    target = pa.struct([("bbox", pa.list_(pa.float64())), ("label", pa.string())])
    return pa.schema(
        [
            ("problem", pa.string()),
            ("query", pa.string()),
            ("answer", pa.string()),
            ("images", pa.list_(pa.string())),
            ("target_instances", pa.list_(target)),
            ("datasource", pa.string()),
            ("question_type", pa.string()),
            ("objects", pa.string()),
        ]
    )


SCHEMA = _schema()
"""Arrow schema of ``train.parquet`` / ``val.parquet`` (explicit, so all-empty columns keep their types)."""


# ----------------------------------------------------------------------------------------- drawing


def _shape_size(rng: np.random.Generator, shape: str, side: int) -> tuple[int, int]:
    """(width, height) of an object whose longer side is ``side``."""
    if shape != "rectangle":
        return side, side
    short = max(3, round(side * 0.6))
    return (side, short) if rng.random() < 0.5 else (short, side)


def _shape_mask(shape: str, w: int, h: int):
    """An ``L`` mask of size (w, h) with the shape filled (255) inside it, no anti-aliasing."""
    from PIL import Image, ImageDraw

    mask = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(mask)
    r, b = w - 1, h - 1
    if shape == "circle":
        draw.ellipse([0, 0, r, b], fill=255)
    elif shape in ("square", "rectangle"):
        draw.rectangle([0, 0, r, b], fill=255)
    elif shape == "triangle":
        draw.polygon([(r / 2, 0), (0, b), (r, b)], fill=255)
    elif shape == "diamond":
        draw.polygon([(r / 2, 0), (r, b / 2), (r / 2, b), (0, b / 2)], fill=255)
    elif shape == "star":
        outer = r / 2
        inner = 0.45 * outer
        cx, cy = r / 2, outer
        pts = []
        for k in range(10):
            rad = outer if k % 2 == 0 else inner
            ang = -math.pi / 2 + k * math.pi / 5
            pts.append((cx + rad * math.cos(ang), cy + rad * math.sin(ang)))
        draw.polygon(pts, fill=255)
    else:  # pragma: no cover - shapes are checked up front
        raise ValueError(f"shape {shape!r}: must be one of {list(SHAPES)}")
    return mask


def _side_range(short: int, lo_frac: float, hi_frac: float) -> tuple[int, int]:
    """(smallest, largest) object side in pixels for fractions of the shorter image side ``short``."""
    lo = max(4, round(lo_frac * short))
    return lo, max(lo, round(hi_frac * short))


def _place(rng: np.random.Generator, width: int, height: int, sized: list[tuple[str, int, int]], hint: str):
    """Non-overlapping (x, y, w, h) slots, in order, for ``(shape, smallest side, largest side)`` objects; an object
    that does not fit is shrunk. ``hint``: what to change when even 4-pixel objects do not fit."""
    placed: list[tuple[int, int, int, int]] = []
    for shape, lo, hi in sized:
        side = int(rng.integers(lo, hi + 1))
        slot = None
        while slot is None:
            w, h = _shape_size(rng, shape, side)
            w, h = min(w, width), min(h, height)
            for _ in range(100):
                x = int(rng.integers(0, width - w + 1))
                y = int(rng.integers(0, height - h + 1))
                if all(
                    x + w + _GAP <= px or px + pw + _GAP <= x or y + h + _GAP <= py or py + ph + _GAP <= y
                    for px, py, pw, ph in placed
                ):
                    slot = (x, y, w, h)
                    break
            if slot is None:
                if side <= 4:
                    raise ValueError(
                        f"cannot place {len(sized)} non-overlapping objects in a {width}x{height} image: {hint}"
                    )
                side = max(4, int(side * 0.85))
        placed.append(slot)
    return placed


def _draw_scene(rng: np.random.Generator, width: int, height: int, attrs, sides: list[tuple[int, int]], hint: str):
    """White image with the ``(colour, shape)`` objects drawn, each ``sides[i]`` = (smallest, largest) side in pixels;
    returns (image, objects with tight exclusive-end boxes), in the order of ``attrs``."""
    from PIL import Image

    img = Image.new("RGB", (width, height), BACKGROUND)
    slots = _place(
        rng, width, height, [(shape, lo, hi) for (_, shape), (lo, hi) in zip(attrs, sides, strict=True)], hint
    )
    objects = []
    for (color, shape), (x, y, w, h) in zip(attrs, slots, strict=True):
        mask = _shape_mask(shape, w, h)
        img.paste(PALETTE[color], (x, y), mask)
        bx1, by1, bx2, by2 = mask.getbbox()
        objects.append({"color": color, "shape": shape, "bbox": [x + bx1, y + by1, x + bx2, y + by2]})
    return img, objects


# ---------------------------------------------------------------------------------------- questions


def _pick(rng: np.random.Generator, items) -> Any:
    items = list(items)
    return items[int(rng.integers(len(items)))]


def _attributes(rng: np.random.Generator, cfg: SyntheticConfig, family: str, n: int) -> list[tuple[str, str]]:
    """(colour, shape) per object; for color/shape questions object 0 is the one asked about."""
    colors, shapes = list(cfg.colors), list(cfg.shapes)
    if family == "color":  # the asked-about shape must occur once
        shape0 = _pick(rng, shapes)
        others = [s for s in shapes if s != shape0]
        return [(_pick(rng, colors), shape0)] + [(_pick(rng, colors), _pick(rng, others)) for _ in range(n - 1)]
    if family == "shape":  # the asked-about colour must occur once
        color0 = _pick(rng, colors)
        others = [c for c in colors if c != color0]
        return [(color0, _pick(rng, shapes))] + [(_pick(rng, others), _pick(rng, shapes)) for _ in range(n - 1)]
    if family == "position":  # unique descriptions, so each option names one object
        combos = [(c, s) for c in colors for s in shapes]
        idx = rng.permutation(len(combos))[: min(n, len(combos))]
        return [combos[int(i)] for i in idx]
    return [(_pick(rng, colors), _pick(rng, shapes)) for _ in range(n)]


def _label(obj: dict) -> str:
    return f"{obj['color']} {obj['shape']}"


def _target(obj: dict) -> dict:
    return {"bbox": [float(v) for v in obj["bbox"]], "label": _label(obj)}


def _closest(objects: list[dict], corner: str, size: tuple[int, int]) -> int | None:
    """Index of the object whose box centre is closest to ``corner``; None unless it wins by >= 1 px."""
    width, height = size
    cx = 0.0 if corner.endswith("left") else float(width)
    cy = 0.0 if corner.startswith("top") else float(height)
    dists = []
    for o in objects:
        x1, y1, x2, y2 = o["bbox"]
        dists.append(math.hypot((x1 + x2) / 2 - cx, (y1 + y2) / 2 - cy))
    order = sorted(range(len(dists)), key=lambda k: dists[k])
    if len(order) >= 2 and dists[order[1]] - dists[order[0]] < 1.0:
        return None
    return order[0]


def _ask(rng: np.random.Generator, family: str, objects: list[dict], size: tuple[int, int]):
    """(question, answer, targets, question_type), or None when this scene cannot carry the question."""
    if family == "color":
        obj = objects[0]
        noun = "shape" if len(objects) == 1 else obj["shape"]
        return f"What color is the {noun}?", obj["color"], [_target(obj)], "exact"
    if family == "shape":
        obj = objects[0]
        return f"What shape is the {obj['color']} object?", obj["shape"], [_target(obj)], "exact"
    if family == "count":
        color = _pick(rng, sorted({o["color"] for o in objects}))
        hits = [o for o in objects if o["color"] == color]
        return f"How many {color} objects are there?", str(len(hits)), [_target(o) for o in hits], "exact"
    # position
    for k in rng.permutation(len(CORNERS)):
        corner = CORNERS[int(k)]
        win = _closest(objects, corner, size)
        if win is None:
            continue
        others = [i for i in range(len(objects)) if i != win]
        others = [others[int(i)] for i in rng.permutation(len(others))[: MAX_OPTIONS - 1]]
        options = [objects[i] for i in rng.permutation([win, *others])]
        letters = "ABCDEFGH"
        lines = [f"{letters[j]}. the {_label(o)}" for j, o in enumerate(options)]
        answer = letters[[o is objects[win] for o in options].index(True)]
        question = f"Which object is closest to the {corner} corner of the image?\n" + "\n".join(lines)
        return question, answer, [_target(o) for o in options], "multiple_choice"
    return None


def _visual_record(rng: np.random.Generator, cfg: SyntheticConfig, family: str):
    for _ in range(50):
        width = int(rng.integers(cfg.min_image_size, cfg.max_image_size + 1))
        height = int(rng.integers(cfg.min_image_size, cfg.max_image_size + 1))
        n = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
        if family == "position":
            n = max(n, 2)
        attrs = _attributes(rng, cfg, family, n)
        sides = [_side_range(min(width, height), cfg.min_object_frac, cfg.max_object_frac)] * n
        img, objects = _draw_scene(rng, width, height, attrs, sides, _HINT_SHAPES)
        asked = _ask(rng, family, objects, (width, height))
        if asked is not None:
            return img, objects, asked
    raise RuntimeError(f"could not draw a scene for a {family!r} question in 50 tries")  # pragma: no cover


def _search_record(rng: np.random.Generator, cfg: SyntheticConfig):
    """(image, objects, (question, answer, targets, question_type), asked attribute) of one ``search`` record.

    Object 0 is the target; every distractor has another colour AND another shape, so the question's attribute
    picks the target alone and no distractor carries the answer. The target is placed first (it always gets
    the size drawn for it; a distractor that does not fit is shrunk)."""
    s = cfg.search
    width = int(rng.integers(s.min_image_size, s.max_image_size + 1))
    height = int(rng.integers(s.min_image_size, s.max_image_size + 1))
    ask = _pick(rng, s.ask)
    n = int(rng.integers(s.min_distractors, s.max_distractors + 1))
    color, shape = _pick(rng, cfg.colors), _pick(rng, cfg.shapes)
    colors = [c for c in cfg.colors if c != color]
    shapes = [h for h in cfg.shapes if h != shape]
    attrs = [(color, shape)] + [(_pick(rng, colors), _pick(rng, shapes)) for _ in range(n)]
    short = min(width, height)
    sides = [_side_range(short, s.min_target_frac, s.max_target_frac)]
    sides += [_side_range(short, s.min_distractor_frac, s.max_distractor_frac)] * n
    img, objects = _draw_scene(rng, width, height, attrs, sides, _HINT_SEARCH)
    target = objects[0]
    if ask == "color":
        question, answer = f"What color is the {shape}?", color
    else:
        question, answer = f"What shape is the {color} object?", shape
    return img, objects, (question, answer, [_target(target)], "exact"), ask


def _math_record(rng: np.random.Generator) -> tuple[str, str]:
    op = _pick(rng, ["+", "-", "*", "+*"])
    if op == "*":
        a, b = (int(v) for v in rng.integers(2, 13, size=2))
        return f"What is {a} * {b}?", str(a * b)
    if op == "+*":
        a, b, c = (int(v) for v in rng.integers(2, 13, size=3))
        return f"What is {a} + {b} * {c}?", str(a + b * c)
    a, b = (int(v) for v in rng.integers(2, 60, size=2))
    if op == "-":
        a, b = max(a, b), min(a, b)
        return f"What is {a} - {b}?", str(a - b)
    return f"What is {a} + {b}?", str(a + b)


# ----------------------------------------------------------------------------------------- writing


def _check_cfg(cfg: SyntheticConfig, num_records: int, seed: int) -> None:
    p = "data.synthetic."
    bad = [c for c in cfg.colors if c not in PALETTE]
    if bad:
        raise ValueError(f"{p}colors={list(cfg.colors)!r}: {bad} not in the palette {sorted(PALETTE)}")
    bad = [s for s in cfg.shapes if s not in SHAPES]
    if bad:
        raise ValueError(f"{p}shapes={list(cfg.shapes)!r}: {bad} not drawable; choose from {list(SHAPES)}")
    shapes_task = cfg.task == "shapes"
    if shapes_task and "color" in cfg.question_types and len(cfg.shapes) < 2 and cfg.max_objects > 1:
        raise ValueError(
            f"{p}shapes={list(cfg.shapes)!r}: 'color' questions name a shape that occurs once, which needs "
            f"at least 2 shapes when max_objects={cfg.max_objects} > 1"
        )
    if shapes_task and "position" in cfg.question_types and cfg.max_objects < 2:
        raise ValueError(f"{p}max_objects={cfg.max_objects!r}: 'position' questions need max_objects >= 2")
    if num_records < 2:
        raise ValueError(f"num_records={num_records!r}: must be >= 2 (train and val)")
    if seed < 0:
        raise ValueError(f"seed={seed!r}: must be >= 0")


SETTINGS_KEY = b"ivgr_synthetic"
"""Parquet schema-metadata key holding the generator settings (JSON) a synthetic table was made with."""


def generated_with(path: str | Path) -> dict | None:
    """The generator settings stored in a synthetic parquet file, or None (other data, older sets).
    A file that is not readable parquet raises ``DataError`` naming it (the data loader's checked open)."""
    from ivgr_dist.data.dataset import read_parquet

    meta = read_parquet(path, schema_only=True).metadata or {}
    return json.loads(meta[SETTINGS_KEY]) if SETTINGS_KEY in meta else None


def _atomic_write_parquet(table, path: Path) -> None:
    import pyarrow.parquet as pq

    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def make_synthetic(
    out_dir: str | Path, cfg: SyntheticConfig, num_records: int | None = None, seed: int | None = None
) -> dict:
    """Write the synthetic set into ``out_dir``; returns summary counts.

    ``num_records`` and ``seed`` override the config's values. The validation split gets
    ``round(num_records * val_fraction)`` records (at least 1, at most ``num_records - 1``); in each split
    ``round(split_size * text_only_fraction)`` records are text-only arithmetic.
    """
    import pyarrow as pa
    from tqdm import tqdm

    n_total = cfg.num_records if num_records is None else int(num_records)
    seed = cfg.seed if seed is None else int(seed)
    _check_cfg(cfg, n_total, seed)
    n_val = min(n_total - 1, max(1, round(n_total * cfg.val_fraction)))
    settings = json.dumps({**dataclasses.asdict(cfg), "num_records": n_total, "seed": seed}, sort_keys=True)
    splits = [("train", 0, n_total - n_val), ("val", n_total - n_val, n_val)]

    out = Path(out_dir)
    image_dir = out / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    for name in ("train.parquet", "val.parquet"):  # never leave an old table beside new images
        (out / name).unlink(missing_ok=True)

    families: Counter[str] = Counter()
    tables = {}
    with tqdm(total=n_total, desc="synthetic records", disable=n_total < _PROGRESS_MIN_RECORDS) as bar:
        for split_id, (split, start, count) in enumerate(splits):
            pick_rng = np.random.default_rng([seed, 0, split_id])
            n_text = round(count * cfg.text_only_fraction)
            text_rows = {int(i) for i in pick_rng.permutation(count)[:n_text]}
            rows = []
            for row in range(count):
                rng = np.random.default_rng([seed, 1, start + row])
                if row in text_rows:
                    question, answer = _math_record(rng)
                    families["math"] += 1
                    rows.append(
                        {
                            "problem": question,
                            "query": question,
                            "answer": answer,
                            "images": [],
                            "target_instances": [],
                            "datasource": DATASOURCE_MATH,
                            "question_type": "math",
                            "objects": "[]",
                        }
                    )
                else:
                    if cfg.task == "search":
                        img, objects, (question, answer, targets, qtype), ask = _search_record(rng, cfg)
                        families[f"search_{ask}"] += 1
                        datasource = DATASOURCE_SEARCH
                    else:
                        family = _pick(rng, cfg.question_types)
                        img, objects, (question, answer, targets, qtype) = _visual_record(rng, cfg, family)
                        families[family] += 1
                        datasource = DATASOURCE_SHAPES
                    rel = f"images/{split}_{row:06d}.png"
                    tmp = image_dir / f".{split}_{row:06d}.png.tmp"
                    img.save(tmp, format="PNG")
                    os.replace(tmp, out / rel)
                    rows.append(
                        {
                            "problem": "<image>\n" + question,
                            "query": question,
                            "answer": answer,
                            "images": [rel],
                            "target_instances": targets,
                            "datasource": datasource,
                            "question_type": qtype,
                            "objects": json.dumps(objects),
                        }
                    )
                bar.update(1)
            tables[split] = pa.Table.from_pylist(rows, schema=SCHEMA.with_metadata({SETTINGS_KEY: settings}))

    _atomic_write_parquet(tables["val"], out / "val.parquet")
    _atomic_write_parquet(tables["train"], out / "train.parquet")  # last: its presence means "complete"
    return {
        "out_dir": str(out),
        "train_records": splits[0][2],
        "val_records": n_val,
        "text_only_records": families["math"],
        "visual_records": n_total - families["math"],
        "images": n_total - families["math"],
        "families": dict(sorted(families.items())),
        "seed": seed,
    }
