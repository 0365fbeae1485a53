"""Tests of the synthetic shapes set (ivgr_dist.data.synthetic)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ivgr_dist.config import SyntheticConfig
from ivgr_dist.data import synthetic
from ivgr_dist.data.synthetic import DATASOURCE_MATH, DATASOURCE_SHAPES, PALETTE, SCHEMA, SHAPES, make_synthetic

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
