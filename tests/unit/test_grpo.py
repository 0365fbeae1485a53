"""Unit tests for ivgr_dist.learner.grpo against hand-computed values."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ivgr_dist.learner.grpo import (
    GRPOLossConfig,
    group_advantages,
    group_advantages_and_stats,
    group_stats,
    grpo_loss,
    kl_k3,
    logprobs_from_logits,
    policy_loss,
    token_mean,
)

# Group a: rewards [1, 0, 0, 1, 1] -> mean 0.6, squared deviations sum 1.2, unbiased var 1.2 / 4 = 0.3,
# std sqrt(0.3) = 0.5477225575051661. Advantages 0.4 / (std + 1e-6) and -0.6 / (std + 1e-6).
A_POS = 0.7302954100093225
A_NEG = -1.0954431150139836


def _ratio_case(ratios, advantages, dtype=torch.float64):
    """logp/old_logp with the given ratios (old_logp = 0), one token per row."""
    logp = torch.tensor([[math.log(r)] for r in ratios], dtype=dtype, requires_grad=True)
    old = torch.zeros_like(logp)
    adv = torch.tensor(advantages, dtype=dtype)
    mask = torch.ones_like(logp, dtype=torch.bool)
    return logp, old, adv, mask


def _per_token_loss(ratios, advantages, **kw):
    """Loss of each single-token row on its own (the loss of a 1-token batch is that token's loss)."""
    out = []
    for r, a in zip(ratios, advantages, strict=True):
        logp, old, adv, mask = _ratio_case([r], [a])
        loss, _ = policy_loss(logp, old, adv, mask, **kw)
        (grad,) = torch.autograd.grad(loss, logp)
        out.append((loss.item(), grad.item()))
    return out


# --------------------------------------------------------------------------------------------------
# group_advantages
# --------------------------------------------------------------------------------------------------


def test_group_advantages_two_groups_hand_values():
    # interleaved on purpose: a, b, a, a, b, a, b, a
    ids = ["a", "b", "a", "a", "b", "a", "b", "a"]
    rewards = torch.tensor([1.0, 2.0, 0.0, 0.0, 2.0, 1.0, 2.0, 1.0], dtype=torch.float64)
    adv = group_advantages(rewards, ids)
    expected = torch.tensor([A_POS, 0.0, A_NEG, A_NEG, 0.0, A_POS, 0.0, A_POS], dtype=torch.float64)
    torch.testing.assert_close(adv, expected, rtol=0, atol=1e-12)
    assert adv.dtype == torch.float64


def test_group_advantages_float32_keeps_dtype_and_values():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0])
    adv = group_advantages(rewards, [7] * 5)
    assert adv.dtype == torch.float32
    torch.testing.assert_close(adv, torch.tensor([A_POS, A_NEG, A_NEG, A_POS, A_POS]))


def test_group_advantages_uses_unbiased_std_like_torch_std():
    gen = torch.Generator().manual_seed(0)
    n_groups, n = 40, 5
    rewards = torch.rand(n_groups * n, generator=gen, dtype=torch.float64) * 3
    ids = torch.arange(n_groups).repeat_interleave(n)
    perm = torch.randperm(len(rewards), generator=gen)
    rewards, ids = rewards[perm], ids[perm]
    adv = group_advantages(rewards, ids, eps=1e-6)
    expected = torch.empty_like(rewards)
    for g in range(n_groups):
        sel = ids == g
        r = rewards[sel]
        expected[sel] = (r - r.mean()) / (r.std() + 1e-6)  # torch.std is unbiased by default
    torch.testing.assert_close(adv, expected, rtol=1e-12, atol=1e-12)


def test_group_advantages_eps_enters_denominator():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0], dtype=torch.float64)
    adv = group_advantages(rewards, [0] * 5, eps=0.5)
    torch.testing.assert_close(adv[0], torch.tensor(0.4 / (math.sqrt(0.3) + 0.5), dtype=torch.float64))


def test_singleton_group_gets_zero():
    rewards = torch.tensor([5.0, 1.0, 0.0, 3.0])
    adv = group_advantages(rewards, ["solo", "pair", "pair", "other_solo"])
    assert adv[0].item() == 0.0 and adv[3].item() == 0.0
    # the pair [1, 0]: mean 0.5, std sqrt(0.5) -> +-0.5 / (0.70710678 + 1e-6)
    torch.testing.assert_close(adv[1:3], torch.tensor([0.7071058, -0.7071058]), rtol=0, atol=1e-6)


