"""Learner samples and micro-batches: packed (no padding) or padded rectangles.

* :class:`LearnerSample` is what the learner trains on: the full token sequence (prompt with every
  ``<|image_pad|>`` expanded to its image tokens, then the response), the image patches the HF
  image processor makes (shared by every sample of a prompt, not copied), the advantage, and
  old/reference/behaviour log-probs per response token.
* :class:`SampleEncoder` runs on the learner ranks: it turns a :class:`~ivgr_dist.learner.step_data.StepBatch`
  (images once per record, token ids as arrays) into samples, encoding each image once. It checks the
  expanded prompt length against ``Prompt.num_prompt_tokens`` (what the data pipeline and the rollout
  engine counted), so a processor that resizes images differently from the pipeline fails loudly instead
  of training on misaligned tokens.
* Packed micro-batches (``learner.pack_sequences``, the default): :func:`plan_packs` fills each
  micro-batch up to a token budget (first fit, longest first) and :func:`pack` lays its samples back to
  back in ONE row with per-sequence positions (text positions restart at 0 for every sequence, the
  model's 3-D rotary positions per sequence), so nothing is padded. transformers reads the restarts: the
  FlashAttention-2 path turns them into ``cu_seqlens`` (varlen kernels), and :func:`packed_sdpa_attention`
  runs SDPA causally within each sequence on CPU (exact: no token attends across sequences).
* Padded micro-batches (``pack_sequences=false``): :func:`make_micro_batches` (rows x longest length
  within the budget, sorted by length) and :func:`collate` (right padding); :func:`padding_ratio`
  reports their waste. Kept for comparison and for attention kernels that need rectangles.
* Both give the learner the same flat layout: one entry per response token, in sample order
  (:func:`response_fields`): labels, advantages, old/reference log-probs and a mask.
* :func:`append_dummy_image` gives an image-free micro-batch one masked-out image token, so the
  vision tower runs on every rank (see its docstring for why FSDP needs that).

Videos are not supported (iVGR trains on images).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ivgr_dist.learner.step_data import StepBatch
from ivgr_dist.types import Rollout

__all__ = [
    "IMAGE_PAD",
    "PACKED_SDPA",
    "LearnerSample",
    "SampleEncoder",
    "append_dummy_image",
    "collate",
    "make_micro_batches",
    "pack",
    "packed_sdpa_attention",
    "padding_ratio",
    "plan_packs",
    "response_fields",
]

IMAGE_PAD = "<|image_pad|>"
"""The per-image placeholder the chat template writes (the processor expands it)."""


@dataclass
class LearnerSample:
    """One rollout as the learner sees it (all token counts include expanded image tokens)."""

    input_ids: list[int]
    """Prompt (image pads expanded) followed by the response ids."""
    prompt_len: int
    """Number of prompt tokens at the start of ``input_ids``."""
    pixel_values: Tensor | None
    """``[patches, C*T*P*P]`` float32 as the HF image processor returns; ``None`` without images."""
    image_grid_thw: Tensor | None
    """``[n_images, 3]`` long (temporal, height, width patch counts); ``None`` without images."""
    advantage: float
    """GRPO advantage, broadcast to every response token."""
    old_logprobs: list[float] | None = None
    """Behaviour-policy log-prob per response token; ``None``: on-policy (ratio 1)."""
    ref_logprobs: list[float] | None = None
    """Reference-policy log-prob per response token (needed when the KL coefficient is > 0)."""
    group_key: str = ""
    """GRPO group (``<original_idx>:<stream>``); the learner group keeps groups on one rank."""
    behaviour_logprobs: Sequence[float] | None = None
    """The rollout engine's sampled log-prob per response token (``None`` for SFT targets)."""
    prompt_cache: dict | None = None
    """Shared by the samples of one prompt: per-step caches of prompt-only work (rotary positions)."""

    def __post_init__(self) -> None:
        if not 0 < self.prompt_len <= len(self.input_ids):
            raise ValueError(f"prompt_len={self.prompt_len} must be in [1, len(input_ids)={len(self.input_ids)}]")
        for name in ("old_logprobs", "ref_logprobs"):
            value = getattr(self, name)
            if value is not None and len(value) != self.response_len:
                raise ValueError(f"{name} has {len(value)} entries for a response of {self.response_len} tokens")
        if (self.pixel_values is None) != (self.image_grid_thw is None):
            raise ValueError("pixel_values and image_grid_thw must both be set or both be None")

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def response_len(self) -> int:
        return len(self.input_ids) - self.prompt_len


