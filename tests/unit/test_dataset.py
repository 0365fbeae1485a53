"""Tests of loading, validation and stream expansion (ivgr_dist.data.dataset)."""

from __future__ import annotations

import json
import logging
import math
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ivgr_dist.config import DataConfig, SyntheticConfig, TinyModelConfig
from ivgr_dist.data.dataset import BAD_ROW_REASONS, DataError, RecordTable
from ivgr_dist.data.prompts import PromptBuilder
from ivgr_dist.data.synthetic import make_synthetic

SYN = SyntheticConfig(
    num_records=40,
    val_fraction=0.25,
    min_image_size=56,
    max_image_size=224,
    max_objects=3,
    question_types=["color", "shape", "count", "position"],
    text_only_fraction=0.2,
)


@pytest.fixture(scope="module")
def tokenizer():
    from ivgr_dist.models.tiny import build_tokenizer

    return build_tokenizer(TinyModelConfig())


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    out = tmp_path_factory.mktemp("syn")
    make_synthetic(out, SYN, seed=5)
    return out


@pytest.fixture
def data(base, tmp_path):
    """A private copy of the synthetic set that a test may corrupt."""
    out = tmp_path / "set"
    shutil.copytree(base, out)
    return out


def _rows(path):
    return pq.read_table(path).to_pylist()


def _write(path, rows, schema=None):
    schema = schema if schema is not None else pq.read_schema(path)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)


def _a_visual(path) -> int:
    """A visual row well inside the file (so "row 0" cannot pass by accident)."""
    return next(i for i, r in enumerate(_rows(path)) if r["images"] and i >= 7)


def test_clean_load_streams_and_lazy_records(data, tokenizer):
    train, val = data / "train.parquet", data / "val.parquet"
    cfg = DataConfig()
    table = RecordTable([train, val], cfg, PromptBuilder(tokenizer, cfg))
    rows = _rows(train) + _rows(val)
    assert table.num_rows == len(rows) == 40
    paired = [i for i, r in enumerate(rows) if r["target_instances"]]
    single = [i for i, r in enumerate(rows) if not r["target_instances"]]
    assert table.paired_ids == paired and table.single_ids == single
    assert len(single) == 6 + 2 and len(table) == 40
    m = table.metrics()
    assert m["data/records_paired"] == 32 and m["data/records_single"] == 8 and m["data/rows_total"] == 40
    assert all(m[f"data/bad_rows/{r}"] == 0 for r in BAD_ROW_REASONS) and m["data/bad_rows/total"] == 0
    assert m["data/filtered_long/grounded"] == m["data/filtered_long/textual"] == m["data/filtered_long/single"] == 0
    # global original_idx across files, lazy rows equal the stored rows
    assert table.record(30) == rows[30] and table.location(30) == (val, 0) and table.location(29) == (train, 29)
    assert table.image_root(31) == data
    assert table.streams(paired[0]) == ("grounded", "textual") and table.streams(single[0]) == ("single",)
    with pytest.raises(IndexError, match="original_idx=40"):
        table.record(40)
    # prompts: both streams of a pair, the extra column kept
    i = paired[0]
    a, b = table.prompts([(i, "grounded"), (i, "textual")])
    assert (a.uid, b.uid) == (f"{i}:grounded", f"{i}:textual")
    assert "objects" in a.extra and json.loads(a.extra["objects"])
    assert len(a.target_boxes) == len(rows[i]["target_instances"]) and a.images


def _corrupt(data, kind, name="train.parquet"):
    """Corrupt one visual row of a table; returns (row, expected reason)."""
    path = data / name
    rows = _rows(path)
    r = _a_visual(path)
    image = data / rows[r]["images"][0]
    if kind == "missing_image":
        image.unlink()
        return r, "missing_image"
    if kind == "garbage_image":
        image.write_bytes(b"this is not a png at all" * 10)
        return r, "unreadable_image"
    if kind == "truncated_image":
        image.write_bytes(image.read_bytes()[:60])
        return r, "unreadable_image"
    if kind in ("empty_answer", "blank_answer", "null_answer"):
        rows[r]["answer"] = {"empty_answer": "", "blank_answer": "  ", "null_answer": None}[kind]
        _write(path, rows)
        return r, "empty_answer"
    boxes = {
        "swapped_bbox": [5, 5, 2, 2],
        "short_bbox": [1, 2, 3],
        "nan_bbox": [1, 2, math.nan, 4],
        "negative_bbox": [-3, 0, 10, 10],
        "outside_bbox": [0, 0, 500, 10],
        "null_bbox": None,
    }[kind]
    rows[r]["target_instances"] = [dict(rows[r]["target_instances"][0]), {"bbox": boxes, "label": "bad"}]
    _write(path, rows)
    return r, "bad_bbox"


