"""Typed records that flow through the system.

``Prompt`` is what the data pipeline hands to the rollout engines: one stream of one record,
already chat-templated and tokenised, with its resized images and the targets needed to score
it. Later stages (rollout, reward, learner) build on it rather than on loose dicts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Stream = Literal["grounded", "textual", "single"]
STREAMS: tuple[str, ...] = ("grounded", "textual", "single")
"""Stream A (reasoning cites boxes), stream B (plain text reasoning), and text/math-only prompts."""


@dataclass
class Prompt:
    """One prompt instance: a record seen through one stream."""

    original_idx: int
    """Global row index of the record in the data set (shared by its grounded and textual prompts)."""
    stream: str
    """``grounded`` (A), ``textual`` (B) or ``single``."""
    prompt_text: str
    """Chat-templated prompt with one ``<|image_pad|>`` per image (the processor/engine expands it)."""
    prompt_token_ids: list[int]
    """``prompt_text`` tokenised, image placeholders not expanded."""
    num_prompt_tokens: int
    """Prompt length with every image placeholder expanded to its image tokens."""
    answer: str
    """Ground-truth answer."""
    question_type: str
    """How accuracy is decided (multiple_choice, math, exact, free_form ...)."""
    datasource: str
    """Source data set name (tables and metrics are split by it)."""
    images: list[Any] = field(default_factory=list)
    """Resized PIL images, in prompt order."""
    target_boxes: list[list[float]] = field(default_factory=list)
    """Target boxes [x1, y1, x2, y2] in RESIZED-image pixels (empty when the record has none)."""
    target_labels: list[str] = field(default_factory=list)
    """The ``label`` of each target instance ("" where a target has none), parallel to ``target_boxes``."""
    question: str = ""
    """The question without image markers (``query``), for judges and logs."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Columns the pipeline does not interpret, kept as they were."""

    @property
    def uid(self) -> str:
        """Unique id of this prompt instance: ``<original_idx>:<stream>``."""
        return f"{self.original_idx}:{self.stream}"


@dataclass
class Rollout:
    """One sampled response to a :class:`Prompt`, from generation through reward to the learner."""

    prompt: Prompt
    """The prompt it answers (shared by the n rollouts of a group)."""
    sample_idx: int
    """Index within its group (0..n-1)."""
    response_ids: list[int]
    """Generated token ids (EOS included when generation stopped on it)."""
    response_text: str
    """Detokenised response."""
    logprobs: list[float]
    """Log-probability of each generated token under the sampling engine (vLLM)."""
    weight_version: int
    """Version of the policy weights the engine held when the request was submitted: its oldest token's
    version at the latest (staleness counts from it)."""
    finish_reason: str = "stop"
    """``stop`` (EOS/stop string) or ``length`` (hit max_response_length)."""
    rewards: dict[str, float] = field(default_factory=dict)
    """Reward components (format, accuracy, box_valid, box_iou, consistency ...). With
    ``reward.judge.on_failure=mask`` a component the judge failed to decide is absent (docs/algorithm.md, 3.3)."""
    reward: float = 0.0
    """Sum of the components present for this stream: the GRPO reward (of an ``excluded`` rollout, for logs only)."""
    excluded: bool = False
    """True when the rollout takes no part in its group's advantage (advantage 0, not in the group's mean and
    std): its accuracy needed the judge, which failed, with ``reward.judge.on_failure=mask``."""
    advantage: float = 0.0
    """Group-normalised advantage, broadcast to every response token."""
    weight_version_last: int | None = None
    """Version the engine held when the request finished (differs from ``weight_version`` when a weight update
    happened while it generated; None where unknown)."""
    consistency_reference: str | None = None
    """Textual rollouts: the grounded reasoning (the cached reference's ``<think>`` text) the consistency judge
    compared this response against; None without a reference (and for the other streams)."""

    @property
    def group_key(self) -> str:
        """GRPO group: one prompt instance of one stream."""
        return self.prompt.uid
