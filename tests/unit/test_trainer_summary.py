"""The final summary of ``ivgr-dist train``: window means of the first vs last steps."""

from __future__ import annotations

import pytest

from ivgr_dist.config import load_config
from ivgr_dist.trainer import summarize, window_means


def _records(values):
    return [
        {"step": i + 1, "reward/textual/accuracy": v, "weight_version": i + 1, "sync/engines_in_sync": 1.0}
        for i, v in enumerate(values)
    ]


def test_window_means_use_the_first_and_last_window():
    recs = _records([0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    assert window_means(recs, "reward/textual/accuracy", 2) == pytest.approx((0.1, 0.9))
    # A window larger than half the run shrinks to half, so the two windows never overlap.
    assert window_means(recs, "reward/textual/accuracy", 5) == pytest.approx((0.2, 0.8))
    assert window_means(recs, "reward/grounded/box_iou", 2) is None


def test_summary_reports_means_delta_and_paths(tmp_path):
    cfg = load_config(None, [f"trainer.output_dir={tmp_path}"])
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    text = summarize(cfg, _records([0.1, 0.3, 0.5, 0.7]), window=2)
    line = next(ln for ln in text.splitlines() if "reward/textual/accuracy" in ln)
    assert line.split()[1:] == ["0.200", "0.600", "(+0.400)"]
    assert "steps 1-2" in text and "steps 3-4" in text
    assert f"ivgr-dist eval --model {tmp_path / 'model'}" in text
    assert "nothing to do" in summarize(cfg, [])
