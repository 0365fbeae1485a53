"""``ivgr-dist report``: the plots written for the keys present, report.md's links and table, the step-time
breakdown and the CLI's error for a run directory without metrics (no Ray, no model)."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
from PIL import Image

from ivgr_dist.cli import main
from ivgr_dist.commands.report import Table, moving_average, step_time_breakdown, window_means, write_report

ALL_PLOTS = {
    "rewards.png",
    "accuracy_iou.png",
    "step_time.png",
    "throughput.png",
    "logprob_mismatch.png",
    "staleness.png",
    "fleet.png",
}

# Timing keys of real runs (trimmed from metrics files of the tiny CPU runs): asynchronous steps 1-3, where
# step 1 waited for its whole batch and steps 2-3 found it ready; synchronous steps 1-2 of a run logged
# before time/wait_s existed.
ASYNC_TIMES = [
    {"step": 1, "time/step_s": 6.9534, "time/generate_s": 4.8338, "time/wait_s": 4.854, "reward/tail_s": 0.0078,
     "time/learner_s": 1.7887, "time/sync_s": 0.0955},
    {"step": 2, "time/step_s": 1.4026, "time/generate_s": 1.1498, "time/wait_s": 5.88e-05, "reward/tail_s": 0.0178,
     "time/learner_s": 1.0695, "time/sync_s": 0.1073},
    {"step": 3, "time/step_s": 1.8634, "time/generate_s": 1.1966, "time/wait_s": 7.22e-05, "reward/tail_s": 0.0056,
     "time/learner_s": 1.4661, "time/sync_s": 0.1211},
]  # fmt: skip
SYNC_TIMES = [
    {"step": 1, "time/step_s": 11.4594, "time/generate_s": 7.6598, "reward/tail_s": 0.0306, "time/learner_s": 3.5846,
     "time/sync_s": 0.0971},
    {"step": 2, "time/step_s": 6.4344, "time/generate_s": 3.4304, "reward/tail_s": 0.2931, "time/learner_s": 2.5141,
     "time/sync_s": 0.0833},
]  # fmt: skip
PARTS = ("generate", "reward tail", "learner", "sync", "other")


def _records(n: int = 12, fleet: bool = True, staleness: bool = True) -> list[dict]:
    """``n`` steps with the keys of a run: both paired streams and the single stream, timings, throughput,
    log-prob mismatch; staleness and fleet gauges on request."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        acc = min(1.0, 0.05 * i)
        r = {
            "step": i + 1,
            "weight_version": float(i + 1),
            "reward/grounded/overall": 1.5 * acc,
            "reward/grounded/accuracy": acc,
            "reward/grounded/format": 1.0,
            "reward/grounded/box_valid": 0.9,
            "reward/grounded/box_iou": 0.5 * acc,
            "reward/textual/overall": acc + 0.1,
            "reward/textual/accuracy": acc,
            "reward/textual/format": 0.8,
            "reward/textual/consistency": 0.3,
            "reward/single/overall": acc,
            "reward/single/accuracy": acc,
            "reward/single/format": 1.0,
            "reward/tail_s": 0.01,
            "time/generate_s": 5.0 + rng.random(),
            "time/wait_s": 5.2 + rng.random(),
            "time/learner_s": 3.0 + rng.random(),
            "time/sync_s": 0.1,
            "time/step_s": 10.0 + rng.random(),
            "rollout/tokens_per_s": 3000.0 + 100 * i,
            "learner/tokens": 12000.0,
            "logprob/mismatch_mean": 1e-3 * (1 + 0.1 * i),
            "metrics/non_finite": 0,
        }
        if staleness:
            r["rollout/staleness_mean"] = 0.5
            r["rollout/staleness_max"] = 1.0
            r["logprob/offpolicy_abs_mean"] = 0.05
        if fleet:
            r["rollout/engines_live"] = 2.0 if i % 5 else 1.0
            r["rollout/engines_target"] = 2.0
            r["rollout/engines_pending"] = 0.0 if i % 5 else 1.0
        out.append(r)
    return out


