"""``ivgr-dist train trainer.max_staleness=1``: engines generate the next batch while the learner trains,
weight pushes land in running generations, and the staleness bound holds on every step; a resumed async run
continues where the checkpoint is (nothing trained twice, nothing skipped: see tests/unit/test_producer.py
for the exact resume state)."""

from __future__ import annotations

import json
import subprocess

import pytest

from support.cli import run_train

# Slow tier (two subprocess runs, ~2.5 min): the default tier stays well under 30 min on 2 cores.
pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _train(tmp_path, tiny_model_dir, *extra: str) -> subprocess.CompletedProcess:
    overrides = [
        f"model.path={tiny_model_dir}",
        f"data.train_files=[{tmp_path / 'data' / 'train.parquet'}]",
        f"data.val_files=[{tmp_path / 'data' / 'val.parquet'}]",
        "data.synthetic.num_records=96",
        "data.rollout_batch_size=8",
        "rollout.max_response_length=48",
        "learner.global_batch_size=4",
        "sft.enabled=false",
        f"trainer.output_dir={tmp_path / 'run'}",
        "trainer.max_staleness=1",
        "trainer.loggers=[jsonl]",
        "trainer.trace=true",
        *extra,
    ]
    return run_train(overrides, timeout=900)


def test_one_step_off_training_keeps_the_bound_and_resumes(tmp_path, tiny_model_dir):
    from ivgr_dist.runtime.metrics import read_metrics

    proc = _train(tmp_path, tiny_model_dir, "trainer.max_steps=8", "trainer.save_every=4")
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 9))
    assert [r["weight_version"] for r in records] == list(range(1, 9))
    assert all(r["rollout/staleness_max"] <= 1 for r in records)
    # generation ran ahead: from step 2 on batches were (partly) generated before the previous push
    assert sum(r["rollout/staleness_max"] == 1 for r in records) >= 4, [r["rollout/staleness_max"] for r in records]
    # (whether a push lands mid-generation depends on timing: tests/integration/test_inflight_update.py shows it)
    assert all(0 <= r["rollout/mixed_version_frac"] <= 1 for r in records)
    assert sum(r["time/wait_s"] < 0.5 * r["time/generate_s"] for r in records[1:]) >= 4  # generation was hidden
    assert all(r["rollout/dropped_stale"] == 0 for r in records)  # admission kept the bound by itself
    assert all(r["sync/verified"] == 1.0 for r in records)
    for r in records:
        assert 0 < r["offpolicy/is_weight_mean"] <= 2.0 and 0 < r["offpolicy/ess"] <= 1.0
    # the trace shows the overlap: engine spans inside the learner's spans of the previous step
    trace = json.loads((tmp_path / "run" / "trace.json").read_text())
    tracks = {e["args"]["name"] for e in trace["traceEvents"] if e["ph"] == "M"}
    assert {"engine 0", "engine 1", "learner", "sync", "trainer"} <= tracks
    spans = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    tid = {e["args"]["name"]: e["tid"] for e in trace["traceEvents"] if e["ph"] == "M"}
    learner = [(e["ts"], e["ts"] + e["dur"]) for e in spans if e["tid"] == tid["learner"]]
    engines = [(e["ts"], e["ts"] + e["dur"]) for e in spans if e["tid"] in (tid["engine 0"], tid["engine 1"])]
    overlap = sum(max(0, min(b, d) - max(a, c)) for a, b in learner for c, d in engines)
    assert overlap > 0

    again = _train(tmp_path, tiny_model_dir, "trainer.max_steps=10", "trainer.save_every=4")
    assert again.returncode == 0, again.stderr[-4000:]
    resumed = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in resumed[8:]] == [9, 10] and resumed[-1]["weight_version"] == 10
    assert all(r["rollout/staleness_max"] <= 1 for r in resumed[8:])