KINDS = [
    "missing_image",
    "garbage_image",
    "truncated_image",
    "empty_answer",
    "blank_answer",
    "null_answer",
    "swapped_bbox",
    "short_bbox",
    "nan_bbox",
    "negative_bbox",
    "outside_bbox",
    "null_bbox",
]


@pytest.mark.parametrize("kind", KINDS)
def test_bad_row_raise_names_file_row_and_problem(data, kind):
    row, reason = _corrupt(data, kind)
    path = data / "train.parquet"
    with pytest.raises(DataError) as err:
        RecordTable([path], DataConfig(bad_rows="raise"))
    msg = str(err.value)
    assert str(path) in msg and f"row {row} " in msg and reason in msg
    if reason == "bad_bbox":
        assert "target 1 bbox" in msg  # the second target is the bad one


@pytest.mark.parametrize("kind", KINDS)
def test_bad_row_skip_drops_counts_and_warns(data, kind, caplog):
    row, reason = _corrupt(data, kind)
    path = data / "train.parquet"
    with caplog.at_level(logging.WARNING, logger="ivgr_dist.data.dataset"):
        table = RecordTable([path], DataConfig(bad_rows="skip"))
    m = table.metrics()
    assert m[f"data/bad_rows/{reason}"] == 1 and m["data/bad_rows/total"] == 1
    assert row not in table.paired_ids and row not in table.single_ids and table.streams(row) == ()
    assert len(table) == table.num_rows - 1
    assert f"{path} row {row}: {reason}" in caplog.text


def test_records_with_more_images_than_the_engines_take_are_bad_rows(data):
    """rollout.engine.max_images_per_prompt is enforced when the data loads, not by a failing batch."""
    path = data / "train.parquet"
    rows = _rows(path)
    r = _a_visual(path)
    rows[r]["images"] = rows[r]["images"] * 2
    rows[r]["problem"] = "<image><image>" + rows[r]["problem"].replace("<image>", "")
    _write(path, rows)
    table = RecordTable([path], DataConfig(bad_rows="skip"), max_images=1)
    assert table.metrics()["data/bad_rows/too_many_images"] == 1 and table.streams(r) == ()
    assert RecordTable([path], DataConfig(bad_rows="skip"), max_images=2).streams(r) != ()
    with pytest.raises(DataError, match=rf"row {r} .*too_many_images: 2 images; .*max_images_per_prompt=1"):
        RecordTable([path], DataConfig(bad_rows="raise"), max_images=1)


def test_raise_reports_the_first_bad_row_with_its_global_index(data):
    _corrupt(data, "garbage_image", "val.parquet")
    row, _ = _corrupt(data, "swapped_bbox", "val.parquet")
    val_rows = _rows(data / "val.parquet")
    first_visual = next(i for i, r in enumerate(val_rows) if r["images"])
    rows = val_rows
    rows[first_visual]["answer"] = ""
    _write(data / "val.parquet", rows)
    assert first_visual < row
    with pytest.raises(DataError) as err:
        RecordTable([data / "train.parquet", data / "val.parquet"], DataConfig(bad_rows="raise"))
    assert str(err.value).startswith(
        f"{data / 'val.parquet'} row {first_visual} (original_idx {30 + first_visual}): empty_answer"
    )
    table = RecordTable([data / "train.parquet", data / "val.parquet"], DataConfig(max_bad_row_fraction=0.1))
    assert table.metrics()["data/bad_rows/total"] == 2  # the bbox row also has the garbage image: one reason
    assert 30 + row not in table.paired_ids and 30 + first_visual not in table.paired_ids


def test_too_many_bad_rows_raise_even_in_skip_mode(data):
    path = data / "train.parquet"
    rows = _rows(path)
    for r in (0, 1, 2):
        rows[r]["answer"] = ""
    _write(path, rows)
    with pytest.raises(DataError, match=r"3 of 30 rows are bad.*max_bad_row_fraction=0.05"):
        RecordTable([path], DataConfig(bad_rows="skip"))
    assert len(RecordTable([path], DataConfig(bad_rows="skip", max_bad_row_fraction=0.2))) == 27


