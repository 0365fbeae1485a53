"""Rollouts -> learner samples -> token-budgeted, padded micro-batches.

* :class:`LearnerSample` is what the learner trains on: the full token sequence (prompt with every
  ``<|image_pad|>`` expanded to its image tokens, then the response), the image patches the HF
  image processor makes, the advantage, and optional old/reference log-probs per response token.
* :class:`SampleEncoder` turns a :class:`~ivgr_dist.types.Rollout` into a :class:`LearnerSample`,
  loading the HF processor once. It checks the expanded prompt length against
  ``Prompt.num_prompt_tokens`` (what the data pipeline and the rollout engine counted), so a
  processor that resizes images differently from the pipeline fails loudly instead of training on
  misaligned tokens.
* :func:`make_micro_batches` packs samples into micro-batches whose padded size ``rows * max_len``
  stays within a token budget (sorted by length, greedy), :func:`padding_ratio` reports the waste.
* :func:`collate` pads a micro-batch (right padding) and aligns everything per-token with the
  LABEL positions: column ``t`` of ``labels``/``response_mask``/``old_logprobs``/``ref_logprobs``/
  ``advantages`` describes the token at ``input_ids[:, t + 1]``, i.e. what the logits at position
  ``t`` predict.
* :func:`append_dummy_image` gives an image-free micro-batch one masked-out image token, so the
  vision tower runs on every rank (see its docstring for why FSDP needs that).

Departures from the recipe (verl packs sequences without padding via flash-attn varlen; here
rows are padded and SDPA is used, which is why the padding ratio is measured and bounded by
sorting). Videos are not supported (iVGR trains on images).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ivgr_dist.types import Rollout

__all__ = [
    "IMAGE_PAD",
    "LearnerSample",
    "SampleEncoder",
    "append_dummy_image",
    "collate",
    "make_micro_batches",
    "padding_ratio",
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
    """Loads the model directory's processor once; :meth:`encode` turns rollouts into samples."""

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

    def encode(self, rollout: Rollout, use_sampler_logprobs: bool = False) -> LearnerSample:
        """The :class:`LearnerSample` of ``rollout``.

        ``old_logprobs`` stays ``None`` unless ``use_sampler_logprobs`` (then it is the rollout
        engine's log-probs): the recipe recomputes the old log-probs with the learner, so numeric
        differences between engine and learner do not bias the ratio.
        """
        prompt = rollout.prompt
        pixel_values = grid = None
        ids = list(prompt.prompt_token_ids)
        n_pads = sum(1 for t in ids if t == self.image_pad_id)
        if n_pads != len(prompt.images):
            raise ValueError(
                f"prompt {prompt.uid}: {n_pads} {IMAGE_PAD} tokens for {len(prompt.images)} image(s); "
                "prompt_token_ids must hold one unexpanded placeholder per image"
            )
        if prompt.images:
            pixel_values, grid = self.image_inputs(prompt.images)
            counts = iter((grid.prod(-1) // self.merge_size**2).tolist())
            expanded: list[int] = []
            for t in ids:
                expanded.extend([t] * next(counts) if t == self.image_pad_id else [t])
            ids = expanded
        if len(ids) != prompt.num_prompt_tokens:
            raise ValueError(
                f"prompt {prompt.uid}: expanding the image placeholders gives {len(ids)} prompt tokens but the "
                f"prompt says num_prompt_tokens={prompt.num_prompt_tokens}; the processor resizes images "
                "differently from the data pipeline (check the pixel bounds in the model's processor config)"
            )
        if self.image_pad_id in rollout.response_ids:
            raise ValueError(
                f"rollout {rollout.group_key}#{rollout.sample_idx}: the response contains {IMAGE_PAD}, which the "
                "model would read as an image slot; the rollout engines must exclude vision tokens from sampling"
            )
        old = None
        if use_sampler_logprobs:
            old = [float(x) for x in rollout.logprobs]
        return LearnerSample(
            input_ids=ids + list(rollout.response_ids),
            prompt_len=len(ids),
            pixel_values=pixel_values,
            image_grid_thw=grid,
            advantage=float(rollout.advantage),
            old_logprobs=old,
            group_key=rollout.group_key,
        )


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
