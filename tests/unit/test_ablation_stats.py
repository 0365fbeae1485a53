"""benchmarks/ablation.py's statistics: per-record means from predictions.jsonl, intervals over seeds and over
records, paired differences, the rendered table."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("ablation", Path(__file__).parents[2] / "benchmarks" / "ablation.py")
ablation = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ablation)


def test_mean_interval_by_hand():
    mean, hw = ablation.mean_interval([0.5, 0.6, 0.7])
    # sd = 0.1, t(0.975, 2) = 4.303: 4.303 * 0.1 / sqrt(3)
    assert mean == pytest.approx(0.6) and hw == pytest.approx(4.303 * 0.1 / math.sqrt(3))
    assert ablation.mean_interval([0.4, 0.6], z=1.96)[1] == pytest.approx(1.96 * math.sqrt(0.02) / math.sqrt(2))
    assert ablation.mean_interval([0.3]) == (0.3, None)
    with pytest.raises(ValueError):
        ablation.mean_interval([])


def test_record_means_average_each_records_samples_per_stream(tmp_path):
    rows = [
        {"datasource": "s", "original_idx": 1, "stream": "textual", "rewards": {"accuracy": 1.0}},
        {"datasource": "s", "original_idx": 1, "stream": "textual", "rewards": {"accuracy": 0.0}},
        {"datasource": "s", "original_idx": 2, "stream": "textual", "rewards": {"accuracy": 1.0}},
        {"datasource": "s", "original_idx": 1, "stream": "grounded", "rewards": {"accuracy": 0.0, "box_iou": 0.4}},
    ]
    path = tmp_path / "predictions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert sorted(ablation.record_means(path, "textual", "accuracy")) == [0.5, 1.0]
    assert ablation.record_means(path, "grounded", "box_iou") == [0.4]
    assert ablation.record_means(path, "single", "accuracy") == []


def test_summarize_pools_records_and_intervals_seeds_and_the_table_shows_both():
    per_seed = {0: {"T acc greedy": [1.0, 0.0]}, 1: {"T acc greedy": [1.0, 1.0]}, 2: {"T acc greedy": [0.0, 0.0]}}
    stats = ablation.summarize(per_seed)["T acc greedy"]
    assert stats["seed_means"] == [0.5, 1.0, 0.0] and stats["mean"] == pytest.approx(0.5)
    assert stats["seeds_ci95"] == pytest.approx(4.303 * 0.5 / math.sqrt(3))
    pooled_sd = math.sqrt(sum((x - 0.5) ** 2 for x in [1, 0, 1, 1, 0, 0]) / 5)
    assert stats["records_ci95"] == pytest.approx(1.96 * pooled_sd / math.sqrt(6))
    assert (stats["seeds"], stats["records"]) == (3, 6)
    diff = ablation.paired_difference({0: 0.6, 1: 0.7, 2: 0.5}, {0: 0.5, 1: 0.5, 2: 0.5, 3: 0.9})
    assert diff["seeds"] == 3 and diff["mean"] == pytest.approx(0.1)
    text = ablation.render({"dual_stream": {"T acc greedy": stats}}, {"textual_only": {"T acc greedy": diff}}, "# t")
    assert "| dual_stream | 0.500 ± 1.242 [±0.438] | - |" in text
    assert "| textual_only - dual_stream | +0.100 ± 0.248 |" in text
