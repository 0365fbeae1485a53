"""Eval tables: per-datasource aggregation, micro-average, Markdown and the eval-only helpers (no model, no Ray)."""

from __future__ import annotations

import argparse
from types import SimpleNamespace

import pytest

import ivgr_dist.commands.evaluate as evaluate
from ivgr_dist.commands.evaluate import (
    add_arguments,
    eval_config,
    eval_prompts,
    render_markdown,
    split_overrides,
    summarize,
)
from ivgr_dist.config import ConfigError, load_config
from ivgr_dist.types import Prompt, Rollout


def _rollout(idx, stream, ds, tokens, acc, fmt=1.0, iou=None, valid=None, sample=0, finish="stop"):
    p = Prompt(idx, stream, "", [1], 1, "red", "exact", ds)
    rewards = {"accuracy": acc, "format": fmt}
    if iou is not None:
        rewards.update(box_iou=iou, box_valid=valid)
    return Rollout(p, sample, list(range(tokens)), "", [0.0] * tokens, 0, finish, rewards)


@pytest.fixture
def tables():
    rollouts = [
        # shapes: records 0 and 1 as A/B pairs; record 1 has two samples per stream (means taken per record first)
        _rollout(0, "grounded", "shapes", 10, 1.0, iou=0.5, valid=1.0),
        _rollout(0, "textual", "shapes", 4, 0.0, fmt=0.0, finish="length"),
        _rollout(1, "grounded", "shapes", 20, 0.0, iou=0.25, valid=0.5),
        _rollout(1, "grounded", "shapes", 30, 1.0, iou=0.75, valid=0.5, sample=1),
        _rollout(1, "textual", "shapes", 6, 1.0),
        _rollout(1, "textual", "shapes", 8, 1.0, sample=1),
        # other: one pair, plus a single record
        _rollout(2, "grounded", "other", 40, 0.0, fmt=0.0, iou=0.0, valid=0.0),
        _rollout(2, "textual", "other", 10, 1.0),
        _rollout(3, "single", "math", 12, 1.0),
    ]
    return summarize(rollouts)


def test_per_datasource_means_over_records(tables):
    g = tables["datasources"]["shapes"]["grounded"]
    # record 0: acc 1, iou .5, valid 1, len 10; record 1: acc .5, iou .5, valid .5, len 25
    assert g == {
        "records": 2,
        "samples": 3,
        "accuracy": 0.75,
        "format": 1.0,
        "box_iou": 0.5,
        "box_valid": 0.75,
        "response_tokens": 17.5,
        "truncated": 0.0,
    }
    t = tables["datasources"]["shapes"]["textual"]
    assert t == {
        "records": 2,
        "samples": 3,
        "accuracy": 0.5,
        "format": 0.5,
        "response_tokens": 5.5,
        "truncated": 0.5,
    }
    assert set(tables["datasources"]) == {"shapes", "other", "math"}
    assert set(tables["datasources"]["math"]) == {"single"}
    assert tables["datasources"]["math"]["single"]["accuracy"] == 1.0


def test_all_is_micro_average_over_records(tables):
    g = tables["all"]["grounded"]
    # records 0, 1, 2: accuracy (1 + .5 + 0) / 3, tokens (10 + 25 + 40) / 3
    assert g["records"] == 3 and g["samples"] == 4
    assert g["accuracy"] == pytest.approx(0.5)
    assert g["response_tokens"] == pytest.approx(25.0)
    assert g["box_iou"] == pytest.approx(1 / 3)
    t = tables["all"]["textual"]
    assert t["records"] == 3 and t["accuracy"] == pytest.approx(2 / 3) and t["format"] == pytest.approx(2 / 3)
    assert tables["all"]["single"]["records"] == 1


def test_markdown_columns_and_dashes(tables):
    md = render_markdown(tables, ["mode: both"])
    assert "- mode: both" in md
    shapes = md.split("### `shapes`")[1].split("###")[0]
    assert "| metric | T (textual) | G (grounded) |" in shapes and "S (single)" not in shapes
    assert "| records | 2 | 2 |" in shapes
    assert "| accuracy | 0.500 | 0.750 |" in shapes
    assert "| box IoU (mean) | - | 0.500 |" in shapes
    assert "| response tokens (mean) | 5.5 | 17.5 |" in shapes
    math = md.split("### `math`")[1].split("###")[0]
    assert "| records | - | - | 1 |" in math
    everything = md.split("### all (micro-average over records)")[1]
    assert "| records | 3 | 3 | 1 |" in everything
    assert "| accuracy | 0.667 | 0.500 | 1.000 |" in everything
    assert md.index("`math`") < md.index("`other`") < md.index("`shapes`") < md.index("### all")


def test_textual_mode_leaves_grounded_empty():
    tables = summarize([_rollout(0, "textual", "shapes", 3, 1.0)])
    md = render_markdown(tables)
    assert "| records | 1 | - |" in md and "| accuracy | 1.000 | - |" in md
    assert "grounded" not in tables["datasources"]["shapes"]