@pytest.mark.parametrize("value", [0.1, 0.7, 1.0 / 3.0, -2.3, 1e6 + 0.1, 0.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_all_equal_group_gets_exactly_zero(value, dtype):
    rewards = torch.full((7,), value, dtype=dtype)
    adv = group_advantages(rewards, ["g"] * 7)
    assert torch.equal(adv, torch.zeros(7, dtype=dtype))


def test_mixed_hashable_ids_strings_tuples_ints():
    ids = [("uid1", "A"), ("uid1", "B"), ("uid1", "A"), "uid1", 3, ("uid1", "B"), "uid1", 3]
    rewards = torch.tensor([1.0, 4.0, 0.0, 2.0, 9.0, 4.0, 5.0, 9.0], dtype=torch.float64)
    adv, stats = group_advantages_and_stats(rewards, ids)
    pair = 0.5 / (math.sqrt(0.5) + 1e-6)  # ("uid1", "A"): rewards [1, 0]
    wide = 1.5 / (math.sqrt(4.5) + 1e-6)  # "uid1": rewards [2, 5], mean 3.5, std sqrt(4.5)
    expected = torch.tensor([pair, 0.0, -pair, -wide, 0.0, 0.0, wide, 0.0], dtype=torch.float64)
    torch.testing.assert_close(adv, expected, rtol=0, atol=1e-12)
    # tuple ("uid1", "A") and string "uid1" are different groups; order of first appearance
    assert stats.keys == (("uid1", "A"), ("uid1", "B"), "uid1", 3)
    assert stats.count.tolist() == [2, 2, 2, 2]


def test_tensor_ids_match_list_ids():
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 30, (200,), generator=gen)
    rewards = torch.randint(0, 3, (200,), generator=gen).double()
    torch.testing.assert_close(group_advantages(rewards, ids), group_advantages(rewards, ids.tolist()))
    assert group_stats(rewards, ids).keys == tuple(sorted(set(ids.tolist())))


def test_permutation_invariance():
    gen = torch.Generator().manual_seed(2)
    ids = [f"q{i // 5}/{'AB'[i % 2]}" for i in range(60)]
    rewards = torch.randint(0, 4, (60,), generator=gen).float() * 0.5
    adv = group_advantages(rewards, ids)
    perm = torch.randperm(60, generator=gen)
    adv_perm = group_advantages(rewards[perm], [ids[i] for i in perm.tolist()])
    torch.testing.assert_close(adv_perm, adv[perm], rtol=0, atol=1e-6)
    assert adv.abs().sum() > 0  # not trivially all zero


def test_group_stats_values_and_degenerate_count():
    ids = ["a", "b", "a", "a", "b", "a", "b", "a", "c"]
    rewards = torch.tensor([1.0, 2.0, 0.0, 0.0, 2.0, 1.0, 2.0, 1.0, 4.0], dtype=torch.float64)
    stats = group_stats(rewards, ids)
    assert stats.keys == ("a", "b", "c")
    assert stats.count.tolist() == [5, 3, 1]
    torch.testing.assert_close(stats.mean, torch.tensor([0.6, 2.0, 4.0], dtype=torch.float64))
    torch.testing.assert_close(stats.std, torch.tensor([math.sqrt(0.3), 0.0, 0.0], dtype=torch.float64))
    assert stats.degenerate.tolist() == [False, True, True]
    assert stats.num_groups == 3 and stats.num_degenerate == 2
    m = stats.metrics()
    assert m["groups_degenerate"] == 2.0 and m["groups_degenerate_frac"] == pytest.approx(2 / 3)
    assert stats.index.tolist() == [0, 1, 0, 0, 1, 0, 1, 0, 2]


def test_group_advantages_empty_and_integer_rewards():
    assert group_advantages(torch.zeros(0), []).shape == (0,)
    adv = group_advantages(torch.tensor([1, 0, 0, 1, 1]), ["x"] * 5)
    assert adv.dtype == torch.get_default_dtype()
    torch.testing.assert_close(adv, torch.tensor([A_POS, A_NEG, A_NEG, A_POS, A_POS]))


def test_group_advantages_input_errors():
    r = torch.ones(3)
    with pytest.raises(ValueError, match="2 group ids for 3 rewards"):
        group_advantages(r, ["a", "b"])
    with pytest.raises(ValueError, match="1-D"):
        group_advantages(torch.ones(2, 3), [0, 1])
    with pytest.raises(TypeError, match="integer dtype"):
        group_advantages(r, torch.tensor([0.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="shape"):
        group_advantages(r, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="nan or inf"):
        group_advantages(torch.tensor([1.0, float("nan"), 0.0]), [0, 0, 0])
    with pytest.raises(ValueError, match=r"eps=0 must be finite and > 0"):
        group_advantages(r, [0, 0, 0], eps=0)
    with pytest.raises(TypeError, match="single string"):
        group_advantages(r, "abc")


# --------------------------------------------------------------------------------------------------
# token_mean
# --------------------------------------------------------------------------------------------------


def test_token_mean_default_and_explicit_denom():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert token_mean(x, mask).item() == pytest.approx(7.0 / 3.0)
    assert token_mean(x, mask.bool()).item() == pytest.approx(7.0 / 3.0)
    assert token_mean(x, mask, denom=10).item() == pytest.approx(0.7)
    assert token_mean(x, mask, denom=torch.tensor(14.0)).item() == pytest.approx(0.5)


def test_token_mean_empty_mask_is_zero_and_ignores_nonfinite_padding():
    x = torch.tensor([[1.0, float("nan"), float("inf")]])
    assert token_mean(x, torch.zeros(1, 3)).item() == 0.0
    assert token_mean(x, torch.tensor([[1.0, 0.0, 0.0]])).item() == 1.0


def test_token_mean_errors():
    with pytest.raises(ValueError, match="shape"):
        token_mean(torch.ones(2, 3), torch.ones(2, 2))
    with pytest.raises(ValueError, match="denom=0 must be finite and > 0"):
        token_mean(torch.ones(2), torch.ones(2), denom=0)


# --------------------------------------------------------------------------------------------------
# logprobs_from_logits
# --------------------------------------------------------------------------------------------------


def _naive_logprobs(logits, labels, temperature=1.0):
    return torch.log_softmax(logits.float() / temperature, dim=-1).gather(-1, labels[..., None]).squeeze(-1)


@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.5])
@pytest.mark.parametrize("chunk_size", [None, 1, 4, 1000])
def test_logprobs_match_naive_fp32(temperature, chunk_size):
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 5, 11, generator=gen) * 4
    labels = torch.randint(0, 11, (3, 5), generator=gen)
    out = logprobs_from_logits(logits, labels, temperature=temperature, chunk_size=chunk_size)
    assert out.shape == (3, 5) and out.dtype == torch.float32
    torch.testing.assert_close(out, _naive_logprobs(logits, labels, temperature), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_logprobs_gradient_matches_naive(temperature):
    gen = torch.Generator().manual_seed(4)
    base = torch.randn(2, 6, 13, generator=gen) * 3
    labels = torch.randint(0, 13, (2, 6), generator=gen)
    weights = torch.randn(2, 6, generator=gen)
    a = base.clone().requires_grad_(True)
    b = base.clone().requires_grad_(True)
    (logprobs_from_logits(a, labels, temperature, chunk_size=5) * weights).sum().backward()
    (_naive_logprobs(b, labels, temperature) * weights).sum().backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)


