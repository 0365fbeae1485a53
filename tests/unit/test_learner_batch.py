"""Learner batching without Ray or process groups: micro-batching, collate alignment, the encoder
against the real Qwen2.5-VL processor, the masked dummy image, name mapping and sharding helpers."""

from __future__ import annotations

import random

import pytest
import torch
from PIL import Image, ImageDraw

from ivgr_dist.config import DataConfig
from ivgr_dist.data.prompts import PromptBuilder
from ivgr_dist.learner.batch import (
    LearnerSample,
    SampleEncoder,
    append_dummy_image,
    collate,
    make_micro_batches,
    padding_ratio,
)
from ivgr_dist.learner.worker import lr_factor, resolve_attn_implementation, warmup_factor
from ivgr_dist.types import Rollout

PAD = 0


def _sample(n_prompt: int, n_resp: int, adv: float = 1.0, key: str = "g", logprobs: bool = True) -> LearnerSample:
    ids = list(range(100, 100 + n_prompt)) + list(range(500, 500 + n_resp))
    lp = [-(k + 1) / 10 for k in range(n_resp)] if logprobs else None
    return LearnerSample(ids, n_prompt, None, None, adv, old_logprobs=lp, ref_logprobs=lp, group_key=key)


# ---------------------------------------------------------------------------------- micro-batches


def test_micro_batches_respect_the_budget_and_cover_every_sample_once():
    rng = random.Random(0)
    samples = [_sample(rng.randint(1, 40), rng.randint(0, 40)) for _ in range(60)]
    batches = make_micro_batches(samples, token_budget=128)
    assert sorted(i for b in batches for i in b) == list(range(60))
    for b in batches:
        longest = max(samples[i].num_tokens for i in b)
        assert len(b) * longest <= 128
    # sorting by length keeps padding small on this spread of lengths
    assert padding_ratio(samples, batches) < 0.1


def test_an_over_budget_sample_gets_its_own_micro_batch():
    samples = [_sample(5, 5), _sample(100, 100), _sample(4, 4)]
    batches = make_micro_batches(samples, token_budget=50)
    assert [1] in batches
    assert sorted(i for b in batches for i in b) == [0, 1, 2]
    with pytest.raises(ValueError, match="token_budget"):
        make_micro_batches(samples, 0)


def test_padding_ratio_counts_padded_slots():
    samples = [_sample(2, 2), _sample(4, 4)]  # lengths 4 and 8 in one batch: 16 slots, 12 real
    assert padding_ratio(samples, [[0, 1]]) == pytest.approx(0.25)
    assert padding_ratio(samples, [[0], [1]]) == 0.0


# ---------------------------------------------------------------------------------------- collate


def test_collate_aligns_every_per_token_field_with_the_label_positions():
    a, b = _sample(3, 4, adv=0.5), _sample(5, 2, adv=-2.0)
    batch = collate([a, b], pad_id=PAD)
    assert batch["input_ids"].shape == (2, 7) and batch["labels"].shape == (2, 6)
    assert batch["attention_mask"].sum(1).tolist() == [7, 7]
    assert torch.equal(batch["labels"], batch["input_ids"][:, 1:])
    for row, s in enumerate((a, b)):
        cols = batch["response_mask"][row].nonzero().flatten().tolist()
        # label column t holds input_ids[t + 1]: exactly the response tokens
        assert [batch["labels"][row, t].item() for t in cols] == s.input_ids[s.prompt_len :]
        assert batch["old_logprobs"][row, cols].tolist() == pytest.approx(s.old_logprobs)
        assert batch["ref_logprobs"][row, cols].tolist() == pytest.approx(s.ref_logprobs)
        assert batch["advantages"][row, cols].tolist() == pytest.approx([s.advantage] * s.response_len)
        off = ~batch["response_mask"][row]
        assert (batch["advantages"][row][off] == 0).all() and (batch["old_logprobs"][row][off] == 0).all()
    assert batch["pixel_values"] is None and batch["image_grid_thw"] is None