def test_eval_prompts_modes_and_limit():
    records = SimpleNamespace(paired_ids=[0, 2, 3], single_ids=[1])
    assert eval_prompts(records, "both") == [(0, "grounded"), (0, "textual"), (1, "single"), (2, "grounded"),
                                             (2, "textual"), (3, "grounded"), (3, "textual")]  # fmt: skip
    assert eval_prompts(records, "textual", max_records=2) == [(0, "textual"), (1, "single")]
    assert eval_prompts(records, "grounded", max_records=1) == [(0, "grounded")]
    with pytest.raises(ValueError, match="mode='x'"):
        eval_prompts(records, "x")


def test_eval_config_points_at_model_and_data_and_generates_nothing(tmp_path):
    data = tmp_path / "v.parquet"
    data.write_bytes(b"")
    cfg = eval_config(load_config(), tmp_path / "m", [data])
    assert cfg.model.path == str(tmp_path / "m") and not cfg.model.make_tiny_if_missing
    assert cfg.data.val_files == [str(data)] == cfg.data.train_files and not cfg.data.make_synthetic_if_missing
    with pytest.raises(FileNotFoundError, match="missing.parquet"):
        eval_config(load_config(), tmp_path / "m", [tmp_path / "missing.parquet"])
    with pytest.raises(ConfigError):
        eval_config(load_config(), tmp_path / "m", [])


def test_cli_arguments_and_overrides_after_data(tmp_path, monkeypatch):
    p = argparse.ArgumentParser()
    p.add_argument("--config", default=None)
    add_arguments(p)
    args = p.parse_args(["--model", "m", "--data", "a.parquet", "b.parquet", "rollout.n=2", "--sample"])
    assert args.mode == "both" and args.sample and args.max_records is None
    files, overrides = split_overrides(args.data, args.overrides)
    assert files == ["a.parquet", "b.parquet"] and overrides == ["rollout.n=2"]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "part.key=1").write_bytes(b"")  # an existing file that looks like an override stays data
    assert split_overrides(["part.key=1", "data.seed=3"], []) == (["part.key=1"], ["data.seed=3"])


def test_chunks_keep_a_records_streams_together(monkeypatch):
    """Generation and scoring run chunk by chunk; a record's T and G prompts never straddle two chunks."""
    monkeypatch.setattr(evaluate, "RECORDS_PER_CHUNK", 2)
    items = eval_prompts(SimpleNamespace(paired_ids=[0, 2, 3], single_ids=[1]), "both")
    records = SimpleNamespace(prompts=lambda chunk: [Prompt(i, s, "", [1], 1, "a", "exact", "d") for i, s in chunk])
    chunks = []

    class Pool:
        def generate(self, prompts, n, temperature, stats, seed):
            chunks.append([p.uid for p in prompts])
            assert (n, temperature, seed) == (1, 0.0, 5)
            return ([Rollout(p, 0, [1], "", [0.0], 0)] for p in prompts)

    class Scorer:
        def score_stream(self, groups, prompts, step):
            yield from groups

    got = list(evaluate._generate_and_score(records, items, Pool(), Scorer(), None, 1, 0.0, 5))
    assert chunks == [["0:grounded", "0:textual", "1:single"], ["2:grounded", "2:textual", "3:grounded", "3:textual"]]
    assert [r.prompt.uid for r in got] == [u for c in chunks for u in c]


def test_records_whose_image_fails_to_decode_are_left_out_and_counted(monkeypatch, tmp_path, tiny_model_dir):
    """Eval builds prompts through the training pipeline: a record whose image fails to decode is not evaluated
    (counted in data/bad_rows/unreadable_image), a chunk that loses every record generates nothing, the rest runs."""
    from transformers import AutoTokenizer

    from ivgr_dist.config import DataConfig, SyntheticConfig
    from ivgr_dist.data.dataset import RecordTable
    from ivgr_dist.data.prompts import PromptBuilder
    from ivgr_dist.data.synthetic import make_synthetic
    from support.images import cut_jpeg

    make_synthetic(tmp_path, SyntheticConfig(num_records=8, val_fraction=0.5, text_only_fraction=0.0))
    cfg = DataConfig(max_bad_row_fraction=0.5)
    records = RecordTable(
        [tmp_path / "val.parquet"], cfg, PromptBuilder(AutoTokenizer.from_pretrained(tiny_model_dir), cfg)
    )
    monkeypatch.setattr(evaluate, "RECORDS_PER_CHUNK", 2)
    items = eval_prompts(records, "both")
    for i in (0, 1):  # the whole first chunk
        cut_jpeg(tmp_path / records.record(i)["images"][0])
    generated = []

    class Pool:
        def generate(self, prompts, n, temperature, stats, seed):
            generated.append([p.uid for p in prompts])
            return ([Rollout(p, 0, [1], "", [0.0], 0)] for p in prompts)

    class Scorer:
        def score_stream(self, groups, prompts, step):
            yield from groups

    got = list(evaluate._generate_and_score(records, items, Pool(), Scorer(), None, 1, 0.0, 5))
    assert generated == [["2:grounded", "2:textual", "3:grounded", "3:textual"]]
    assert [r.prompt.uid for r in got] == generated[0]
    assert records.metrics()["data/bad_rows/unreadable_image"] == 2 and records.streams(0) == ()
