"""Tests of the synthetic shapes set (ivgr_dist.data.synthetic)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ivgr_dist.config import SearchConfig, SyntheticConfig
from ivgr_dist.data import synthetic
from ivgr_dist.data.synthetic import (
    DATASOURCE_MATH,
    DATASOURCE_SEARCH,
    DATASOURCE_SHAPES,
    PALETTE,
    SCHEMA,
    SHAPES,
    make_synthetic,
)

RICH = SyntheticConfig(
    num_records=48,
    val_fraction=0.25,
    min_image_size=64,
    max_image_size=160,
    min_objects=1,
    max_objects=4,
    colors=["red", "green", "blue", "yellow", "purple"],
    shapes=list(SHAPES),
    question_types=["color", "shape", "count", "position"],
    text_only_fraction=0.25,
)


def _rows(out: Path) -> list[dict]:
    return pq.read_table(out / "train.parquet").to_pylist() + pq.read_table(out / "val.parquet").to_pylist()


def _files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def rich(tmp_path_factory):
    out = tmp_path_factory.mktemp("rich")
    summary = make_synthetic(out, RICH, seed=7)
    return out, summary


def test_layout_and_columns(rich):
    out, summary = rich
    assert (out / "train.parquet").is_file() and (out / "val.parquet").is_file()
    train, val = pq.read_table(out / "train.parquet"), pq.read_table(out / "val.parquet")
    assert train.schema.equals(SCHEMA) and val.schema.equals(SCHEMA)
    assert (train.num_rows, val.num_rows) == (36, 12) == (summary["train_records"], summary["val_records"])
    # text-only share per split: round(36 * 0.25) + round(12 * 0.25)
    assert summary["text_only_records"] == 9 + 3
    assert summary["families"]["math"] == 12
    assert sum(summary["families"].values()) == 48
    assert not list(out.glob("*.tmp")) and not list((out / "images").glob(".*"))

    rows = _rows(out)
    for r in rows:
        if r["datasource"] == DATASOURCE_MATH:
            assert r["question_type"] == "math" and r["images"] == [] and r["target_instances"] == []
            assert r["objects"] == "[]" and "<image>" not in r["problem"] and r["problem"] == r["query"]
            assert r["answer"].isdigit()
        else:
            assert r["datasource"] == DATASOURCE_SHAPES
            assert r["problem"] == "<image>\n" + r["query"]
            assert len(r["images"]) == 1 and (out / r["images"][0]).is_file()
            assert r["target_instances"], r
            assert r["question_type"] in ("exact", "multiple_choice")
    assert len(list((out / "images").glob("*.png"))) == summary["images"] == 36


def test_boxes_are_tight_inside_the_image_and_match_the_drawn_pixels(rich):
    out, _ = rich
    seen_shapes = set()
    for r in _rows(out):
        if not r["images"]:
            continue
        img = np.asarray(Image.open(out / r["images"][0]).convert("RGB"))
        h, w, _ = img.shape
        covered = np.zeros((h, w), dtype=bool)
        for o in json.loads(r["objects"]):
            x1, y1, x2, y2 = o["bbox"]
            assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h
            rgb = PALETTE[o["color"]]
            # the bbox centre has the object's colour (every shape covers its centre)
            assert tuple(img[(y1 + y2) // 2, (x1 + x2) // 2]) == rgb, o
            # the object's pixels fill the box tightly: it touches all four box edges
            same = (img[y1:y2, x1:x2] == rgb).all(axis=2)
            assert same[0].any() and same[-1].any() and same[:, 0].any() and same[:, -1].any(), o
            covered[y1:y2, x1:x2] = True
            seen_shapes.add(o["shape"])
        # outside every box the image is white background
        assert (img[~covered] == 255).all()
        # target boxes are boxes of listed objects
        boxes = [o["bbox"] for o in json.loads(r["objects"])]
        for t in r["target_instances"]:
            assert [int(v) for v in t["bbox"]] in boxes
    assert seen_shapes == set(SHAPES)


def test_answers_follow_from_the_scene(rich):
    out, _ = rich
    families = set()
    for r in _rows(out):
        if not r["images"]:
            continue
        objs = json.loads(r["objects"])
        q, a = r["query"], r["answer"]
        labels = [t["label"] for t in r["target_instances"]]
        if q.startswith("What color"):
            families.add("color")
            shape = q.removeprefix("What color is the ").removesuffix("?")
            match = objs if shape == "shape" else [o for o in objs if o["shape"] == shape]
            assert len(match) == 1 and match[0]["color"] == a
            assert labels == [f"{a} {match[0]['shape']}"]
        elif q.startswith("What shape"):
            families.add("shape")
            color = q.split()[4]
            match = [o for o in objs if o["color"] == color]
            assert len(match) == 1 and match[0]["shape"] == a
        elif q.startswith("How many"):
            families.add("count")
            color = q.split()[2]
            n = sum(o["color"] == color for o in objs)
            assert n >= 1 and a == str(n) and len(labels) == n
        else:
            families.add("position")
            assert r["question_type"] == "multiple_choice"
            corner = q.split("closest to the ")[1].split(" corner")[0]
            cx = 0 if corner.endswith("left") else Image.open(out / r["images"][0]).width
            cy = 0 if corner.startswith("top") else Image.open(out / r["images"][0]).height

            def dist(o, cx=cx, cy=cy):
                x1, y1, x2, y2 = o["bbox"]
                return math.hypot((x1 + x2) / 2 - cx, (y1 + y2) / 2 - cy)

            best = min(objs, key=dist)
            options = dict(line.split(". the ", 1) for line in q.split("\n")[1:])
            assert options[a] == f"{best['color']} {best['shape']}"
            assert sorted(labels) == sorted(options.values())
    assert families == {"color", "shape", "count", "position"}


def test_deterministic_bytes_and_seed_sensitive(tmp_path):
    cfg = SyntheticConfig(num_records=12, max_objects=3, question_types=["color", "count", "position"])
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    make_synthetic(a, cfg, seed=3)
    make_synthetic(b, cfg, seed=3)
    make_synthetic(c, cfg, seed=4)
    fa, fb, fc = _files(a), _files(b), _files(c)
    assert fa == fb
    assert pq.read_table(a / "train.parquet").equals(pq.read_table(b / "train.parquet"))
    assert fa != fc
    assert pq.read_table(a / "train.parquet").column("answer") != pq.read_table(c / "train.parquet").column("answer")


def test_default_config_asks_about_the_one_shape(tmp_path):
    make_synthetic(tmp_path, SyntheticConfig(), num_records=20, seed=0)
    visual = [r for r in _rows(tmp_path) if r["images"]]
    assert visual
    for r in visual:
        assert r["query"] == "What color is the shape?"
        assert len(json.loads(r["objects"])) == 1
        assert Image.open(tmp_path / r["images"][0]).size == (112, 112)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"colors": ["red", "mauve"]}, "mauve"),
        ({"shapes": ["circle", "hexagon"]}, "hexagon"),
        ({"question_types": ["position"], "max_objects": 1}, "max_objects=1"),
        ({"shapes": ["circle"], "max_objects": 3}, "shapes=\\['circle'\\]"),
    ],
)
def test_bad_config_is_named(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_synthetic(tmp_path, SyntheticConfig(**kwargs), num_records=4)


def test_interrupted_run_leaves_no_train_table(tmp_path, monkeypatch):
    cfg = SyntheticConfig(num_records=10)
    make_synthetic(tmp_path, cfg, seed=1)  # an earlier complete run
    assert (tmp_path / "train.parquet").is_file()
    calls = {"n": 0}
    real = synthetic._visual_record

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(synthetic, "_visual_record", failing)
    with pytest.raises(KeyboardInterrupt):
        make_synthetic(tmp_path, cfg, seed=2)
    assert not (tmp_path / "train.parquet").exists() and not (tmp_path / "val.parquet").exists()


def test_shapes_task_draws_are_unchanged_by_the_search_task(tmp_path):
    """The placement code the search task shares: a multi-object shapes set still draws the same scenes as
    before the search task existed (objects recorded from that version, same settings and seed)."""
    cfg = SyntheticConfig(
        num_records=8,
        max_image_size=200,
        max_objects=5,
        shapes=list(SHAPES),
        question_types=["color", "shape", "count", "position"],
        min_object_frac=0.1,
        max_object_frac=0.4,
        text_only_fraction=0.0,
    )
    make_synthetic(tmp_path, cfg, seed=3)
    rows = pq.read_table(tmp_path / "train.parquet").to_pylist()
    assert rows[1]["query"] == "What shape is the black object?" and rows[1]["answer"] == "triangle"
    assert json.loads(rows[1]["objects"]) == [
        {"color": "black", "shape": "triangle", "bbox": [44, 150, 67, 173]},
        {"color": "blue", "shape": "circle", "bbox": [17, 30, 67, 80]},
        {"color": "orange", "shape": "star", "bbox": [95, 87, 151, 140]},
        {"color": "blue", "shape": "diamond", "bbox": [144, 25, 176, 57]},
    ]
    assert json.loads(rows[3]["objects"])[4] == {"color": "orange", "shape": "star", "bbox": [3, 51, 51, 97]}


# ------------------------------------------------------------------------------------------ search task

SEARCH = SyntheticConfig(
    task="search",
    num_records=40,
    val_fraction=0.25,
    shapes=list(SHAPES),
    text_only_fraction=0.1,
    search=SearchConfig(
        ask=["color", "shape"],
        min_distractors=2,
        max_distractors=6,
        min_target_frac=0.08,
        max_target_frac=0.14,
        min_distractor_frac=0.1,
        max_distractor_frac=0.3,
        min_image_size=150,
        max_image_size=260,
    ),
)


@pytest.fixture(scope="module")
def search(tmp_path_factory):
    out = tmp_path_factory.mktemp("search")
    summary = make_synthetic(out, SEARCH, seed=5)
    return out, summary


def _sought(query: str, objs: list[dict]) -> tuple[str, list[dict]]:
    """(asked attribute, objects the question's attribute picks) of a search question."""
    if query.startswith("What color is the "):
        shape = query.removeprefix("What color is the ").removesuffix("?")
        return "color", [o for o in objs if o["shape"] == shape]
    assert query.startswith("What shape is the ") and query.endswith(" object?"), query
    color = query.removeprefix("What shape is the ").removesuffix(" object?")
    return "shape", [o for o in objs if o["color"] == color]


def test_search_target_is_unique_and_no_distractor_shares_its_attributes(search):
    out, summary = search
    rows = _rows(out)
    asked = set()
    for r in rows:
        if not r["images"]:
            assert r["datasource"] == DATASOURCE_MATH
            continue
        assert r["datasource"] == DATASOURCE_SEARCH and r["question_type"] == "exact"
        objs = json.loads(r["objects"])
        assert SEARCH.search.min_distractors <= len(objs) - 1 <= SEARCH.search.max_distractors
        kind, picked = _sought(r["query"], objs)
        asked.add(kind)
        assert len(picked) == 1, r  # the question's attribute names one object
        target = picked[0]
        assert r["answer"] == target[kind]
        # the target boxes are that object's, nothing else
        assert [t["bbox"] for t in r["target_instances"]] == [[float(v) for v in target["bbox"]]]
        assert [t["label"] for t in r["target_instances"]] == [f"{target['color']} {target['shape']}"]
        for o in objs:
            if o is not target:  # neither the question's attribute nor the answer is on a distractor
                assert o["color"] != target["color"] and o["shape"] != target["shape"], (o, target)
    assert asked == {"color", "shape"}
    assert summary["families"]["search_color"] + summary["families"]["search_shape"] == len(
        [r for r in rows if r["images"]]
    )


def test_search_target_box_is_the_extent_of_the_target_pixels(search):
    """No distractor has the target's colour, so the target's pixels are the pixels of that colour."""
    out, _ = search
    s = SEARCH.search
    for r in _rows(out):
        if not r["images"]:
            continue
        img = np.asarray(Image.open(out / r["images"][0]).convert("RGB"))
        h, w, _ = img.shape
        assert s.min_image_size <= min(w, h) and max(w, h) <= s.max_image_size
        (t,) = r["target_instances"]
        ys, xs = np.nonzero((img == PALETTE[t["label"].split()[0]]).all(axis=2))
        assert t["bbox"] == [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]
        # the target is small: its longer side within the configured fractions of the shorter image side
        # (shapes fill their square to within ~5%: a star is 0.95 as wide as tall)
        x1, y1, x2, y2 = t["bbox"]
        side = max(x2 - x1, y2 - y1)
        assert 0.9 * round(s.min_target_frac * min(w, h)) - 1 <= side <= round(s.max_target_frac * min(w, h))


def test_search_is_deterministic_and_seed_sensitive(tmp_path):
    cfg = dataclasses.replace(SEARCH, num_records=10)
    make_synthetic(tmp_path / "a", cfg, seed=1)
    make_synthetic(tmp_path / "b", cfg, seed=1)
    make_synthetic(tmp_path / "c", cfg, seed=2)
    fa, fb, fc = _files(tmp_path / "a"), _files(tmp_path / "b"), _files(tmp_path / "c")
    assert fa == fb
    assert fa["images/train_000000.png"] != fc["images/train_000000.png"]
    assert _rows(tmp_path / "a") != _rows(tmp_path / "c")


def test_search_that_cannot_fit_names_the_search_knobs(tmp_path):
    crowded = dataclasses.replace(
        SEARCH,
        search=SearchConfig(
            min_distractors=40,
            max_distractors=40,
            min_target_frac=0.25,
            max_target_frac=0.25,
            min_distractor_frac=0.5,
            max_distractor_frac=0.5,
            min_image_size=28,
            max_image_size=28,
        ),
    )
    with pytest.raises(ValueError, match="search.max_distractors"):
        make_synthetic(tmp_path, crowded, num_records=4)
