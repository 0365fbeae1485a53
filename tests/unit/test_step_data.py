"""The learner's input path without Ray: StepBatch (images once per record, arrays), placement over ranks,
packed rows and the attention that keeps packed sequences apart."""

from __future__ import annotations

import pickle
import types

import numpy as np
import pytest
import torch
from PIL import Image

from ivgr_dist.learner.batch import LearnerSample, pack, packed_sdpa_attention, plan_packs, response_fields
from ivgr_dist.learner.step_data import StepBatch, place
from ivgr_dist.types import Prompt, Rollout

PAD = 9  # image placeholder id in these hand-made prompts


def _rollouts(records: int, n: int, streams=("grounded", "textual"), side: int = 224, resp: int = 40) -> list[Rollout]:
    out = []
    for r in range(records):
        # each stream builds its own PIL object of the same resized image, as the data pipeline may
        image = np.full((side, side, 3), r % 255, dtype=np.uint8)
        for s in streams:
            prompt = Prompt(
                r, s, "", [1, PAD, 2, 3], 3 + (side // 28) ** 2, "a", "exact", "t", [Image.fromarray(image)]
            )
            for k in range(n):
                ids = [(r * 7 + k + t) % 400 + 20 for t in range(resp)]
                out.append(Rollout(prompt, k, ids, "", [-0.5] * resp, 0, advantage=k - n / 2))
    return out


def test_images_travel_once_per_record_whatever_n_and_the_streams():
    """The serialized learner input of a step grows with the number of records, not with n: going from 1 to
    5 rollouts per prompt adds only the extra responses' token ids, log-probs and advantages."""
    sizes = {}
    for records in (4, 8):
        for n in (1, 5):
            batch = StepBatch.from_rollouts(_rollouts(records, n))
            assert (
                len(batch.images) == records and len(batch.prompt_ids) == 2 * records and len(batch) == 2 * records * n
            )
            sizes[records, n] = len(pickle.dumps(batch, protocol=5))
    image = 224 * 224 * 3
    per_extra_rollout = 40 * (4 + 4) + 4 + 8 + 4  # response ids + log-probs, advantage, offset, prompt index
    for records in (4, 8):
        extra = sizes[records, 5] - sizes[records, 1]
        assert extra <= 2 * records * 4 * per_extra_rollout * 1.1, extra
        assert extra < image  # four more rollouts of every prompt add less than ONE image's bytes
    assert sizes[8, 5] == pytest.approx(2 * sizes[4, 5], rel=0.02)  # linear in records
    assert sizes[4, 5] > 4 * image  # ... and the images are what it is made of


def test_from_rollouts_keeps_every_sample_and_select_carries_only_what_it_uses():
    rollouts = _rollouts(3, 2)
    batch = StepBatch.from_rollouts(rollouts)
    for i, r in enumerate(rollouts):
        assert batch.response(i).tolist() == r.response_ids
        assert batch.behaviour(i).tolist() == pytest.approx(r.logprobs)
        assert batch.advantages[i] == r.advantage and batch.group_key(i) == r.group_key
        assert batch.prompt_ids[batch.sample_prompt[i]].tolist() == r.prompt.prompt_token_ids
    sub = batch.select([5, 0])  # record 1 textual, record 0 grounded
    assert sub.images.keys() == {"1/0", "0/0"} and len(sub.prompt_ids) == 2
    assert sub.response(0).tolist() == rollouts[5].response_ids and sub.group_key(1) == "0:grounded"
    assert sub.nbytes() < batch.nbytes()


def test_a_record_whose_streams_disagree_on_the_image_size_is_refused():
    a, b = _rollouts(1, 1, side=224), _rollouts(1, 1, side=112)
    with pytest.raises(ValueError, match="must show the same resized image"):
        StepBatch.from_rollouts([a[0], b[1]])


def test_place_keeps_records_whole_per_mini_batch_and_balances_tokens():
    batch = StepBatch.from_rollouts(_rollouts(8, 3))
    minis = [list(range(0, 24)), list(range(24, 48))]
    per_rank = place(batch, minis, 2)
    for m, mb in enumerate(minis):
        assert sorted(per_rank[0][m] + per_rank[1][m]) == mb
        for r in range(2):
            records = {batch.record(i) for i in per_rank[r][m]}
            assert not records & {batch.record(i) for i in per_rank[1 - r][m]}  # whole records
        loads = [int(batch.num_tokens()[per_rank[r][m]].sum()) for r in range(2)]
        assert loads[0] == loads[1]  # 4 equal records a mini-batch: 2 each
    # fewer records than ranks: groups, then single samples, so no rank idles
    one = StepBatch.from_rollouts(_rollouts(1, 2))
    assert [len(r[0]) for r in place(one, [list(range(4))], 2)] == [2, 2]
    assert [len(r[0]) for r in place(one, [[0, 1, 2]], 3)] == [1, 1, 1]


def test_plan_packs_fill_the_budget_and_keep_every_index_once():
    lengths = [90, 10, 60, 40, 200, 30, 70]
    packs = plan_packs(lengths, 100)
    assert sorted(i for p in packs for i in p) == list(range(len(lengths)))
    assert [4] in packs  # longer than the budget: alone
    assert all(sum(lengths[i] for i in p) <= 100 for p in packs if p != [4])
    assert packs == [[4], [0, 1], [5, 6], [2, 3]]  # 200 | 90+10 | 70+30 | 60+40: first fit, longest first
    with pytest.raises(ValueError, match="token_budget"):
        plan_packs(lengths, 0)


def _sample(prompt, response, adv=1.0, image=False):
    ids = list(range(100, 100 + prompt)) + list(range(500, 500 + response))
    pv = torch.ones(4, 6) if image else None
    grid = torch.tensor([[1, 2, 2]]) if image else None
    return LearnerSample(ids, prompt, pv, grid, adv, old_logprobs=[-0.1] * response, ref_logprobs=[-0.2] * response)


def test_pack_lays_sequences_back_to_back_with_restarting_positions():
    samples = [_sample(3, 2, adv=0.5), _sample(2, 3, adv=-1.0)]
    p = pack(samples, lambda s: torch.arange(s.num_tokens)[None].expand(3, -1) + 100)
    assert p["input_ids"].tolist() == [samples[0].input_ids + samples[1].input_ids]
    assert p["position_ids"].shape == (4, 1, 10)
    assert p["position_ids"][0, 0].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4]  # text positions restart
    assert p["position_ids"][1, 0, :2].tolist() == [100, 101]
    # the logits at these row positions predict the response tokens, in sample order
    assert p["keep"].tolist() == [2, 3, 6, 7, 8]
    assert [p["input_ids"][0, k + 1].item() for k in p["keep"].tolist()] == [500, 501, 500, 501, 502]
    fields = response_fields(samples)
    assert fields["labels"].tolist() == [[500, 501, 500, 501, 502]]
    assert fields["advantages"].tolist() == [[0.5, 0.5, -1.0, -1.0, -1.0]]
    assert fields["mask"].all() and fields["old_logprobs"].shape == (1, 5)
    assert p["slots"] == p["real"] == 10 and p["pixel_values"] is None