def test_collate_pads_right_and_concatenates_images_in_row_order():
    img_a = LearnerSample([1, 9, 9, 2, 3], 4, torch.ones(8, 6), torch.tensor([[1, 2, 4]]), 1.0)
    text = LearnerSample([1, 2, 3], 2, None, None, 1.0)
    img_b = LearnerSample([1, 9, 2, 3, 4, 5], 3, torch.full((4, 6), 2.0), torch.tensor([[1, 2, 2]]), 1.0)
    batch = collate([img_a, text, img_b], pad_id=PAD, image_token_id=9)
    assert batch["input_ids"][1].tolist() == [1, 2, 3, PAD, PAD, PAD]
    assert batch["attention_mask"][1].tolist() == [1, 1, 1, 0, 0, 0]
    assert batch["pixel_values"][:8].eq(1).all() and batch["pixel_values"][8:].eq(2).all()
    assert batch["image_grid_thw"].tolist() == [[1, 2, 4], [1, 2, 2]]
    assert torch.equal(batch["mm_token_type_ids"], (batch["input_ids"] == 9).long())
    assert batch["old_logprobs"] is None and batch["ref_logprobs"] is None


def test_collate_rejects_mixed_logprobs_and_samples_check_their_lengths():
    with pytest.raises(ValueError, match="old_logprobs is set on some"):
        collate([_sample(2, 2), _sample(2, 2, logprobs=False)], pad_id=PAD)
    with pytest.raises(ValueError, match="old_logprobs has 1 entries for a response of 2"):
        LearnerSample([1, 2, 3, 4], 2, None, None, 0.0, old_logprobs=[0.0])
    with pytest.raises(ValueError, match="prompt_len"):
        LearnerSample([1, 2], 0, None, None, 0.0)


def test_dummy_image_is_masked_out_and_widens_every_field():
    batch = collate([_sample(3, 2), _sample(2, 1)], pad_id=PAD, image_token_id=9)
    out = append_dummy_image(batch, PAD, image_token_id=9, patch_dim=6, merge_size=2)
    assert out["input_ids"].shape == (2, 6) and out["input_ids"][-1, -1] == 9
    assert out["attention_mask"][:, -1].tolist() == [0, 0]
    assert out["response_mask"].sum() == batch["response_mask"].sum() and not out["response_mask"][:, -1].any()
    assert out["pixel_values"].shape == (4, 6) and out["image_grid_thw"].tolist() == [[1, 2, 2]]
    assert out["mm_token_type_ids"][-1, -1] == 1 and out["old_logprobs"].shape == (2, 5)
    with pytest.raises(ValueError, match="without images"):
        append_dummy_image(out, PAD, 9, 6, 2)


# ------------------------------------------------------------------------- with the tiny model