def test_missing_answer_column_and_missing_file(data, tmp_path):
    path = data / "train.parquet"
    t = pq.read_table(path).drop_columns(["answer"])
    pq.write_table(t, tmp_path / "noanswer.parquet")
    with pytest.raises(DataError, match=r"noanswer.parquet: no 'answer' column"):
        RecordTable([tmp_path / "noanswer.parquet"], DataConfig())
    with pytest.raises(DataError, match="nope.parquet: no such parquet file"):
        RecordTable([tmp_path / "nope.parquet"], DataConfig())


def test_json_string_targets_are_validated_too(data):
    path = data / "train.parquet"
    rows = _rows(path)
    r = _a_visual(path)
    for row in rows:
        row["target_instances"] = json.dumps(row["target_instances"])
    rows[r]["target_instances"] = json.dumps([{"bbox": [5, 5, 2, 2], "label": "x"}])
    schema = pq.read_schema(path).set(4, pa.field("target_instances", pa.string()))
    _write(path, rows, schema)
    table = RecordTable([path], DataConfig(bad_rows="skip"))
    assert table.metrics()["data/bad_rows/bad_bbox"] == 1
    expected = [i for i, row in enumerate(_rows(path)) if json.loads(row["target_instances"]) and i != r]
    assert table.paired_ids == expected


def test_datasource_overrides(data):
    path = data / "train.parquet"
    rows = _rows(path)
    math_rows = [i for i, row in enumerate(rows) if row["datasource"] == "synthetic_math"]
    t = RecordTable([path], DataConfig(paired_datasources=["synthetic_math"]))
    assert t.single_ids == [] and set(math_rows) <= set(t.paired_ids)
    t = RecordTable([path], DataConfig(single_datasources=["synthetic_shapes"]))
    assert t.paired_ids == [] and len(t.single_ids) == len(rows)


def test_image_root_override(data, tmp_path):
    elsewhere = tmp_path / "root"
    shutil.copytree(data / "images", elsewhere / "images")
    moved = tmp_path / "tables"
    moved.mkdir()
    shutil.copy(data / "train.parquet", moved / "train.parquet")
    t = RecordTable([moved / "train.parquet"], DataConfig(image_root=str(elsewhere)))
    assert t.image_root(0) == elsewhere and t.metrics()["data/bad_rows/total"] == 0
    with pytest.raises(DataError, match="missing_image"):
        RecordTable([moved / "train.parquet"], DataConfig(bad_rows="raise"))


def test_long_prompt_filter_keeps_pairs_intact(data, tokenizer):
    path = data / "train.parquet"
    cfg = DataConfig()
    builder = PromptBuilder(tokenizer, cfg)
    full = RecordTable([path], cfg, builder)
    lengths = {(i, s): full.prompt(i, s).num_prompt_tokens for i in full.paired_ids for s in ("grounded", "textual")}
    lengths.update({(i, "single"): full.prompt(i, "single").num_prompt_tokens for i in full.single_ids})
    grounded = sorted(v for (i, s), v in lengths.items() if s == "grounded")
    limit = grounded[len(grounded) // 2]
    long_g = {i for (i, s), v in lengths.items() if s == "grounded" and v > limit}
    long_t = {i for (i, s), v in lengths.items() if s == "textual" and v > limit}
    assert long_g and long_t < long_g  # some records are too long only in the grounded stream
    assert max(v for (i, s), v in lengths.items() if s == "single") <= limit

    cut = RecordTable([path], DataConfig(max_prompt_length=limit), PromptBuilder(tokenizer, cfg))
    m = cut.metrics()
    assert m["data/filtered_long/grounded"] == len(long_g)
    assert m["data/filtered_long/textual"] == len(long_t)
    assert m["data/filtered_long/single"] == 0
    assert cut.paired_ids == [i for i in full.paired_ids if i not in long_g]
    assert cut.single_ids == full.single_ids
    for i in cut.paired_ids:
        assert cut.streams(i) == ("grounded", "textual")
        assert lengths[(i, "grounded")] <= limit and lengths[(i, "textual")] <= limit
    for i in long_g:
        assert cut.streams(i) == ()  # both prompts of the pair are gone

    with pytest.raises(DataError, match="no usable records"):
        RecordTable([path], DataConfig(max_prompt_length=10), PromptBuilder(tokenizer, cfg))


def test_prompt_needs_a_builder(data):
    t = RecordTable([data / "val.parquet"], DataConfig())
    with pytest.raises(ValueError, match="PromptBuilder"):
        t.prompt(0, "single")