def _run_dir(tmp_path, records, name="run"):
    run = tmp_path / name
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return run


def _links(page) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", page.read_text())


def _assert_pngs(out, names):
    for name in names:
        with Image.open(out / name) as img:
            img.verify()
        with Image.open(out / name) as img:
            assert img.format == "PNG"
            assert img.width >= 700 and img.height >= 400, (name, img.size)  # ~8 x 4.5 in at 100 dpi


def test_every_plot_is_written_and_linked(tmp_path):
    run = _run_dir(tmp_path, _records())
    page = write_report(run)
    assert page == run / "report" / "report.md"
    written = {p.name for p in page.parent.glob("*.png")}
    assert written == ALL_PLOTS
    _assert_pngs(page.parent, written)
    links = _links(page)
    assert sorted(links) == sorted(ALL_PLOTS)  # each file once, relative links
    assert "Not plotted" not in page.read_text()


def test_summary_table_steps_and_final_version(tmp_path):
    page = write_report(_run_dir(tmp_path, _records(12)))
    text = page.read_text()
    assert "12 steps (1-12)" in text and "Final weight version: 12." in text
    # accuracy is 0.05 * (step - 1): steps 1-5 mean 0.1, steps 8-12 mean 0.45
    row = next(ln for ln in text.splitlines() if ln.startswith("| `reward/grounded/accuracy`"))
    assert row == "| `reward/grounded/accuracy` | 0.100 (steps 1-5) | 0.450 (steps 8-12) | +0.350 |"
    for key in ("reward/textual/consistency", "reward/grounded/box_iou", "reward/single/overall"):
        assert f"| `{key}` |" in text
    assert "| `reward/grounded/format` |" not in text  # only the main keys


def test_absent_keys_mean_no_png_and_a_note(tmp_path):
    records = _records(fleet=False, staleness=False)
    for r in records:
        del r["logprob/mismatch_mean"]
    page = write_report(_run_dir(tmp_path, records))
    written = {p.name for p in page.parent.glob("*.png")}
    assert written == ALL_PLOTS - {"fleet.png", "staleness.png", "logprob_mismatch.png"}
    assert sorted(_links(page)) == sorted(written)
    text = page.read_text()
    assert "Not plotted: no values of `rollout/staleness_mean`, `rollout/staleness_max`" in text
    assert "Not plotted: no values of `rollout/engines_live`, `rollout/engines_target`" in text
    assert "Not plotted: no values of `logprob/mismatch_mean`" in text


def test_an_empty_metrics_file_gives_a_page_without_plots(tmp_path):
    page = write_report(_run_dir(tmp_path, []))
    assert not list(page.parent.glob("*.png")) and _links(page) == []
    text = page.read_text()
    assert "holds no records" in text and text.count("Not plotted") == len(ALL_PLOTS)


def test_a_rerun_removes_plots_it_no_longer_writes(tmp_path):
    run = _run_dir(tmp_path, _records())
    write_report(run)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _records(fleet=False)))
    page = write_report(run)
    assert not (page.parent / "fleet.png").exists()
    assert sorted(_links(page)) == sorted(p.name for p in page.parent.glob("*.png"))


def test_null_values_still_plot(tmp_path):
    records = _records()
    records[3]["reward/grounded/accuracy"] = None  # a NaN logged by MetricsLogger
    records[4]["time/learner_s"] = None
    records[5]["time/step_s"] = None
    records[6]["logprob/mismatch_mean"] = None
    page = write_report(_run_dir(tmp_path, records))
    written = {p.name for p in page.parent.glob("*.png")}
    assert written == ALL_PLOTS
    _assert_pngs(page.parent, written)
    table = Table(records)
    assert math.isnan(table.column("reward/grounded/accuracy")[3])
    parts = step_time_breakdown(table)
    assert 6 not in parts["step"]  # no step time: nothing to break down
    i = list(parts["step"]).index(5)
    assert parts["learner"][i] == 0.0  # the unknown learner time lands in "other"
    assert sum(parts[p][i] for p in PARTS) == pytest.approx(parts["total"][i])