def _draw(size, color):
    img = Image.new("RGB", size, "white")
    ImageDraw.Draw(img).ellipse((4, 4, size[0] // 2, size[1] // 2), fill=color)
    return img


@pytest.fixture(scope="module")
def encoder(tiny_model_dir):
    return SampleEncoder(tiny_model_dir)


def _prompt(tmp_path, encoder, sizes):
    names = []
    for k, size in enumerate(sizes):
        _draw(size, "red").save(tmp_path / f"im{k}.png")
        names.append(f"im{k}.png")
    record = {"problem": "<image>" * len(sizes) + "What color?", "answer": "red", "images": names}
    return PromptBuilder(encoder.processor.tokenizer, DataConfig()).build(record, 7, "textual", tmp_path)


@pytest.mark.parametrize("sizes", [[(112, 112)], [(150, 110), (60, 90)], []])
def test_encode_matches_the_real_processor(tmp_path, encoder, sizes):
    prompt = _prompt(tmp_path, encoder, sizes)
    rollout = Rollout(prompt, 0, [11, 12, 13], "x", [-0.1, -0.2, -0.3], 0, advantage=0.75)
    sample = encoder.encode(rollout)
    want = encoder.processor(text=[prompt.prompt_text], images=prompt.images or None, return_tensors="pt")
    assert sample.input_ids[: sample.prompt_len] == want["input_ids"][0].tolist()
    assert sample.prompt_len == prompt.num_prompt_tokens
    assert sample.input_ids[sample.prompt_len :] == [11, 12, 13]
    assert sample.advantage == 0.75 and sample.group_key == "7:textual" and sample.old_logprobs is None
    if sizes:
        assert torch.equal(sample.pixel_values, want["pixel_values"])
        assert torch.equal(sample.image_grid_thw, want["image_grid_thw"])
    else:
        assert sample.pixel_values is None and sample.image_grid_thw is None
    assert encoder.encode(rollout, use_sampler_logprobs=True).old_logprobs == pytest.approx([-0.1, -0.2, -0.3])


def test_encode_refuses_a_token_count_the_processor_does_not_reproduce(tmp_path, encoder):
    prompt = _prompt(tmp_path, encoder, [(112, 112)])
    prompt.num_prompt_tokens += 3
    with pytest.raises(ValueError, match="num_prompt_tokens"):
        encoder.encode(Rollout(prompt, 0, [11], "x", [-0.1], 0))
    prompt.images = []
    with pytest.raises(ValueError, match="placeholder per image"):
        encoder.encode(Rollout(prompt, 0, [11], "x", [-0.1], 0))


def test_dummy_image_leaves_the_logits_of_real_tokens_unchanged(tiny_model_dir):
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    cfg = model.config
    batch = collate([_sample(3, 4), _sample(6, 2)], pad_id=PAD, image_token_id=cfg.image_token_id)
    vc = cfg.vision_config
    patch_dim = vc.in_channels * vc.temporal_patch_size * vc.patch_size**2
    dummy = append_dummy_image(batch, PAD, cfg.image_token_id, patch_dim, vc.spatial_merge_size)
    keys = ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw")
    with torch.no_grad():
        plain = model(**{k: batch[k] for k in keys[:3]}).logits
        with_dummy = model(**{k: dummy[k] for k in keys}).logits
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(with_dummy[:, :-1][real], plain[real], rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------ small helpers


@pytest.mark.parametrize("have_flash", [False, True])
def test_attn_implementation_auto_picks_flash_only_with_cuda_and_the_package(monkeypatch, have_flash):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda n: object() if n == "flash_attn" and have_flash else real(n) if n != "flash_attn" else None,
    )
    assert resolve_attn_implementation("auto", cuda=False) == "sdpa"
    assert resolve_attn_implementation("auto", cuda=True) == ("flash_attention_2" if have_flash else "sdpa")
    assert resolve_attn_implementation("sdpa", cuda=True) == "sdpa"
    if have_flash:
        assert resolve_attn_implementation("flash_attention_2", cuda=True) == "flash_attention_2"
    else:
        with pytest.raises(ValueError, match="flash_attn package is not installed"):
            resolve_attn_implementation("flash_attention_2", cuda=True)
    with pytest.raises(ValueError, match="no CUDA device"):
        resolve_attn_implementation("flash_attention_2", cuda=False)


def test_warmup_is_linear_then_flat():
    assert [warmup_factor(s, 4) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert warmup_factor(0, 0) == 1.0


def test_lr_factor_warmup_then_cosine_to_the_floor():
    assert [lr_factor(s, 2, 10, "constant") for s in (0, 1, 5, 9)] == [0.5, 1.0, 1.0, 1.0]
    cos = [lr_factor(s, 2, 10, "cosine", 0.1) for s in range(12)]
    assert cos[:3] == [0.5, 1.0, 1.0]  # warm-up, then the decay starts at 1
    assert cos[6] == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the decay span
    assert cos[10] == pytest.approx(0.1) and cos[11] == pytest.approx(0.1)  # floor, also past the end
    assert all(a >= b for a, b in zip(cos[2:-1], cos[3:], strict=True))
    with pytest.raises(ValueError, match="schedule='linear'"):
        lr_factor(5, 2, 10, "linear")