def test_logprobs_backward_matches_float64_reference():
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(2, 3, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 7, (2, 3), generator=gen)

    # the forward computes in fp32, so check our analytic backward against the fp64 naive gradient
    ours = torch.autograd.grad(logprobs_from_logits(logits, labels, 0.8, chunk_size=2).sum(), logits)[0]
    ref = torch.autograd.grad(
        torch.log_softmax(logits / 0.8, -1).gather(-1, labels[..., None]).sum(), logits, create_graph=False
    )[0]
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    assert ours.dtype == torch.float64


def test_logprobs_bf16_input_computed_in_fp32():
    gen = torch.Generator().manual_seed(6)
    logits = (torch.randn(2, 4, 50, generator=gen) * 5).bfloat16().requires_grad_(True)
    labels = torch.randint(0, 50, (2, 4), generator=gen)
    out = logprobs_from_logits(logits, labels, temperature=0.9, chunk_size=3)
    assert out.dtype == torch.float32
    ref_in = logits.detach().float().requires_grad_(True)
    ref = _naive_logprobs(ref_in, labels, 0.9)
    # same bf16 values, fp32 maths: agreement to fp32 rounding, not bf16 rounding
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-5)
    out.sum().backward()
    ref.sum().backward()
    assert logits.grad.dtype == torch.bfloat16
    torch.testing.assert_close(logits.grad.float(), ref_in.grad, rtol=1e-2, atol=1e-2)


def test_logprobs_autograd_keeps_no_fp32_copy_of_logits():
    logits = torch.randn(2, 8, 64).bfloat16().requires_grad_(True)
    labels = torch.randint(0, 64, (2, 8))
    out = logprobs_from_logits(logits, labels)
    saved = out.grad_fn.saved_tensors
    assert sum(t.numel() for t in saved if t.dtype == torch.float32) <= 2 * 8  # only the per-row logsumexp
    assert any(t.dtype == torch.bfloat16 and t.shape == logits.shape for t in saved)


def test_logprobs_non_contiguous_slice_and_2d_input():
    gen = torch.Generator().manual_seed(7)
    full = torch.randn(3, 6, 9, generator=gen, requires_grad=True)
    sliced = full[:, :-1]  # the usual shift: cannot be flattened into one view
    labels = torch.randint(0, 9, (3, 5), generator=gen)
    out = logprobs_from_logits(sliced, labels, chunk_size=2)
    torch.testing.assert_close(out, _naive_logprobs(sliced, labels))
    out.sum().backward()
    ref_leaf = full.detach().clone().requires_grad_(True)
    _naive_logprobs(ref_leaf[:, :-1], labels).sum().backward()
    torch.testing.assert_close(full.grad, ref_leaf.grad, rtol=1e-5, atol=1e-6)
    flat = torch.randn(4, 9, generator=gen)
    lab = torch.randint(0, 9, (4,), generator=gen)
    torch.testing.assert_close(logprobs_from_logits(flat, lab), _naive_logprobs(flat, lab))