class SampleEncoder:
    """Loads the model directory's processor once; turns a :class:`~ivgr_dist.learner.step_data.StepBatch`
    into :class:`LearnerSample` objects (:meth:`samples`; runs on the learner ranks)."""

    def __init__(self, model_dir: str | Path):
        from transformers import AutoProcessor

        self.processor = AutoProcessor.from_pretrained(str(model_dir))
        tok = self.processor.tokenizer
        self.image_pad_id = tok.convert_tokens_to_ids(IMAGE_PAD)
        if self.image_pad_id is None or self.image_pad_id == tok.unk_token_id:
            raise ValueError(f"the tokenizer of {model_dir} has no {IMAGE_PAD} token")
        self.merge_size = int(self.processor.image_processor.merge_size)

    def image_inputs(self, images: Sequence) -> tuple[Tensor, Tensor]:
        """``(pixel_values, image_grid_thw)`` of the images, exactly as the HF processor makes them."""
        out = self.processor.image_processor(images=list(images), return_tensors="pt")
        return out["pixel_values"].to(torch.float32), out["image_grid_thw"].to(torch.long)

    def samples(self, batch: StepBatch, use_sampler_logprobs: bool = False) -> list[LearnerSample]:
        """The batch's samples. Each image is encoded once and each prompt expanded once; the samples of a
        prompt share its pixel values (the same tensor object, no copy).

        ``old_logprobs`` stays ``None`` unless ``use_sampler_logprobs`` (then it is the rollout engine's
        log-probs): the recipe recomputes the old log-probs with the learner, so numeric differences between
        engine and learner do not bias the ratio. ``behaviour_logprobs`` always carries the engine's.
        """
        # (arrays from Ray's object store are read-only views; the processor wants to own its input)
        encoded = {
            key: self.image_inputs([img if img.flags.writeable else img.copy()]) for key, img in batch.images.items()
        }
        prompts = []
        for j, ids in enumerate(batch.prompt_ids):
            keys, uid = batch.prompt_images[j], batch.prompt_uids[j]
            ids = ids.tolist()
            n_pads = ids.count(self.image_pad_id)
            if n_pads != len(keys):
                raise ValueError(
                    f"prompt {uid}: {n_pads} {IMAGE_PAD} tokens for {len(keys)} image(s); "
                    "prompt_token_ids must hold one unexpanded placeholder per image"
                )
            pixel_values = grid = None
            if keys:
                pixel_values = torch.cat([encoded[k][0] for k in keys]) if len(keys) > 1 else encoded[keys[0]][0]
                grid = torch.cat([encoded[k][1] for k in keys])
                counts = iter((grid.prod(-1) // self.merge_size**2).tolist())
                ids = [x for t in ids for x in ([t] * next(counts) if t == self.image_pad_id else [t])]
            if len(ids) != batch.prompt_tokens[j]:
                raise ValueError(
                    f"prompt {uid}: expanding the image placeholders gives {len(ids)} prompt tokens but the "
                    f"prompt says num_prompt_tokens={batch.prompt_tokens[j]}; the processor resizes images "
                    "differently from the data pipeline (check the pixel bounds in the model's processor config)"
                )
            prompts.append((ids, pixel_values, grid, {}))
        out = []
        for i in range(len(batch)):
            ids, pixel_values, grid, cache = prompts[batch.sample_prompt[i]]
            response = batch.response(i).tolist()
            if self.image_pad_id in response:
                raise ValueError(
                    f"rollout {batch.group_key(i)} (sample {i}): the response contains {IMAGE_PAD}, which the "
                    "model would read as an image slot; the rollout engines must exclude vision tokens from sampling"
                )
            behaviour = batch.behaviour(i)
            out.append(
                LearnerSample(
                    input_ids=ids + response,
                    prompt_len=len(ids),
                    pixel_values=pixel_values,
                    image_grid_thw=grid,
                    advantage=float(batch.advantages[i]),
                    old_logprobs=behaviour.copy() if use_sampler_logprobs else None,
                    group_key=batch.group_key(i),
                    behaviour_logprobs=behaviour,
                    prompt_cache=cache,
                )
            )
        return out

    def encode(self, rollout: Rollout, use_sampler_logprobs: bool = False) -> LearnerSample:
        """The :class:`LearnerSample` of one rollout (see :meth:`samples`)."""
        return self.samples(StepBatch.from_rollouts([rollout]), use_sampler_logprobs)[0]


# --------------------------------------------------------------------------------- micro-batches


def make_micro_batches(samples: Sequence[LearnerSample], token_budget: int) -> list[list[int]]:
    """Indices of ``samples`` grouped so that each group's ``rows * max_len <= token_budget``.

    Samples are sorted by length (stable) and packed greedily, so rows of similar length share a
    micro-batch and padding stays small. A sample longer than the budget gets a micro-batch of its
    own (it cannot be split). Every index appears exactly once.
    """
    if token_budget < 1:
        raise ValueError(f"token_budget={token_budget!r} must be >= 1")
    order = sorted(range(len(samples)), key=lambda i: (samples[i].num_tokens, i))
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        length = samples[i].num_tokens  # the longest so far: lengths ascend
        if current and (len(current) + 1) * length > token_budget:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def padding_ratio(samples: Sequence[LearnerSample], batches: Sequence[Sequence[int]]) -> float:
    """Share of padded slots in ``sum(rows * max_len)`` over ``batches`` (0 = no waste)."""
    slots = sum(len(b) * max(samples[i].num_tokens for i in b) for b in batches if b)
    real = sum(samples[i].num_tokens for b in batches for i in b)
    return 1.0 - real / slots if slots else 0.0


def collate(samples: Sequence[LearnerSample], pad_id: int, image_token_id: int | None = None) -> dict:
    """Right-padded tensors of one micro-batch; per-token fields aligned with the label positions.

    Returns ``input_ids`` / ``attention_mask`` ``[B, T]`` long; ``mm_token_type_ids`` ``[B, T]`` (1 at
    image tokens; only with ``image_token_id``: Qwen2.5-VL needs it for its 3-D rotary positions);
    ``pixel_values`` / ``image_grid_thw`` concatenated in row order (``None`` without images);
    ``labels`` ``[B, T-1]`` (``input_ids[:, 1:]``); ``response_mask`` ``[B, T-1]`` bool, true where the
    label is a response token; ``advantages`` ``[B, T-1]`` float32 (the sample's advantage on its
    response positions, 0 elsewhere); ``old_logprobs`` / ``ref_logprobs`` ``[B, T-1]`` float32 or
    ``None`` when no sample has them (mixing is an error); ``prompt_lens`` / ``lengths`` lists.
    """
    if not samples:
        raise ValueError("collate needs at least one sample")
    b = len(samples)
    t = max(s.num_tokens for s in samples)
    input_ids = torch.full((b, t), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((b, t), dtype=torch.long)
    response_mask = torch.zeros((b, t - 1), dtype=torch.bool)
    advantages = torch.zeros((b, t - 1), dtype=torch.float32)
    per_token = {}
    for name in ("old_logprobs", "ref_logprobs"):
        have = [getattr(s, name) is not None for s in samples]
        if any(have) and not all(have):
            raise ValueError(f"{name} is set on some samples of the micro-batch but not on others")
        per_token[name] = torch.zeros((b, t - 1), dtype=torch.float32) if all(have) else None
    for row, s in enumerate(samples):
        n, p = s.num_tokens, s.prompt_len
        input_ids[row, :n] = torch.tensor(s.input_ids, dtype=torch.long)
        attention_mask[row, :n] = 1
        # The logits at position p-1 predict the first response token input_ids[p].
        response_mask[row, p - 1 : n - 1] = True
        advantages[row, p - 1 : n - 1] = s.advantage
        for name, out in per_token.items():
            if out is not None and n > p:
                out[row, p - 1 : n - 1] = torch.tensor(getattr(s, name), dtype=torch.float32)
    with_images = [s for s in samples if s.pixel_values is not None]
    batch = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": input_ids[:, 1:].clone(),
        "response_mask": response_mask,
        "advantages": advantages,
        "old_logprobs": per_token["old_logprobs"],
        "ref_logprobs": per_token["ref_logprobs"],
        "pixel_values": torch.cat([s.pixel_values for s in with_images]) if with_images else None,
        "image_grid_thw": torch.cat([s.image_grid_thw for s in with_images]) if with_images else None,
        "prompt_lens": [s.prompt_len for s in samples],
        "lengths": [s.num_tokens for s in samples],
    }
    if image_token_id is not None:
        batch["mm_token_type_ids"] = (input_ids == image_token_id).long()
    return batch


def append_dummy_image(batch: dict, pad_id: int, image_token_id: int, patch_dim: int, merge_size: int) -> dict:
    """Add one image token, masked out, to an image-free micro-batch (returns a new dict).

    Why: under FSDP every rank must run the same collectives. A rank whose micro-batch has no image
    would skip the vision blocks' parameter all-gathers (and leave their gradients unset, which
    breaks the gradient reduce-scatter) while a rank with images runs them, and the job hangs.
    With this, the vision tower always runs on one ``merge_size x merge_size`` patch grid of zeros.

    The image token goes into a new last column of the last row with attention mask 0: real tokens
    never attend to it (causal, and masked), its position is excluded from Qwen's 3-D rotary
    index, and its label positions are outside the response mask, so outputs are unchanged while
    the vision parameters still receive (zero) gradients through it.
    """
    if batch["pixel_values"] is not None:
        raise ValueError("append_dummy_image is for micro-batches without images")
    out = dict(batch)
    b = batch["input_ids"].shape[0]

    def widen(x: Tensor, fill) -> Tensor:
        return torch.cat([x, torch.full((b, 1), fill, dtype=x.dtype)], dim=1)

    input_ids = widen(batch["input_ids"], pad_id)
    input_ids[-1, -1] = image_token_id
    out["input_ids"] = input_ids
    out["attention_mask"] = widen(batch["attention_mask"], 0)
    out["labels"] = input_ids[:, 1:].clone()
    out["response_mask"] = widen(batch["response_mask"], False)
    out["advantages"] = widen(batch["advantages"], 0.0)
    for name in ("old_logprobs", "ref_logprobs"):
        if batch[name] is not None:
            out[name] = widen(batch[name], 0.0)
    if "mm_token_type_ids" in batch:
        out["mm_token_type_ids"] = (input_ids == image_token_id).long()
    out["pixel_values"] = torch.zeros((merge_size * merge_size, patch_dim), dtype=torch.float32)
    out["image_grid_thw"] = torch.tensor([[1, merge_size, merge_size]], dtype=torch.long)
    return out


# --------------------------------------------------------------------------------- packed micro-batches


def plan_packs(lengths: Sequence[int], token_budget: int) -> list[list[int]]:
    """Indices grouped into packs of at most ``token_budget`` tokens in all (first fit, longest first).

    A sample longer than the budget gets a pack of its own. Every index appears exactly once; indices
    within a pack ascend.
    """
    if token_budget < 1:
        raise ValueError(f"token_budget={token_budget!r} must be >= 1")
    packs: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        k = next((k for k, r in enumerate(room) if r >= lengths[i]), None)
        if k is None:
            packs.append([i])
            room.append(token_budget - lengths[i])
        else:
            packs[k].append(i)
            room[k] -= lengths[i]
    return [sorted(p) for p in packs]


def response_fields(samples: Sequence[LearnerSample]) -> dict:
    """The per-response-token fields of a micro-batch, flat in sample order, each ``[1, K]``:
    ``labels`` (the response ids), ``mask`` (all true), ``advantages``, ``old_logprobs`` / ``ref_logprobs`` /
    ``behaviour_logprobs`` (``None`` unless every sample has them; mixing is an error); and ``response_lens``.

    ``K = 0`` (no sample has a response: a dummy micro-batch) gives one masked-out entry, so the forward
    still has an output to back-propagate through (FSDP needs every rank's backward).
    """
    lens = [s.response_len for s in samples]
    empty = sum(lens) == 0
    labels = [t for s in samples for t in s.input_ids[s.prompt_len :]]
    advantages = [s.advantage for s, n in zip(samples, lens, strict=True) for _ in range(n)]
    out: dict = {
        "response_lens": lens,
        "labels": torch.tensor(labels or [0], dtype=torch.long)[None],
        "mask": torch.full((1, max(len(labels), 1)), not empty, dtype=torch.bool),
        "advantages": torch.tensor(advantages or [0.0], dtype=torch.float32)[None],
    }
    for name in ("old_logprobs", "ref_logprobs", "behaviour_logprobs"):
        have = [getattr(s, name) is not None for s in samples]
        if any(have) and not all(have):
            raise ValueError(f"{name} is set on some samples of the micro-batch but not on others")
        out[name] = None
        if all(have):
            parts = [torch.as_tensor(getattr(s, name), dtype=torch.float32).reshape(-1) for s in samples]
            out[name] = (torch.zeros(1) if empty else torch.cat(parts))[None]
    return out


def pack(
    samples: Sequence[LearnerSample],
    positions,
    dummy_image: tuple[int, int, int] | None = None,
) -> dict:
    """One packed row: the samples back to back, ``input_ids`` ``[1, T]`` and ``position_ids`` ``[4, 1, T]``
    (row 0: text positions restarting at 0 per sequence, which transformers reads as sequence boundaries;
    rows 1-3: the 3-D rotary positions ``positions(sample)`` gives, ``[3, L]``), ``pixel_values`` /
    ``image_grid_thw`` in sequence order, and ``keep``: the row positions whose logits predict a response
    token, in sample order (the :func:`response_fields` layout).

    ``dummy_image`` = ``(image_token_id, patch_dim, merge_size)``: when no sample has an image, append a
    sequence of one image token on a zero patch grid (its own sequence: nothing attends to it, no logit
    of it is kept), so the vision tower runs (see :func:`append_dummy_image`). ``slots`` / ``real``: row
    length and sample tokens (the dummy image token counts as padding).
    """
    ids, pos, keep = [], [], []
    start = 0
    for s in samples:
        n = s.num_tokens
        ids.append(torch.as_tensor(s.input_ids, dtype=torch.long))
        three = positions(s)
        pos.append(torch.cat([torch.arange(n, dtype=torch.long)[None], three], dim=0))
        keep.append(torch.arange(start + s.prompt_len - 1, start + n - 1, dtype=torch.long))
        start += n
    real = start
    with_images = [s for s in samples if s.pixel_values is not None]
    pixel_values = torch.cat([s.pixel_values for s in with_images]) if with_images else None
    grid = torch.cat([s.image_grid_thw for s in with_images]) if with_images else None
    if pixel_values is None and dummy_image is not None:
        image_token_id, patch_dim, merge = dummy_image
        ids.append(torch.tensor([image_token_id], dtype=torch.long))
        pos.append(torch.zeros((4, 1), dtype=torch.long))
        pixel_values = torch.zeros((merge * merge, patch_dim), dtype=torch.float32)
        grid = torch.tensor([[1, merge, merge]], dtype=torch.long)
        start += 1
    keep_idx = torch.cat(keep) if keep else torch.zeros(0, dtype=torch.long)
    if keep_idx.numel() == 0:
        keep_idx = torch.tensor([start - 1], dtype=torch.long)  # masked out: see response_fields
    return {
        "input_ids": torch.cat(ids)[None],
        "position_ids": torch.cat(pos, dim=1)[:, None, :],
        "pixel_values": pixel_values,
        "image_grid_thw": grid,
        "keep": keep_idx,
        "slots": start,
        "real": real,
    }


PACKED_SDPA = "ivgr_packed_sdpa"
"""The attention implementation name the learner registers for packed rows on SDPA (:func:`packed_sdpa_attention`)."""


def packed_sdpa_attention(module, query, key, value, attention_mask, position_ids=None, **kwargs):
    """transformers attention function: SDPA run causally within each packed sequence.

    A packed row (batch 1, no attention mask, text ``position_ids`` restarting at 0 per sequence) is
    split at every restart and each sequence gets its own causal SDPA call, which is exactly what a
    padded batch computes for it, at the cost of the sequences' own lengths (a block-diagonal mask
    would cost the whole row's). Anything else (the vision tower's calls, padded batches) goes to
    transformers' SDPA function unchanged. Registered under :data:`PACKED_SDPA`; no mask function is
    registered for it, so transformers builds no ``[T, T]`` mask.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if attention_mask is None and position_ids is not None and query.shape[0] == 1 and query.shape[2] > 1:
        text = position_ids.reshape(-1)
        bounds = (torch.nonzero(text[1:] != text[:-1] + 1).flatten() + 1).tolist()
        if bounds:
            edges = [0, *bounds, query.shape[2]]
            outs = [
                sdpa_attention_forward(module, query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], None, **kwargs)[0]
                for a, b in zip(edges[:-1], edges[1:], strict=True)
            ]
            return torch.cat(outs, dim=1), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def register_packed_sdpa() -> str:
    """Register :func:`packed_sdpa_attention` with transformers (idempotent); returns its name."""
    from transformers import AttentionInterface

    AttentionInterface.register(PACKED_SDPA, packed_sdpa_attention)
    return PACKED_SDPA