def test_breakdown_of_an_asynchronous_run_counts_only_the_wait():
    parts = step_time_breakdown(Table(ASYNC_TIMES))
    # step 1 waited for all of its generation (4.8338 s of 4.854 s); the rest of the wait is reward tail
    assert parts["generate"][0] == pytest.approx(4.8338)
    assert parts["reward tail"][0] == pytest.approx(0.0078)
    # steps 2-3 found their batch ready: the generation overlapped the previous step and is not step time
    assert parts["generate"][1:] == pytest.approx([5.88e-05, 7.22e-05])
    assert parts["reward tail"][1:] == pytest.approx([0.0, 0.0])
    assert parts["all_generation"] == pytest.approx([4.8338, 1.1498, 1.1966])
    other = [
        6.9534 - 4.8338 - 0.0078 - 1.7887 - 0.0955,
        1.4026 - 5.88e-05 - 1.0695 - 0.1073,
        1.8634 - 7.22e-05 - 1.4661 - 0.1211,
    ]
    assert parts["other"] == pytest.approx(other)
    for i in range(3):
        assert sum(parts[p][i] for p in PARTS) == pytest.approx(parts["total"][i])


def test_breakdown_without_wait_uses_generation_and_tail():
    parts = step_time_breakdown(Table(SYNC_TIMES))
    assert parts["generate"] == pytest.approx([7.6598, 3.4304])
    assert parts["reward tail"] == pytest.approx([0.0306, 0.2931])
    assert parts["other"] == pytest.approx([11.4594 - 7.6598 - 0.0306 - 3.5846 - 0.0971, 6.4344 - 6.3209])
    total = sum(parts[p] for p in PARTS)
    assert total == pytest.approx(parts["total"])


def test_breakdown_clips_other_at_zero():
    record = {"step": 1, "time/step_s": 1.0, "time/generate_s": 0.8, "time/learner_s": 0.5, "time/sync_s": 0.0}
    parts = step_time_breakdown(Table([record]))
    assert parts["other"][0] == 0.0 and parts["generate"][0] + parts["learner"][0] == pytest.approx(1.3)


def test_repeated_steps_after_a_resume_keep_the_last_record(tmp_path):
    records = _records(4)
    again = dict(records[2], **{"reward/grounded/accuracy": 0.9})  # step 3 logged again after a resume
    table = Table([*records, again])
    assert list(table.steps) == [1, 2, 3, 4] and table.repeated == 1
    assert table.column("reward/grounded/accuracy")[2] == 0.9
    page = write_report(_run_dir(tmp_path, [*records, again]))
    assert "1 records repeat an earlier step" in page.read_text()


def test_window_means_and_moving_average():
    table = Table([{"step": i + 1, "x": float(i)} for i in range(6)] + [{"step": 7, "x": None}])
    assert window_means(table, "x", 2) == (((1, 2), 0.5), ((5, 6), 4.5))
    assert window_means(table, "x", 5) == (((1, 3), 1.0), ((4, 6), 4.0))  # shrunk to half of the 6 values
    assert window_means(table, "missing") is None
    avg = moving_average(np.array([1.0, 2.0, math.nan, 4.0]), 2)
    assert math.isnan(avg[0]) and list(avg[1:]) == [1.5, 2.0, 4.0]


def test_cli_prints_the_report_path(tmp_path, capsys):
    run = _run_dir(tmp_path, _records(3, fleet=False, staleness=False))
    assert main(["report", str(run)]) == 0
    assert json.loads(capsys.readouterr().out) == {"report": str(run / "report" / "report.md")}


def test_cli_without_metrics_exits_1_naming_the_file(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"ivgr-dist report: no metrics file {tmp_path / 'metrics.jsonl'}"
    assert not (tmp_path / "report").exists()