def test_logprobs_input_errors():
    logits = torch.randn(1, 2, 5)
    with pytest.raises(ValueError, match=r"labels must be token ids in \[0, 5\)"):
        logprobs_from_logits(logits, torch.tensor([[0, -100]]))
    with pytest.raises(ValueError, match=r"labels must be token ids in \[0, 5\)"):
        logprobs_from_logits(logits, torch.tensor([[0, 5]]))
    with pytest.raises(ValueError, match="labels shape"):
        logprobs_from_logits(logits, torch.tensor([[0, 1, 2]]))
    with pytest.raises(ValueError, match="temperature=0 must be finite and > 0"):
        logprobs_from_logits(logits, torch.tensor([[0, 1]]), temperature=0)
    with pytest.raises(ValueError, match="chunk_size=0"):
        logprobs_from_logits(logits, torch.tensor([[0, 1]]), chunk_size=0)


# --------------------------------------------------------------------------------------------------
# policy_loss
# --------------------------------------------------------------------------------------------------


def test_policy_loss_inside_clip_range():
    # ratio 1.1, A = 2: loss -2.2, d loss / d logp = -A * ratio = -2.2
    [(loss, grad)] = _per_token_loss([1.1], [2.0])
    assert loss == pytest.approx(-2.2) and grad == pytest.approx(-2.2)
    # ratio 0.9, A = -1: loss 0.9, grad 0.9
    [(loss, grad)] = _per_token_loss([0.9], [-1.0])
    assert loss == pytest.approx(0.9) and grad == pytest.approx(0.9)


def test_policy_loss_clipped_above_for_positive_advantage():
    # ratio 1.5 > 1.28 with A = 1: max(-1.5, -1.28) = -1.28, no gradient
    [(loss, grad)] = _per_token_loss([1.5], [1.0])
    assert loss == pytest.approx(-1.28) and grad == 0.0


def test_policy_loss_clipped_below_for_negative_advantage():
    # ratio 0.5 < 0.8 with A = -1: max(0.5, 0.8) = 0.8, no gradient
    [(loss, grad)] = _per_token_loss([0.5], [-1.0])
    assert loss == pytest.approx(0.8) and grad == 0.0
    # ratio 0.78 with A = -2: max(1.56, 1.6) = 1.6
    [(loss, grad)] = _per_token_loss([0.78], [-2.0])
    assert loss == pytest.approx(1.6) and grad == 0.0


def test_policy_loss_pessimistic_side_is_not_clipped():
    # A > 0 with a small ratio and A < 0 with a large ratio keep the unclipped term and its gradient
    [(l1, g1), (l2, g2)] = _per_token_loss([0.5, 1.5], [1.0, -1.0])
    assert l1 == pytest.approx(-0.5) and g1 == pytest.approx(-0.5)
    assert l2 == pytest.approx(1.5) and g2 == pytest.approx(1.5)


def test_policy_loss_asymmetric_clip():
    # ratio 1.25 with A > 0 is inside [0.8, 1.28]: not clipped (a symmetric 0.2 clip would clip it)
    [(loss, grad)] = _per_token_loss([1.25], [1.0])
    assert loss == pytest.approx(-1.25) and grad == pytest.approx(-1.25)
    [(loss_sym, grad_sym)] = _per_token_loss([1.25], [1.0], clip_low=0.2, clip_high=0.2)
    assert loss_sym == pytest.approx(-1.2) and grad_sym == 0.0
    # ratio 1.3 is above 1.28: clipped
    [(loss, grad)] = _per_token_loss([1.3], [1.0])
    assert loss == pytest.approx(-1.28) and grad == 0.0
    # the low side stays at 0.2: ratio 0.81 with A < 0 is not clipped, 0.79 is
    [(l81, g81), (l79, g79)] = _per_token_loss([0.81, 0.79], [-1.0, -1.0])
    assert l81 == pytest.approx(0.81) and g81 == pytest.approx(0.81)
    assert l79 == pytest.approx(0.8) and g79 == 0.0


def test_policy_loss_batch_token_mean_and_gradients():
    ratios = [1.1, 1.5, 0.5, 1.25, 1.3, 1.5, 0.5]
    advs = [2.0, 1.0, -1.0, 1.0, 1.0, -1.0, 1.0]
    logp, old, adv, mask = _ratio_case(ratios, advs)
    loss, metrics = policy_loss(logp, old, adv, mask)
    per_token = [-2.2, -1.28, 0.8, -1.25, -1.28, 1.5, -0.5]
    assert loss.item() == pytest.approx(sum(per_token) / 7)
    loss.backward()
    expected_grad = torch.tensor([[-2.2], [0.0], [0.0], [-1.25], [0.0], [1.5], [-0.5]], dtype=torch.float64) / 7
    torch.testing.assert_close(logp.grad, expected_grad)
    # three tokens clipped: two high (1.5, 1.3 with A > 0), one low (0.5 with A < 0); the last two tokens
    # are out of range on the pessimistic side, so they are not clipped and do not count
    assert metrics["pg_clipfrac_high"].item() == pytest.approx(2 / 7)
    assert metrics["pg_clipfrac_low"].item() == pytest.approx(1 / 7)
    assert metrics["pg_clipfrac"].item() == pytest.approx(3 / 7)
    assert metrics["ratio_mean"].item() == pytest.approx(sum(ratios) / 7)
    assert metrics["ratio_max"].item() == pytest.approx(1.5)
    assert metrics["approx_kl"].item() == pytest.approx(
        -sum(math.log(r) for r in ratios) / 7, abs=1e-6
    )  # metrics are fp32
    assert metrics["pg_loss"].item() == pytest.approx(loss.item())
    assert all(not v.requires_grad and v.dim() == 0 for v in metrics.values())