def test_pack_appends_a_separate_dummy_image_sequence_and_handles_an_empty_response():
    samples = [_sample(2, 0)]
    p = pack(samples, lambda s: torch.zeros(3, s.num_tokens, dtype=torch.long), dummy_image=(PAD, 6, 2))
    assert p["input_ids"].tolist() == [[100, 101, PAD]]
    assert p["position_ids"][0, 0].tolist() == [0, 1, 0]  # its own sequence
    assert p["pixel_values"].shape == (4, 6) and p["image_grid_thw"].tolist() == [[1, 2, 2]]
    assert p["slots"] == 3 and p["real"] == 2
    fields = response_fields(samples)
    assert p["keep"].numel() == fields["labels"].numel() == 1 and not fields["mask"].any()
    with_image = pack(
        [_sample(2, 1, image=True)], lambda s: torch.zeros(3, s.num_tokens, dtype=torch.long), (PAD, 6, 2)
    )
    assert with_image["input_ids"].shape == (1, 3)  # it has an image: no dummy


@pytest.mark.parametrize("kv_heads", [1, 2])
def test_packed_sdpa_equals_causal_attention_within_each_sequence(kv_heads):
    torch.manual_seed(0)
    lengths = [5, 1, 7, 3]
    t, heads, dim = sum(lengths), 4, 16
    q = torch.randn(1, heads, t, dim)
    k, v = torch.randn(1, kv_heads, t, dim), torch.randn(1, kv_heads, t, dim)
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    module = types.SimpleNamespace(is_causal=True, num_key_value_groups=heads // kv_heads)
    out, _ = packed_sdpa_attention(module, q, k, v, None, position_ids=positions, scaling=dim**-0.5)
    # reference: one dense block-diagonal causal mask over the whole row
    seq = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    mask = (seq[:, None] == seq[None, :]) & torch.ones(t, t, dtype=torch.bool).tril()
    kr, vr = k.repeat_interleave(heads // kv_heads, 1), v.repeat_interleave(heads // kv_heads, 1)
    want = torch.nn.functional.scaled_dot_product_attention(q, kr, vr, attn_mask=mask, scale=dim**-0.5)
    torch.testing.assert_close(out, want.transpose(1, 2), rtol=1e-5, atol=1e-6)
    # a row that is one sequence, or calls without positions (the vision tower), are plain SDPA
    one, _ = packed_sdpa_attention(module, q, k, v, None, position_ids=torch.arange(t)[None], scaling=dim**-0.5)
    dense = torch.nn.functional.scaled_dot_product_attention(q, kr, vr, is_causal=True, scale=dim**-0.5)
    torch.testing.assert_close(one, dense.transpose(1, 2), rtol=1e-5, atol=1e-6)
