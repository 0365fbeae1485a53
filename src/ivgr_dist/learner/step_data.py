"""A step's learner input as it leaves the driver: images once per record, everything else in arrays.

The driver never turns images into pixel values. :class:`StepBatch` holds each distinct image of the
step ONCE (the resized uint8 pixels the engines saw, keyed by record and position), each prompt once
(token ids with unexpanded image placeholders, shared by its n samples) and the samples as flat arrays
(response ids, sampled log-probs, advantages). The grounded and textual prompts of a record share the
record's image keys, so a record's image crosses the wire once whatever the stream count and ``n``.
Pixel values are made on the learner ranks (``SampleEncoder.samples``), once per image and step, and
shared by reference by every sample that shows the image.

:func:`place` splits a step over the learner ranks ONCE for all of its passes (old log-probs, reference
log-probs, every update): per mini-batch, whole records go to the lightest rank (by tokens), so a
record's image goes to one rank only; with fewer records than ranks, groups, then samples, are the
units. Each rank receives :meth:`StepBatch.select` of its samples, which carries only the prompts and
images those samples use.

uint8 pixels are 1/8 of the processor's float32 pixel values for Qwen's two temporal patches (3 bytes a
pixel against 2 x 3 x 4), so encoding on the ranks also moves 8x fewer bytes than shipping pixel values.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ivgr_dist.types import Rollout

__all__ = ["StepBatch", "place"]


@dataclass
class StepBatch:
    """Samples of one step (or a rank's share of it). Prompts and images are stored once and referenced."""

    images: dict[str, np.ndarray]
    """Image key (``<original_idx>/<k>``) -> ``[H, W, 3]`` uint8, the resized image the engines saw."""
    prompt_ids: list[np.ndarray]
    """Per prompt: int32 token ids, one unexpanded image placeholder per image."""
    prompt_images: list[tuple[str, ...]]
    """Per prompt: its image keys, in prompt order."""
    prompt_tokens: np.ndarray
    """Per prompt: int64 length with image placeholders expanded (checked against the processor's grid)."""
    prompt_uids: list[str]
    """Per prompt: ``<original_idx>:<stream>`` (the GRPO group of its samples)."""
    sample_prompt: np.ndarray
    """Per sample: int32 index into the prompt arrays."""
    response_offsets: np.ndarray
    """``[samples + 1]`` int64: sample ``i``'s response is ``response_ids[off[i]:off[i + 1]]``."""
    response_ids: np.ndarray
    """Every response's token ids, concatenated (int32)."""
    behaviour_logprobs: np.ndarray
    """The engines' sampled log-prob of each response token, aligned with ``response_ids`` (float32)."""
    advantages: np.ndarray
    """Per sample: GRPO advantage (float32)."""

    def __len__(self) -> int:
        return len(self.sample_prompt)

    @classmethod
    def from_rollouts(cls, rollouts: Sequence[Rollout]) -> StepBatch:
        """Pack rollouts; prompts are deduplicated by uid and images by record and position."""
        images: dict[str, np.ndarray] = {}
        prompt_of: dict[str, int] = {}
        prompt_ids, prompt_images, prompt_tokens, uids = [], [], [], []
        sample_prompt = np.empty(len(rollouts), dtype=np.int32)
        lengths = np.empty(len(rollouts), dtype=np.int64)
        for i, r in enumerate(rollouts):
            p = r.prompt
            j = prompt_of.get(p.uid)
            if j is None:
                j = prompt_of[p.uid] = len(uids)
                keys = tuple(f"{p.original_idx}/{k}" for k in range(len(p.images)))
                for key, img in zip(keys, p.images, strict=True):
                    if key not in images:
                        images[key] = _pixels(img)
                    elif images[key].shape[:2] != (img.height, img.width):
                        raise ValueError(
                            f"record {p.original_idx}: image {key} has size {img.width}x{img.height} in prompt "
                            f"{p.uid} but {images[key].shape[1]}x{images[key].shape[0]} in another stream; the "
                            "streams of a record must show the same resized image"
                        )
                prompt_ids.append(np.asarray(p.prompt_token_ids, dtype=np.int32))
                prompt_images.append(keys)
                prompt_tokens.append(p.num_prompt_tokens)
                uids.append(p.uid)
            sample_prompt[i] = j
            lengths[i] = len(r.response_ids)
            if len(r.logprobs) not in (0, len(r.response_ids)):
                raise ValueError(
                    f"rollout {r.group_key}#{r.sample_idx}: {len(r.logprobs)} log-probs for {len(r.response_ids)} tokens"
                )
        offsets = np.zeros(len(rollouts) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        response_ids = np.empty(offsets[-1], dtype=np.int32)
        behaviour = np.zeros(offsets[-1], dtype=np.float32)
        for i, r in enumerate(rollouts):
            a, b = offsets[i], offsets[i + 1]
            response_ids[a:b] = r.response_ids
            if len(r.logprobs):
                behaviour[a:b] = r.logprobs
        return cls(
            images=images,
            prompt_ids=prompt_ids,
            prompt_images=prompt_images,
            prompt_tokens=np.asarray(prompt_tokens, dtype=np.int64),
            prompt_uids=uids,
            sample_prompt=sample_prompt,
            response_offsets=offsets,
            response_ids=response_ids,
            behaviour_logprobs=behaviour,
            advantages=np.asarray([r.advantage for r in rollouts], dtype=np.float32),
        )

    # ---------------------------------------------------------------------------------- per sample

    def response(self, i: int) -> np.ndarray:
        return self.response_ids[self.response_offsets[i] : self.response_offsets[i + 1]]

    def behaviour(self, i: int) -> np.ndarray:
        return self.behaviour_logprobs[self.response_offsets[i] : self.response_offsets[i + 1]]

    def num_tokens(self) -> np.ndarray:
        """Per sample: expanded prompt + response tokens (what the learner's forward sees)."""
        return self.prompt_tokens[self.sample_prompt] + np.diff(self.response_offsets)

    def group_key(self, i: int) -> str:
        return self.prompt_uids[self.sample_prompt[i]]

    def record(self, i: int) -> str:
        return self.group_key(i).rsplit(":", 1)[0]

    # ---------------------------------------------------------------------------------- subsets

    def select(self, indices: Sequence[int]) -> StepBatch:
        """The samples ``indices`` (in that order), with only the prompts and images they use."""
        idx = np.asarray(indices, dtype=np.int64)
        used = list(dict.fromkeys(self.sample_prompt[idx].tolist()))
        new_of = {j: k for k, j in enumerate(used)}
        keys = dict.fromkeys(key for j in used for key in self.prompt_images[j])
        spans = [(self.response_offsets[i], self.response_offsets[i + 1]) for i in idx.tolist()]
        lengths = np.asarray([b - a for a, b in spans], dtype=np.int64)
        offsets = np.zeros(len(idx) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        take = np.concatenate([np.arange(a, b) for a, b in spans]) if spans else np.zeros(0, dtype=np.int64)
        return StepBatch(
            images={k: self.images[k] for k in keys},
            prompt_ids=[self.prompt_ids[j] for j in used],
            prompt_images=[self.prompt_images[j] for j in used],
            prompt_tokens=self.prompt_tokens[used] if used else np.zeros(0, dtype=np.int64),
            prompt_uids=[self.prompt_uids[j] for j in used],
            sample_prompt=np.asarray([new_of[j] for j in self.sample_prompt[idx].tolist()], dtype=np.int32),
            response_offsets=offsets,
            response_ids=self.response_ids[take],
            behaviour_logprobs=self.behaviour_logprobs[take],
            advantages=self.advantages[idx],
        )

    def nbytes(self) -> int:
        """Bytes of array payload (images, token ids, log-probs, advantages); what dominates the wire."""
        arrays = [*self.images.values(), *self.prompt_ids, self.prompt_tokens, self.sample_prompt]
        arrays += [self.response_offsets, self.response_ids, self.behaviour_logprobs, self.advantages]
        return int(sum(a.nbytes for a in arrays))


def _pixels(image) -> np.ndarray:
    """``[H, W, 3]`` uint8 of a PIL image (or an array already in that layout)."""
    arr = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"image of dtype {arr.dtype} and shape {arr.shape}: expected [H, W, 3] uint8")
    return np.ascontiguousarray(arr)


def place(batch: StepBatch, mini_batches: Sequence[Sequence[int]], n_ranks: int) -> list[list[list[int]]]:
    """Sample indices per rank and mini-batch: ``out[rank][m]`` (each sorted).

    Within a mini-batch, units go heaviest first (by tokens) to the lightest rank: whole records when a
    mini-batch has at least ``n_ranks`` of them (a record's image then reaches one rank), else whole GRPO
    groups, else single samples. Every index of every mini-batch appears exactly once.
    """
    if n_ranks < 1:
        raise ValueError(f"n_ranks={n_ranks} must be >= 1")
    tokens = batch.num_tokens()
    out: list[list[list[int]]] = [[] for _ in range(n_ranks)]
    for mb in mini_batches:
        units: list[list[int]] = []
        for key in (batch.record, batch.group_key):
            by: dict[str, list[int]] = {}
            for i in mb:
                by.setdefault(key(i), []).append(int(i))
            units = list(by.values())
            if len(units) >= n_ranks:
                break
        else:
            units = [[int(i)] for i in mb]
        load = [0] * n_ranks
        shards: list[list[int]] = [[] for _ in range(n_ranks)]
        for u in sorted(units, key=lambda u: (-int(tokens[u].sum()), u[0])):
            r = min(range(n_ranks), key=lambda k: (load[k], k))
            shards[r].extend(u)
            load[r] += int(tokens[u].sum())
        for r in range(n_ranks):
            out[r].append(sorted(shards[r]))
    return out