def test_policy_loss_gradcheck_away_from_clip_boundaries():
    gen = torch.Generator().manual_seed(8)
    old = torch.randn(3, 4, generator=gen, dtype=torch.float64)
    logp = (old + torch.tensor([0.05, -0.6, 0.5, 0.1], dtype=torch.float64)).requires_grad_(True)
    adv = torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 1, 1]])
    assert torch.autograd.gradcheck(lambda lp: policy_loss(lp, old, adv, mask)[0], (logp,))


def test_policy_loss_advantages_per_row_equal_broadcast_per_token():
    gen = torch.Generator().manual_seed(9)
    logp = torch.randn(3, 4, generator=gen, dtype=torch.float64) * 0.3
    old = torch.randn(3, 4, generator=gen, dtype=torch.float64) * 0.3
    adv = torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64)
    mask = torch.ones(3, 4)
    l_row, _ = policy_loss(logp, old, adv, mask)
    l_tok, _ = policy_loss(logp, old, adv[:, None].expand(3, 4).clone(), mask)
    torch.testing.assert_close(l_row, l_tok)
    with pytest.raises(ValueError, match="advantages shape"):
        policy_loss(logp, old, torch.ones(4), mask)


def test_policy_loss_masking_excludes_padded_tokens():
    # row 0: tokens ratio 1.1 (A=1) then two pads with absurd values; row 1: one token ratio 0.9 (A=-1)
    logp = torch.tensor([[math.log(1.1), 50.0, -80.0], [math.log(0.9), 30.0, 1e4]], dtype=torch.float64)
    logp.requires_grad_(True)
    old = torch.tensor([[0.0, -50.0, 0.0], [0.0, 0.0, float("-inf")]], dtype=torch.float64)
    adv = torch.tensor([1.0, -1.0], dtype=torch.float64)
    mask = torch.tensor([[1, 0, 0], [1, 0, 0]])
    loss, metrics = policy_loss(logp, old, adv, mask)
    assert loss.item() == pytest.approx((-1.1 + 0.9) / 2)
    loss.backward()
    expected = torch.tensor([[-1.1 / 2, 0.0, 0.0], [0.9 / 2, 0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(logp.grad, expected)
    assert metrics["ratio_max"].item() == pytest.approx(1.1)
    assert metrics["pg_clipfrac"].item() == 0.0


def test_policy_loss_denom_gives_full_batch_token_mean_over_micro_batches():
    gen = torch.Generator().manual_seed(10)
    logp = (torch.randn(4, 6, generator=gen, dtype=torch.float64) * 0.3).requires_grad_(True)
    old = torch.randn(4, 6, generator=gen, dtype=torch.float64) * 0.3
    adv = torch.tensor([1.0, -1.0, 0.5, 2.0], dtype=torch.float64)
    lengths = torch.tensor([6, 3, 1, 2])  # micro-batch 1 has 9 tokens, micro-batch 2 has 3
    mask = torch.arange(6)[None, :] < lengths[:, None]

    full, _ = policy_loss(logp, old, adv, mask)
    (g_full,) = torch.autograd.grad(full, logp)

    total_tokens = mask.sum()
    parts = [policy_loss(logp[s], old[s], adv[s], mask[s], denom=total_tokens)[0] for s in (slice(0, 2), slice(2, 4))]
    accumulated = parts[0] + parts[1]
    torch.testing.assert_close(accumulated, full)
    (g_acc,) = torch.autograd.grad(accumulated, logp)
    torch.testing.assert_close(g_acc, g_full)

    # the per-micro-batch mean (no denom) averaged over micro-batches is a different quantity here
    naive = sum(policy_loss(logp[s], old[s], adv[s], mask[s])[0] for s in (slice(0, 2), slice(2, 4))) / 2
    assert abs(naive.item() - full.item()) > 1e-3


def test_policy_loss_argument_errors():
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match=r"clip_low=1.5 must be in \(0, 1\)"):
        policy_loss(x, x, torch.ones(1), torch.ones(1, 2), clip_low=1.5)
    with pytest.raises(ValueError, match="must match"):
        policy_loss(x, torch.zeros(1, 3), torch.ones(1), torch.ones(1, 2))


# --------------------------------------------------------------------------------------------------
# kl_k3
# --------------------------------------------------------------------------------------------------


def test_kl_k3_zero_when_equal():
    x = torch.tensor([[-0.1, -3.0, -12.5], [0.0, -1e-3, -7.0]])
    assert torch.equal(kl_k3(x, x.clone()), torch.zeros_like(x))


def test_kl_k3_hand_values():
    # logp = 0, ref = log 0.5: d = log 0.5, exp(d) - d - 1 = 0.5 + log 2 - 1
    out = kl_k3(
        torch.tensor([0.0, math.log(0.5)], dtype=torch.float64), torch.tensor([math.log(0.5), 0.0], dtype=torch.float64)
    )
    torch.testing.assert_close(out, torch.tensor([0.1931471805599454, 0.3068528194400546], dtype=torch.float64))


def test_kl_k3_gradient_is_one_minus_exp_d():
    logp = torch.tensor([0.0, -1.0, -2.0], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([math.log(0.5), -0.5, -2.0], dtype=torch.float64)
    kl_k3(logp, ref).sum().backward()
    expected = 1.0 - torch.exp(ref - logp.detach())
    torch.testing.assert_close(logp.grad, expected)


def _k3_value_and_grad(logp: list[float], ref: list[float], dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.tensor(logp, dtype=dtype, requires_grad=True)
    out = kl_k3(x, torch.tensor(ref, dtype=dtype))
    out.sum().backward()
    return out.detach(), x.grad


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_kl_k3_value_clamped_at_10_with_zero_gradient(dtype):
    # d = ref - logp; unclamped k3 = exp(d) - d - 1; every token here is past the cap of 10:
    #   d = 2.62:    exp(2.62) - 3.62      = 10.1157  (bf16: d = 2.625, 10.19)
    #   d = 3:       exp(3) - 4            = 16.0855
    #   d = -11.5:   exp(-11.5) + 10.5     = 10.50001
    #   d = -11.99:  exp(-11.99) + 10.99   = 10.99    (logp -0.01, ref -12: the example of the recipe issue)
    #   d = 100 -> clamped to 20: exp(20) - 21 = 4.85e8;  d = -100 -> -20: exp(-20) + 19 = 19.0
    # Each contributes exactly 10.0 and has gradient exactly 0.
    logp = [0.0, 0.0, 0.0, -0.01, 0.0, 0.0]
    ref = [2.62, 3.0, -11.5, -12.0, 100.0, -100.0]
    value, grad = _k3_value_and_grad(logp, ref, dtype)
    assert value.dtype == dtype
    assert value.tolist() == [10.0] * 6
    assert grad.tolist() == [0.0] * 6


def test_kl_k3_just_past_the_cap_on_both_sides():
    # d = 2.62: exp(2.62) - 3.62 = 10.115723585077927; d = -11: exp(-11) + 10 = 10.00001670170079.
    # Both are capped: value 10.0, gradient 0 (unclamped it would be 1 - exp(d) = -12.7357 and 0.9999833).
    value, grad = _k3_value_and_grad([0.0, 0.0], [2.62, -11.0])
    assert value.tolist() == [10.0, 10.0]
    assert grad.tolist() == [0.0, 0.0]


def test_kl_k3_exactly_at_the_cap_keeps_its_gradient_like_torch_clamp():
    # In bf16, d = -11: expm1(-11) = -0.9999833 rounds to -1.0, so k3 = -1 + 11 = 10.0 exactly, ON the cap. The
    # recipe's torch.clamp passes the gradient at the bound itself (only values strictly beyond it get 0), and so
    # does kl_k3: value 10.0, gradient 1 - exp(-11) = 0.9999833, which is 1.0 in bf16.
    value, grad = _k3_value_and_grad([0.0], [-11.0], torch.bfloat16)
    assert value.item() == 10.0
    assert grad.item() == 1.0


def test_kl_k3_recipe_example_token():
    # logp = -0.01, ref = -12: d = -11.99, exp(-11.99) + 10.99 = 10.99 before the cap -> 10.0; gradient 0 (before the
    # cap it was 1 - exp(-11.99) = 0.9999938).
    value, grad = _k3_value_and_grad([-0.01], [-12.0])
    assert value.item() == 10.0 and grad.item() == 0.0


def test_kl_k3_below_the_cap_is_the_closed_form():
    # value exp(d) - d - 1, gradient d/dlogp = 1 - exp(d), d = ref - logp:
    #   d = 2.61:   value 9.989050851830925,  grad -12.599050851830924  (just below the cap, positive side)
    #   d = -10.99: value 9.990016869555674,  grad 0.9999831304443262   (just below the cap, negative side)
    #   d = -5:     value 4.006737946999086,  grad 0.9932620530009145   (negative side)
    value, grad = _k3_value_and_grad([0.0, 0.0, 0.0], [2.61, -10.99, -5.0])
    torch.testing.assert_close(
        value, torch.tensor([9.989050851830925, 9.990016869555674, 4.006737946999086], dtype=torch.float64)
    )
    torch.testing.assert_close(
        grad, torch.tensor([-12.599050851830924, 0.9999831304443262, 0.9932620530009145], dtype=torch.float64)
    )
    assert (value < 10.0).all() and (grad != 0).all()


def test_grpo_loss_uses_the_clamped_kl():
    # Two tokens, advantage 0 (no policy gradient): token 0 has d = -11.99 (k3 capped at 10, gradient 0),
    # token 1 has d = log 0.5 (k3 = 0.5 + log 2 - 1 = 0.1931471805599454, gradient 1 - 0.5 = 0.5).
    # kl_loss = (10 + 0.1931471805599454) / 2 = 5.096573590279973; loss = 0.1 * kl_loss; d loss / d logp =
    # 0.1 * [0, 0.5] / 2 = [0, 0.025].
    logp = torch.tensor([[-0.01, 0.0]], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([[-12.0, math.log(0.5)]], dtype=torch.float64)
    loss, metrics = grpo_loss(logp, logp.detach(), ref, torch.zeros(1, dtype=torch.float64), torch.ones(1, 2), 0.1)
    assert metrics["kl_loss"].item() == pytest.approx(5.096573590279973, abs=1e-12)
    assert loss.item() == pytest.approx(0.5096573590279973, abs=1e-12)
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, 0.025]], dtype=torch.float64))


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.floats(-40, 40, allow_nan=False), min_size=1, max_size=16),
    st.lists(st.floats(-40, 40, allow_nan=False), min_size=1, max_size=16),
    st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
)
def test_kl_k3_non_negative(logps, refs, dtype):
    n = min(len(logps), len(refs))
    out = kl_k3(torch.tensor(logps[:n], dtype=dtype), torch.tensor(refs[:n], dtype=dtype))
    assert (out >= 0).all() and (out <= 10).all() and torch.isfinite(out).all()


