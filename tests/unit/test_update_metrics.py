"""An update's metrics by name (ivgr_dist.learner.update_metrics): every sum lands in its own metric, on one gloo
process as on several (tests/integration/test_learner.py runs the real update)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from ivgr_dist.learner.update_metrics import SUMS, UpdateSums, loss_metrics


def _losses(scale: float) -> dict[str, torch.Tensor]:
    """grpo_loss's metrics with a distinct value each (a swap of any two changes the result)."""
    values = {"pg_loss": 2, "kl_loss": 3, "loss": 5, "pg_clipfrac": 7, "pg_clipfrac_high": 11, "pg_clipfrac_low": 13}
    return {k: torch.tensor(v * scale) for k, v in {**values, "approx_kl": 17}.items()}


@pytest.fixture
def gloo_world_of_one(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_each_sum_reaches_its_own_metric(gloo_world_of_one):
    sums = UpdateSums()
    sums.add_losses(_losses(1.0), torch.tensor(10))  # two micro-batches: 10 and 30 response tokens
    sums.add_losses(_losses(0.5), torch.tensor(30))
    sums.add_is_weights(torch.tensor([0.5, 1.0, 2.0, 2.0]), cap=2.0)
    sums.add(slots=64, real=48)
    tot = sums.all_reduce(dist.all_reduce)
    assert list(tot) == list(SUMS)
    assert tot == {
        "pg": 3.0, "kl": 4.5, "total": 7.5,
        "clip": 7 * 10 + 3.5 * 30, "clip_high": 11 * 10 + 5.5 * 30, "clip_low": 13 * 10 + 6.5 * 30,
        "approx_kl": 17 * 10 + 8.5 * 30, "tokens": 40.0,
        "w": 5.5, "w2": 9.25, "w_capped": 2.0, "w_n": 4.0, "slots": 64.0, "real": 48.0,
    }  # fmt: skip
    world = 2  # as if this rank's sums were the global ones of two ranks
    assert loss_metrics(tot, world) == {
        "loss/policy": 1.5,
        "loss/kl": 2.25,
        "loss/total": 3.75,
        "clip/frac": 175 / 40,
        "clip/frac_high": 275 / 40,
        "clip/frac_low": 325 / 40,
        "policy/approx_kl": 425 / 40,
        "offpolicy/is_weight_mean": 5.5 / 4,
        "offpolicy/is_clip_frac": 0.5,
        "offpolicy/ess": 5.5**2 / (4 * 9.25),
    }


def test_sums_add_over_ranks_in_one_reduction():
    sums = UpdateSums()
    sums.add(pg=1.0, real=2)
    seen = []

    def two_equal_ranks(t: torch.Tensor) -> None:
        seen.append(t.shape)
        t.mul_(2)

    tot = sums.all_reduce(two_equal_ranks)
    assert seen == [(len(SUMS),)] and tot["pg"] == 2.0 and tot["real"] == 4.0 and tot["kl"] == 0.0


def test_without_importance_weights_or_for_sft_only_the_losses_that_apply():
    sums = UpdateSums()
    sft = {"pg_loss": torch.tensor(0.25), "loss": torch.tensor(0.25), "approx_kl": torch.tensor(0.0)}
    sft |= {k: torch.tensor(0.0) for k in ("pg_clipfrac", "pg_clipfrac_high", "pg_clipfrac_low")}
    sums.add_losses(sft, torch.tensor(8))  # no kl_loss: counted as 0
    tot = sums.all_reduce(lambda t: None)
    assert loss_metrics(tot, 1, sft=True) == {"loss/nll": 0.25}
    assert not any(k.startswith("offpolicy/") for k in loss_metrics(tot, 1))  # the correction was off
    with pytest.raises(KeyError):
        sums.add(unknown=1.0)