# --------------------------------------------------------------------------------------------------
# grpo_loss
# --------------------------------------------------------------------------------------------------


def test_grpo_loss_combines_policy_and_kl():
    gen = torch.Generator().manual_seed(11)
    logp = (torch.randn(3, 5, generator=gen, dtype=torch.float64) * 0.4 - 1).requires_grad_(True)
    old = logp.detach() + torch.randn(3, 5, generator=gen, dtype=torch.float64) * 0.2
    ref = logp.detach() + torch.randn(3, 5, generator=gen, dtype=torch.float64) * 0.5
    adv = torch.tensor([1.0, -1.0, 0.3], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])

    loss, metrics = grpo_loss(logp, old, ref, adv, mask, kl_coef=0.1)
    pg, _ = policy_loss(logp, old, adv, mask)
    d = (ref - logp.detach())[mask.bool()]
    kl_mean = (torch.exp(d) - d - 1).mean()
    torch.testing.assert_close(loss, pg + 0.1 * kl_mean)
    assert metrics["kl_loss"].item() == pytest.approx(kl_mean.item())
    assert metrics["loss"].item() == pytest.approx(loss.item())

    (g,) = torch.autograd.grad(loss, logp)
    (g_pg,) = torch.autograd.grad(pg, logp)
    g_kl = torch.where(mask.bool(), 1 - torch.exp(ref - logp.detach()), 0.0) / mask.sum()
    torch.testing.assert_close(g, g_pg + 0.1 * g_kl)


def test_grpo_loss_default_coef_and_denom():
    logp = torch.tensor([[0.0, 0.0]], dtype=torch.float64)
    ref = torch.tensor([[math.log(0.5), 0.0]], dtype=torch.float64)
    adv = torch.tensor([0.0], dtype=torch.float64)  # policy term 0
    mask = torch.ones(1, 2)
    loss, _ = grpo_loss(logp, logp, ref, adv, mask)  # kl_coef 0.01, token mean over 2 tokens
    assert loss.item() == pytest.approx(0.01 * 0.1931471805599454 / 2)
    loss4, _ = grpo_loss(logp, logp, ref, adv, mask, denom=4)
    assert loss4.item() == pytest.approx(0.01 * 0.1931471805599454 / 4)


def test_grpo_loss_without_reference():
    logp = torch.tensor([[math.log(1.1)]], dtype=torch.float64)
    old = torch.zeros(1, 1, dtype=torch.float64)
    adv = torch.tensor([1.0], dtype=torch.float64)
    mask = torch.ones(1, 1)
    loss, metrics = grpo_loss(logp, old, None, adv, mask, kl_coef=0.0)
    assert loss.item() == pytest.approx(-1.1) and "kl_loss" not in metrics
    # a reference with kl_coef 0 is reported but not added
    loss_r, metrics_r = grpo_loss(logp, old, torch.full((1, 1), -5.0, dtype=torch.float64), adv, mask, kl_coef=0.0)
    assert loss_r.item() == pytest.approx(-1.1) and metrics_r["kl_loss"].item() > 0
    with pytest.raises(ValueError, match="kl_coef=0.01 > 0 needs ref_logp"):
        grpo_loss(logp, old, None, adv, mask)
    with pytest.raises(ValueError, match="kl_coef=-0.1 must be finite and >= 0"):
        grpo_loss(logp, old, None, adv, mask, kl_coef=-0.1)


# --------------------------------------------------------------------------------------------------
# GRPOLossConfig
# --------------------------------------------------------------------------------------------------


def test_config_defaults_are_the_recipe():
    cfg = GRPOLossConfig()
    assert (cfg.clip_low, cfg.clip_high, cfg.kl_coef, cfg.eps) == (0.2, 0.28, 0.01, 1e-6)
    assert cfg.uses_reference and not GRPOLossConfig(kl_coef=0).uses_reference
    assert cfg.loss_kwargs() == {"kl_coef": 0.01, "clip_low": 0.2, "clip_high": 0.28}
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.kl_coef = 0.1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("kwargs", "exc", "message"),
    [
        ({"clip_low": 1.5}, ValueError, r"clip_low=1.5 must be in \(0, 1\)"),
        ({"clip_low": 0.0}, ValueError, r"clip_low=0.0 must be in \(0, 1\)"),
        ({"clip_low": float("nan")}, ValueError, r"clip_low=nan must be in \(0, 1\)"),
        ({"clip_high": 0}, ValueError, r"clip_high=0 must be finite and > 0"),
        ({"clip_high": float("inf")}, ValueError, r"clip_high=inf must be finite and > 0"),
        ({"kl_coef": -0.5}, ValueError, r"kl_coef=-0.5 must be finite and >= 0"),
        ({"eps": 0.0}, ValueError, r"eps=0.0 must be finite and > 0"),
        ({"eps": -1e-6}, ValueError, r"eps=-1e-06 must be finite and > 0"),
        ({"kl_coef": "0.1"}, TypeError, r"kl_coef='0.1' must be a real number"),
        ({"clip_low": True}, TypeError, r"clip_low=True must be a real number"),
    ],
)
def test_config_validation_messages(kwargs, exc, message):
    with pytest.raises(exc, match=message):
        GRPOLossConfig(**kwargs)


def test_config_drives_grpo_loss():
    cfg = GRPOLossConfig(clip_low=0.1, clip_high=0.1, kl_coef=0.0)
    logp, old, adv, mask = _ratio_case([1.15], [1.0])
    loss, _ = grpo_loss(logp, old, None, adv, mask, **cfg.loss_kwargs())
    assert loss.item() == pytest.approx(-1.1)


# ----------------------------------------------------------------------------- off-policy correction


def test_truncated_is_weights_by_hand():
    from ivgr_dist.learner.grpo import truncated_is_weights

    prox = torch.tensor([[-1.0, -2.0, -0.5, -30.0]])
    behav = torch.tensor([[-1.0, -3.0, -0.1, -0.01]])
    w = truncated_is_weights(prox, behav, cap=2.0)
    # exp(0) = 1; exp(1) = 2.718 -> capped at 2; exp(-0.4) = 0.670; exp(-29.99) clamped at exp(-20)
    torch.testing.assert_close(w, torch.tensor([[1.0, 2.0, math.exp(-0.4), math.exp(-20.0)]]))
    assert not w.requires_grad
    huge = truncated_is_weights(torch.tensor([0.0]), torch.tensor([-1e4]), cap=1e9)
    assert torch.isfinite(huge).all() and huge.item() == pytest.approx(math.exp(20.0))  # clamped before exp
    with pytest.raises(ValueError, match="cap=0"):
        truncated_is_weights(prox, behav, cap=0)
    with pytest.raises(ValueError, match="must match"):
        truncated_is_weights(prox, behav[:, :2], cap=2.0)


def test_policy_loss_weights_each_tokens_surrogate_and_reports_the_weights():
    from ivgr_dist.learner.grpo import policy_loss

    logp = torch.tensor([[-1.0, -1.0, -1.0]], requires_grad=True)
    old = torch.tensor([[-1.0, -1.0, -1.0]])  # ratio 1: surrogate per token = -A
    adv = torch.tensor([[1.0, -2.0, 3.0]])
    mask = torch.tensor([[True, True, False]])
    w = torch.tensor([[2.0, 0.5, 7.0]])
    loss, m = policy_loss(logp, old, adv, mask, is_weights=w, is_cap=2.0)
    # (-1 * 2.0 + 2 * 0.5) / 2 tokens = -0.5; the masked token (weight 7) plays no part
    assert loss.item() == pytest.approx(-0.5)
    loss.backward()
    # d/dlogp of -A * w * exp(logp - old) at ratio 1 = -A * w / 2 tokens
    torch.testing.assert_close(logp.grad, torch.tensor([[-1.0, 0.5, 0.0]]))
    assert m["is_weight_mean"].item() == pytest.approx(1.25)
    assert m["is_clip_frac"].item() == pytest.approx(0.5)  # one of two tokens at the cap
    assert m["is_ess"].item() == pytest.approx((2.5**2) / (2 * (4 + 0.25)))
    plain, m0 = policy_loss(logp.detach(), old, adv, mask)
    assert plain.item() == pytest.approx(0.5) and "is_weight_mean" not in m0
    ones, m1 = policy_loss(logp.detach(), old, adv, mask, is_weights=torch.ones(1, 3), is_cap=2.0)
    assert ones.item() == pytest.approx(plain.item()) and m1["is_ess"].item() == pytest.approx(1.0)
