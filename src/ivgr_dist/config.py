"""The one configuration tree of ivgr-dist.

Every knob lives in a dataclass below; YAML files in ``configs/`` and dotted command-line
overrides (``data.paired_ratio=0.8``) are merged onto it by OmegaConf, then the tree is
materialised into the frozen dataclasses, whose ``__post_init__`` checks quote the bad value and
the rule it breaks. The defaults ARE the tiny CPU configuration (``configs/tiny_cpu.yaml``
repeats them for readers), so ``ivgr-dist <cmd>`` with no ``--config`` runs on a laptop.

Each actor receives only its own section (``cfg.rollout``, ``cfg.data`` ...). Config objects are
frozen: nothing mutates configuration at run time.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "AlgorithmConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "EngineConfig",
    "HealthConfig",
    "JudgeConfig",
    "LearnerConfig",
    "ModelConfig",
    "RewardConfig",
    "RolloutConfig",
    "SearchConfig",
    "SFTConfig",
    "SyncConfig",
    "SyntheticConfig",
    "TinyModelConfig",
    "TrainerConfig",
    "load_config",
    "to_yaml",
]


class ConfigError(ValueError):
    """A configuration value breaks a rule; the message names the key, the value and the rule."""


def _check(ok: bool, key: str, value: Any, rule: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r}: {rule}")


def _check_choice(key: str, value: Any, choices: Sequence[Any]) -> None:
    _check(value in choices, key, value, f"must be one of {list(choices)}")


def _check_seconds(key: str, value: float, allow_zero: bool = False) -> None:
    """A duration (timeout, interval, back-off): finite, and > 0 (>= 0 with ``allow_zero``). ``inf`` would make
    a wait unbounded, which is what every timeout exists to prevent."""
    ok = math.isfinite(value) and (value >= 0 if allow_zero else value > 0)
    _check(ok, key, value, "must be finite and >= 0 (seconds)" if allow_zero else "must be finite and > 0 (seconds)")


# --------------------------------------------------------------------------------------------- model


TINY_FAMILIES = ("qwen2_5_vl", "qwen3_vl")


@dataclass(frozen=True)
class TinyModelConfig:
    """Shape of the tiny random model built by ``ivgr-dist make-tiny-model`` (CPU development).

    The sizes are the smallest that both transformers and vLLM's CPU kernels accept
    (see the README, "The CPU stack"): vLLM's CPU attention rejects head_dim 16, and the M-RoPE sections must sum
    to head_dim / 2. The same sizes serve both families.
    """

    family: str = "qwen2_5_vl"
    """Architecture: ``qwen2_5_vl`` (Qwen2.5-VL) or ``qwen3_vl`` (dense Qwen3-VL)."""
    hidden_size: int = 128
    """Text decoder width."""
    num_layers: int = 2
    """Text decoder layers."""
    num_heads: int = 2
    """Attention heads (head_dim = hidden_size / num_heads)."""
    num_kv_heads: int = 1
    """Key/value heads (grouped-query attention)."""
    intermediate_size: int = 256
    """Text MLP width."""
    vision_depth: int = 2
    """Vision transformer blocks."""
    vision_hidden_size: int = 32
    """Vision transformer width."""
    vision_heads: int = 2
    """Vision attention heads."""
    vocab_size: int = 2048
    """Upper bound on the locally trained BPE vocabulary (the small corpus yields fewer merges)."""
    initializer_range: float = 0.02
    """Std of the random weights (as in real Qwen configs)."""
    max_position_embeddings: int = 2048
    """Longest sequence the model is configured for."""
    seed: int = 0
    """Seed for the random weights and the tokenizer's training text."""

    def __post_init__(self) -> None:
        _check_choice("model.tiny.family", self.family, TINY_FAMILIES)
        _check(self.hidden_size > 0 and self.num_heads > 0, "model.tiny.hidden_size", self.hidden_size, "must be > 0")
        _check(
            self.hidden_size % self.num_heads == 0,
            "model.tiny.num_heads",
            self.num_heads,
            f"must divide hidden_size={self.hidden_size}",
        )
        head_dim = self.hidden_size // self.num_heads
        _check(
            head_dim % 32 == 0,
            "model.tiny.hidden_size",
            self.hidden_size,
            "hidden_size / num_heads must be a multiple of 32 (vLLM CPU attention; M-RoPE sections)",
        )
        _check(
            self.num_heads % self.num_kv_heads == 0,
            "model.tiny.num_kv_heads",
            self.num_kv_heads,
            f"must divide num_heads={self.num_heads}",
        )
        _check(
            self.vision_hidden_size % self.vision_heads == 0,
            "model.tiny.vision_heads",
            self.vision_heads,
            f"must divide vision_hidden_size={self.vision_hidden_size}",
        )
        _check(self.initializer_range > 0, "model.tiny.initializer_range", self.initializer_range, "must be > 0")
        _check(self.vocab_size >= 300, "model.tiny.vocab_size", self.vocab_size, "must be >= 300 (bytes + merges)")


@dataclass(frozen=True)
class ModelConfig:
    """The policy checkpoint (a Hugging Face model directory)."""

    path: str = "outputs/tiny-qwen2.5-vl"
    """Model directory (config.json, safetensors, tokenizer, preprocessor config)."""
    make_tiny_if_missing: bool = True
    """Build the tiny random model at ``path`` when it does not exist (CPU default). Off for real runs."""
    dtype: str = "bfloat16"
    """Inference dtype for the rollout engines."""
    trust_remote_code: bool = False
    """Pass trust_remote_code to transformers and vLLM."""
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    """Shape used when building the tiny model."""

    def __post_init__(self) -> None:
        _check(bool(self.path), "model.path", self.path, "must be a non-empty path")
        _check_choice("model.dtype", self.dtype, ["bfloat16", "float16", "float32"])


# ---------------------------------------------------------------------------------------------- data

SYNTHETIC_QUESTION_TYPES = ("color", "shape", "count", "position")
SYNTHETIC_TASKS = ("shapes", "search")
SEARCH_ASKS = ("color", "shape")
SEARCH_MIN_TARGET_PX = 6
"""Smallest target side (pixels) the ``search`` task accepts: below it a star, a circle and a square are one blob."""


@dataclass(frozen=True)
class SearchConfig:
    """The ``search`` task (``data.synthetic.task=search``): one target among distractors (a small one in a larger
    image at the high-resolution settings below; the defaults are an easier point).

    The question names the target by one attribute and asks for the other: ``color`` asks "What color is the
    star?" (the target is the only star), ``shape`` asks "What shape is the red object?" (the target is the only
    red object). Every distractor differs from the target in BOTH colour and shape, so the target is the one
    object the question can mean and the answer cannot be read off any other object: a model that does not find
    the target names a distractor's attribute and is wrong. ``target_instances`` is the target alone.
    Sizes are the longer side of an object as a fraction of the shorter image side.

    The defaults are what the tiny CPU model learns in part (README "A task that needs localisation"): one
    distractor, both objects 25-40% of a 112-pixel side; after a 1000-step warm start (``configs/localise/``)
    greedy accuracy was 0.57 textual / 0.53 grounded, against 0.50 for naming either visible colour. The
    knobs reach the high-resolution regime (e.g. 224-pixel images, 3-5 distractors, targets of 8-14%); already at
    168 pixels with 2-3 distractors of 12-25% the tiny model named one colour for every image after a 200-step
    warm start.
    """

    ask: list[str] = field(default_factory=lambda: ["color"])
    """Attribute(s) asked about, one drawn per record: ``color`` (target found by its shape) or ``shape``
    (target found by its colour)."""
    min_distractors: int = 1
    """Fewest distractor objects per image."""
    max_distractors: int = 1
    """Most distractor objects per image."""
    min_target_frac: float = 0.25
    """Smallest target side as a fraction of the shorter image side."""
    max_target_frac: float = 0.4
    """Largest target side as a fraction of the shorter image side."""
    min_distractor_frac: float = 0.25
    """Smallest distractor side as a fraction of the shorter image side."""
    max_distractor_frac: float = 0.4
    """Largest distractor side as a fraction of the shorter image side."""
    min_image_size: int = 112
    """Smallest original image side in pixels (sides are drawn independently in [min, max])."""
    max_image_size: int = 112
    """Largest original image side in pixels."""

    def __post_init__(self) -> None:
        p = "data.synthetic.search."
        _check(len(self.ask) >= 1, p + "ask", self.ask, f"must be a non-empty subset of {list(SEARCH_ASKS)}")
        _check(len(set(self.ask)) == len(self.ask), p + "ask", self.ask, "must not repeat")
        for a in self.ask:
            _check_choice(p + "ask[]", a, SEARCH_ASKS)
        _check(
            1 <= self.min_distractors <= self.max_distractors,
            p + "min_distractors",
            self.min_distractors,
            f"must be in [1, max_distractors={self.max_distractors}] (a search needs something to search among)",
        )
        _check(
            28 <= self.min_image_size <= self.max_image_size,
            p + "min_image_size",
            self.min_image_size,
            f"must be in [28, max_image_size={self.max_image_size}]",
        )
        for kind in ("target", "distractor"):
            lo, hi = getattr(self, f"min_{kind}_frac"), getattr(self, f"max_{kind}_frac")
            _check(
                0.0 < lo <= hi <= 0.5,
                f"{p}min_{kind}_frac",
                lo,
                f"need 0 < min_{kind}_frac <= max_{kind}_frac={hi} <= 0.5 (objects must leave room for others)",
            )
        px = round(self.min_target_frac * self.min_image_size)
        _check(
            px >= SEARCH_MIN_TARGET_PX,
            p + "min_target_frac",
            self.min_target_frac,
            f"gives {px}-pixel targets in {self.min_image_size}-pixel images; targets need >= "
            f"{SEARCH_MIN_TARGET_PX} pixels (raise it or min_image_size)",
        )


@dataclass(frozen=True)
class SyntheticConfig:
    """The synthetic visual-grounding set (``ivgr-dist make-synthetic``); difficulty knobs included.

    Default difficulty follows the learning calibration in the README ("Does it learn?"): one object per image and
    colour questions learn within minutes on the tiny model; more objects and named-shape
    questions are much slower at that scale. Objects cover 40-80% of the image side, so that box
    IoU, which the tiny model learns slowly, starts high enough for RL to improve it within
    minutes (at 25-50%, 30 RL steps left the IoU flat at ~0.02). All eleven palette colours, several
    of them close (red/orange/brown/pink, black/gray), keep the answer from saturating during the
    warm start that well-formed boxes need: after 200 warm-start steps, the first RL steps' sampled
    accuracy was 0.98 with four colours (one seed), 0.86-0.91 with eight and 0.68-0.80 with eleven
    (three seeds each).

    Two tasks (``task``):

    - ``shapes`` (default): the question families of ``question_types`` over ``min_objects``-``max_objects``
      shapes of ``min_object_frac``-``max_object_frac`` of a ``min_image_size``-``max_image_size`` image; with
      the defaults, one large shape and "What color is the shape?", whose greedy accuracy saturates after the
      warm start.
    - ``search``: a task where finding the object is the hard part, as in the paper's high-resolution
      benchmarks (V*, HRBench): one target among ``search.min_distractors``-``search.max_distractors``
      distractors, found by one attribute and asked about the other ("What color is the star?"); distractors
      differ from the target in both. The defaults (one distractor, large objects) are what the tiny model
      learns in part; the knobs go down to small targets among many distractors in larger images. Knobs in
      :class:`SearchConfig` (``search.*``); ``colors``, ``shapes``, ``num_records``, ``val_fraction``,
      ``seed`` and ``text_only_fraction`` are shared, the other ``shapes``-task knobs are ignored. Records have
      datasource ``synthetic_search`` and the warm start's templates reason "find it, then read it"
      (``data/targets.py``). README "A task that needs localisation" has its calibration.
    """

    task: str = "shapes"
    """``shapes`` (the question families below) or ``search`` (small target among distractors; ``search.*``)."""
    search: SearchConfig = field(default_factory=SearchConfig)
    """Knobs of the ``search`` task (unused by ``shapes``)."""
    num_records: int = 640
    """Total records (train + val)."""
    val_fraction: float = 0.125
    """Share of records written to val.parquet."""
    seed: int = 0
    """Everything the generator draws comes from this seed."""
    min_image_size: int = 112
    """Smallest original image side in pixels (``shapes`` task; ``search.min_image_size`` for ``search``)."""
    max_image_size: int = 112
    """Largest original image side in pixels (sides are drawn independently in [min, max]; ``shapes`` task)."""
    min_objects: int = 1
    """Fewest shapes per image (``shapes`` task)."""
    max_objects: int = 1
    """Most shapes per image (``shapes`` task)."""
    colors: list[str] = field(
        default_factory=lambda: [
            "red", "green", "blue", "yellow", "purple", "orange", "black", "gray", "brown", "pink", "cyan"
        ]
    )  # fmt: skip
    """Colour vocabulary (names known to the generator's palette)."""
    shapes: list[str] = field(default_factory=lambda: ["circle", "square", "triangle"])
    """Shape vocabulary."""
    question_types: list[str] = field(default_factory=lambda: ["color"])
    """Question families to draw from: color, shape, count, position (``shapes`` task)."""
    min_object_frac: float = 0.4
    """Smallest object side as a fraction of the shorter image side (``shapes`` task)."""
    max_object_frac: float = 0.8
    """Largest object side as a fraction of the shorter image side (``shapes`` task)."""
    text_only_fraction: float = 0.1
    """Share of text-only arithmetic records (they become ``single``-stream prompts)."""

    def __post_init__(self) -> None:
        p = "data.synthetic."
        _check(self.num_records >= 2, p + "num_records", self.num_records, "must be >= 2 (train and val)")
        _check(0.0 < self.val_fraction < 1.0, p + "val_fraction", self.val_fraction, "must be in (0, 1)")
        _check(
            28 <= self.min_image_size <= self.max_image_size,
            p + "min_image_size",
            self.min_image_size,
            f"must be in [28, max_image_size={self.max_image_size}]",
        )
        _check(
            1 <= self.min_objects <= self.max_objects,
            p + "min_objects",
            self.min_objects,
            f"must be in [1, max_objects={self.max_objects}]",
        )
        _check(len(self.colors) >= 2, p + "colors", self.colors, "needs at least 2 colours")
        _check(len(set(self.colors)) == len(self.colors), p + "colors", self.colors, "must not repeat")
        _check(
            len(self.shapes) >= 1 and len(set(self.shapes)) == len(self.shapes),
            p + "shapes",
            self.shapes,
            "must be non-empty without repeats",
        )
        _check(len(self.question_types) >= 1, p + "question_types", self.question_types, "must be non-empty")
        for q in self.question_types:
            _check_choice(p + "question_types[]", q, SYNTHETIC_QUESTION_TYPES)
        _check(
            0.0 < self.min_object_frac <= self.max_object_frac <= 1.0,
            p + "min_object_frac",
            self.min_object_frac,
            f"need 0 < min_object_frac <= max_object_frac={self.max_object_frac} <= 1",
        )
        _check(
            0.0 <= self.text_only_fraction < 1.0, p + "text_only_fraction", self.text_only_fraction, "must be in [0, 1)"
        )
        _check_choice(p + "task", self.task, SYNTHETIC_TASKS)
        if self.task == "search":  # distractors take a colour and a shape other than the target's
            _check(len(self.shapes) >= 2, p + "shapes", self.shapes, "task=search needs at least 2 shapes")


@dataclass(frozen=True)
class DataConfig:
    """Where records come from and how they become prompts."""

    train_files: list[str] = field(default_factory=lambda: ["outputs/synthetic/train.parquet"])
    """Parquet files in the iVGR-RL-51K layout."""
    val_files: list[str] = field(default_factory=lambda: ["outputs/synthetic/val.parquet"])
    """Held-out parquet files (same layout)."""
    image_root: str | None = None
    """Directory that ``images`` paths are relative to; default: each parquet file's directory."""
    allow_outside_image_root: bool = False
    """Read image paths that leave the image root (absolute paths, ``..``); off: such a row is a bad row
    (``data/bad_rows/image_outside_root``)."""
    image_workers: int = 4
    """Threads that check images at load and decode and resize a batch's images when its prompts are built."""
    make_synthetic_if_missing: bool = True
    """Generate the synthetic set into the train file's directory when it is missing (CPU default)."""
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    """Synthetic set parameters."""
    min_pixels: int = 3136
    """Resized images have at least this many pixels (Qwen2.5-VL: 56*56)."""
    max_pixels: int = 200704
    """Resized images have at most this many pixels (recipe: 3211264; tiny default: 448*448)."""
    max_prompt_length: int = 512
    """Prompts longer than this many tokens (image tokens included) are filtered out and counted."""
    rollout_batch_size: int = 32
    """Prompts per rollout batch (A/B pairs + singles; recipe: 512)."""
    paired_ratio: float = 0.9
    """Share of a batch's prompts that are A/B pairs; the rest are ``single`` prompts."""
    shuffle: bool = True
    """Shuffle each epoch (a seeded permutation, so resume is exact)."""
    seed: int = 0
    """Sampler seed."""
    bad_rows: str = "skip"
    """``raise``: stop at the first bad row with its file and row; ``skip``: drop, count and log it."""
    max_bad_row_fraction: float = 0.05
    """With ``skip``, raise anyway when more than this share of rows is bad (a broken data set)."""
    streams: list[str] = field(default_factory=lambda: ["grounded", "textual"])
    """Streams a paired record is trained in: both (iVGR), or one of them (the single-stream ablations;
    without ``grounded`` there is no consistency reference, so consistency stays 0)."""
    paired_datasources: list[str] = field(default_factory=list)
    """Datasources always expanded into A/B pairs, even without target boxes."""
    single_datasources: list[str] = field(default_factory=list)
    """Datasources always used as ``single`` prompts, even with target boxes."""

    def __post_init__(self) -> None:
        _check(len(self.train_files) > 0, "data.train_files", self.train_files, "must list at least one parquet file")
        _check(self.min_pixels >= 28 * 28, "data.min_pixels", self.min_pixels, "must be >= 784 (one 28x28 patch group)")
        _check(
            self.max_pixels >= self.min_pixels,
            "data.max_pixels",
            self.max_pixels,
            f"must be >= min_pixels={self.min_pixels}",
        )
        _check(self.max_prompt_length > 0, "data.max_prompt_length", self.max_prompt_length, "must be > 0")
        _check(self.image_workers >= 1, "data.image_workers", self.image_workers, "must be >= 1")
        _check(self.rollout_batch_size >= 1, "data.rollout_batch_size", self.rollout_batch_size, "must be >= 1")
        _check(0.0 <= self.paired_ratio <= 1.0, "data.paired_ratio", self.paired_ratio, "must be in [0, 1]")
        _check_choice("data.bad_rows", self.bad_rows, ["raise", "skip"])
        _check(
            0.0 <= self.max_bad_row_fraction <= 1.0,
            "data.max_bad_row_fraction",
            self.max_bad_row_fraction,
            "must be in [0, 1]",
        )
        _check(
            len(self.streams) >= 1 and len(set(self.streams)) == len(self.streams),
            "data.streams",
            self.streams,
            "must name grounded and/or textual, each once",
        )
        for stream in self.streams:
            _check_choice("data.streams[]", stream, ["grounded", "textual"])
        both = set(self.paired_datasources) & set(self.single_datasources)
        _check(
            not both,
            "data.single_datasources",
            self.single_datasources,
            f"overlaps paired_datasources on {sorted(both)}",
        )


# ------------------------------------------------------------------------------------------- rollout


@dataclass(frozen=True)
class EngineConfig:
    """vLLM engine arguments shared by every rollout engine."""

    max_model_len: int = 1024
    """Longest prompt + response an engine holds."""
    enforce_eager: bool = True
    """Skip CUDA-graph / compile capture (always on for CPU; faster start-up on GPU)."""
    gpu_memory_utilization: float = 0.2
    """GPU: share of device memory for weights + KV cache. CPU: sizes the KV cache from RAM."""
    cpu_kvcache_space_gb: int = 1
    """CPU only: KV cache size in GiB (VLLM_CPU_KVCACHE_SPACE)."""
    max_num_seqs: int = 256
    """Most sequences an engine schedules at once."""
    enable_prefix_caching: bool = True
    """Share the prompt KV between the n samples of a group."""
    seed: int = 0
    """Engine sampling seed (each engine adds its index)."""
    max_images_per_prompt: int = 1
    """Images one prompt may carry (vLLM reserves encoder budget for this many; records with more are bad rows)."""
    cpu_affinity: list[int] = field(default_factory=list)
    """CPU cores the engines' processes run on (os.sched_setaffinity, before vLLM starts its processes); empty:
    any. For a disaggregated shape on one CPU machine (benchmarks/bench_e2e.py pins engines and learners apart)."""
    max_num_batched_tokens: int | None = None
    """Tokens the scheduler processes per engine step (prefill chunk size); None: vLLM's default (2048 for an
    ``AsyncLLM``, small for prompts of thousands of image tokens: the GPU recipes set 16384)."""

    def __post_init__(self) -> None:
        _check(self.max_model_len >= 64, "rollout.engine.max_model_len", self.max_model_len, "must be >= 64")
        _check(
            self.max_num_batched_tokens is None or self.max_num_batched_tokens >= 64,
            "rollout.engine.max_num_batched_tokens",
            self.max_num_batched_tokens,
            "must be >= 64 (or null for vLLM's default)",
        )
        _check(
            0.0 < self.gpu_memory_utilization <= 1.0,
            "rollout.engine.gpu_memory_utilization",
            self.gpu_memory_utilization,
            "must be in (0, 1]",
        )
        _check(
            self.cpu_kvcache_space_gb >= 1,
            "rollout.engine.cpu_kvcache_space_gb",
            self.cpu_kvcache_space_gb,
            "must be >= 1",
        )
        _check(self.max_num_seqs >= 1, "rollout.engine.max_num_seqs", self.max_num_seqs, "must be >= 1")
        _check(
            self.max_images_per_prompt >= 1,
            "rollout.engine.max_images_per_prompt",
            self.max_images_per_prompt,
            "must be >= 1",
        )


@dataclass(frozen=True)
class HealthConfig:
    """Health checks of the rollout engines (``rollout.health``)."""

    interval_s: float = 10.0
    """Each live engine is probed this often with a no-op that reaches its vLLM EngineCore and every TP
    worker (``collective_rpc``), not only the Ray actor: a hung core behind a live actor fails it."""
    timeout_s: float = 10.0
    """A probe that takes longer than this failed."""
    failures: int = 3
    """Consecutive failed probes that mark an engine unhealthy: it gets no new work, is killed (its
    placement group released) and replaced. A dead engine (actor or EngineCore gone) is marked at once."""
    enabled: bool = True
    """false: no probing (dead engines are still noticed by their failed requests and replaced)."""

    def check(self, prefix: str) -> None:
        """Validate, naming keys under ``prefix`` (the section holding it: ``rollout.health`` or
        ``reward.judge.health``); called by that section's ``__post_init__``."""
        _check_seconds(f"{prefix}.interval_s", self.interval_s)
        _check_seconds(f"{prefix}.timeout_s", self.timeout_s)
        _check(self.failures >= 1, f"{prefix}.failures", self.failures, "must be >= 1")


@dataclass(frozen=True)
class RolloutConfig:
    """Sampling of both streams."""

    n: int = 5
    """Rollouts per prompt: the GRPO group size (recipe: 5)."""
    temperature: float = 1.0
    """Sampling temperature (recipe: 1.0)."""
    top_p: float = 0.99
    """Nucleus sampling (recipe: 0.99)."""
    max_response_length: int = 256
    """Most tokens per response (recipe: 4096)."""
    num_engines: int = 2
    """Target number of vLLM engines (each a Ray actor); scaled independently of the learners. The fleet keeps
    this many: a dead or hung engine is replaced, engines that cannot be placed yet start when resources
    appear (a node joins), and ``ivgr-dist scale --engines N`` changes the target while the job runs."""
    min_engines: int = 1
    """The run fails, naming what is missing, when fewer engines than this are live and none can be started
    (no resources within ``placement_timeout_s``, or ``max_restarts`` used up). The first start waits for
    at least this many engines; the rest of the target may come later."""
    max_engines: int = 0
    """Most engines ``ivgr-dist scale`` may ask for (0: ``num_engines``)."""
    max_restarts: int = 8
    """Replacements of failed engines over the whole run (scaling up is not a restart)."""
    restart_backoff_s: float = 5.0
    """Wait before replacing again after a replacement failed to start; doubles with each such failure."""
    health: HealthConfig = field(default_factory=HealthConfig)
    """Health checks (``rollout.health.*``)."""
    tensor_parallel_size: int = 1
    """Devices per engine (recipe: 2): one placement group of this many one-device bundles per engine, on one
    node. On CPU machines each TP rank is a vLLM worker process with a core of its own."""
    max_inflight_groups: int = 0
    """Groups in flight per engine before the pool holds back (0: engine.max_num_seqs // n)."""
    group_timeout_s: float = 600.0
    """A rollout batch fails with an error naming the engine when no group finishes for this long."""
    placement_timeout_s: float = 300.0
    """Wait at most this long for an engine's placement group; the error names the resources missing."""
    resources: dict[str, float] = field(default_factory=dict)
    """Extra Ray resources in every bundle of every engine, to put engines on nodes of a role, e.g.
    ``{rollout_node: 1}`` with nodes started as ``ray start --resources='{"rollout_node": 8}'``."""
    seed_groups: bool = True
    """Seed each group's sampling from (engine.seed, step, prompt uid), so a run's samples do not depend
    on which engine a group lands on or when. vLLM then samples seeded requests one by one (and skips
    FlashInfer's sampler on GPU): set false for peak GPU throughput."""
    engine: EngineConfig = field(default_factory=EngineConfig)
    """vLLM engine arguments."""

    def __post_init__(self) -> None:
        _check(
            self.n >= 2,
            "rollout.n",
            self.n,
            "must be >= 2: GRPO compares the rollouts of a group, and a group of one has advantage 0 (trains nothing)",
        )
        _check(self.temperature >= 0.0, "rollout.temperature", self.temperature, "must be >= 0")
        _check(0.0 < self.top_p <= 1.0, "rollout.top_p", self.top_p, "must be in (0, 1]")
        _check(self.max_response_length >= 1, "rollout.max_response_length", self.max_response_length, "must be >= 1")
        _check(self.num_engines >= 1, "rollout.num_engines", self.num_engines, "must be >= 1")
        _check(
            1 <= self.min_engines <= self.num_engines,
            "rollout.min_engines",
            self.min_engines,
            f"must be in [1, rollout.num_engines={self.num_engines}]",
        )
        _check(
            self.max_engines == 0 or self.max_engines >= self.num_engines,
            "rollout.max_engines",
            self.max_engines,
            f"must be 0 (= num_engines) or >= rollout.num_engines={self.num_engines}",
        )
        _check(self.max_restarts >= 0, "rollout.max_restarts", self.max_restarts, "must be >= 0")
        _check_seconds("rollout.restart_backoff_s", self.restart_backoff_s, allow_zero=True)
        _check(
            self.tensor_parallel_size >= 1, "rollout.tensor_parallel_size", self.tensor_parallel_size, "must be >= 1"
        )
        _check_seconds("rollout.placement_timeout_s", self.placement_timeout_s)
        _check_seconds("rollout.group_timeout_s", self.group_timeout_s)
        self.health.check("rollout.health")


# ----------------------------------------------------------------------------------------- algorithm


@dataclass(frozen=True)
class AlgorithmConfig:
    """GRPO and iVGR reward coefficients (docs/algorithm.md)."""

    clip_low: float = 0.2
    """Lower clip: ratio >= 1 - clip_low."""
    clip_high: float = 0.28
    """Upper clip: ratio <= 1 + clip_high (asymmetric, 'clip-higher')."""
    kl_coef: float = 0.01
    """Weight of the k3 KL loss against the frozen reference policy."""
    adv_eps: float = 1e-6
    """Added to the group std in the advantage."""
    single_accuracy_weight: float = 1.5
    """Stream ``single`` reward = format + weight * accuracy."""
    consistency_weight: float = 1.0
    """Stream-B (textual) reward = format + accuracy + weight * consistency (the paper: 1). 0 is the ablation
    "dual stream without consistency": both streams train, the judge is never asked for consistency and the
    textual reward is format + accuracy."""
    ref_min_iou: float = 0.3
    """A stream-A rollout qualifies as consistency reference with accuracy 1 and box_iou >= this."""
    dup_box_iou: float = 0.9
    """Two predicted boxes with IoU above this make box_valid 0 (anti-spam)."""
    max_answer_chars: int = 1000
    """Answers longer than this score accuracy 0."""
    tis_cap: float = 2.0
    """Off-policy correction: each token's surrogate is weighted by min(pi_proximal / pi_behaviour, tis_cap),
    the learner's probability at the start of the step over the sampling engine's (truncated importance
    sampling); ~1 when on-policy. 0 turns it off."""

    def __post_init__(self) -> None:
        _check(
            0.0 <= self.consistency_weight <= 10.0,
            "algorithm.consistency_weight",
            self.consistency_weight,
            "must be in [0, 10] (1: the paper; 0: no consistency reward)",
        )
        _check(0.0 < self.clip_low < 1.0, "algorithm.clip_low", self.clip_low, "must be in (0, 1)")
        _check(self.clip_high > 0.0, "algorithm.clip_high", self.clip_high, "must be > 0")
        _check(
            self.kl_coef >= 0.0 and math.isfinite(self.kl_coef),
            "algorithm.kl_coef",
            self.kl_coef,
            "must be finite and >= 0",
        )
        _check(self.adv_eps > 0.0, "algorithm.adv_eps", self.adv_eps, "must be > 0")
        _check(0.0 <= self.ref_min_iou <= 1.0, "algorithm.ref_min_iou", self.ref_min_iou, "must be in [0, 1]")
        _check(0.0 < self.dup_box_iou <= 1.0, "algorithm.dup_box_iou", self.dup_box_iou, "must be in (0, 1]")
        _check(self.max_answer_chars >= 1, "algorithm.max_answer_chars", self.max_answer_chars, "must be >= 1")
        _check(
            self.tis_cap == 0 or (self.tis_cap >= 1.0 and math.isfinite(self.tis_cap)),
            "algorithm.tis_cap",
            self.tis_cap,
            "must be 0 (off) or a finite cap >= 1",
        )


# ------------------------------------------------------------------------------------------- learner


@dataclass(frozen=True)
class LearnerConfig:
    """The FSDP2 learner group: policy + frozen reference policy, one Ray actor per rank."""

    num_ranks: int = 2
    """Learner ranks (data-parallel FSDP2 shards); scaled independently of the rollout engines."""
    backend: str = "auto"
    """torch.distributed backend: ``auto`` (nccl with CUDA, else gloo), ``nccl`` or ``gloo``."""
    gpus_per_rank: int = -1
    """GPUs per learner rank; -1 = 1 when the cluster has GPUs, else 0."""
    cpus_per_rank: int = 1
    """CPUs reserved per learner rank."""
    placement_timeout_s: float = 300.0
    """Wait at most this long for the learner placement group; the error names the resources missing."""
    resources: dict[str, float] = field(default_factory=dict)
    """Extra Ray resources in every rank's bundle (node roles, e.g. ``{learner_node: 1}``)."""
    precision: str = "auto"
    """``bf16`` (bf16 compute, fp32 master weights and gradient reduction), ``fp32``, or ``auto``
    (bf16 on GPU, fp32 on CPU)."""
    lr: float = 5e-4
    """AdamW learning rate (recipe: 1e-6 for 7B; the tiny CPU model needs far more: 3e-4 left the box
    IoU flat for 30 steps, 1e-3 without a long warm-up collapsed the accuracy on the first update)."""
    weight_decay: float = 0.01
    """AdamW weight decay (recipe: 0.01)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW betas."""
    warmup_ratio: float = 0.1
    """Linear warm-up over this share of trainer.max_steps optimizer updates (recipe: 2%; the tiny
    model's large learning rate needs a longer one)."""
    lr_schedule: str = "cosine"
    """After the warm-up: ``constant`` (the recipe) or ``cosine`` decay to ``min_lr_ratio * lr`` at the last
    update (tiny default: at a constant 5e-4 the tiny policy's accuracy swung late in the run)."""
    min_lr_ratio: float = 0.1
    """Cosine schedule: the final learning rate as a share of ``lr``."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (recipe: 1.0); 0 disables clipping."""
    global_batch_size: int = 16
    """Prompts (groups of n rollouts) per optimizer step, across all ranks (recipe: 128)."""
    micro_batch_tokens: int = 8192
    """Token budget of one micro-batch per rank (packed: the sum of its sequences' lengths; padded: rows x the
    longest length); bounds activation memory."""
    pack_sequences: bool = True
    """Pack a micro-batch's sequences back to back in one row, no padding (FlashAttention-2 varlen on GPU, SDPA
    within each sequence otherwise; exact). false: padded rectangles (``learner/padding_ratio`` shows the waste)."""
    sharded_init: bool = True
    """Each rank builds the model on the meta device and reads only its own shard of every tensor from the
    safetensors files; false: every rank loads the full model through transformers, then shards it."""
    attn_implementation: str = "auto"
    """Learner attention: ``auto`` (FlashAttention-2 when the ``flash_attn`` package imports and the ranks have
    CUDA, else PyTorch SDPA), ``sdpa`` or ``flash_attention_2`` (fails at start without flash-attn or CUDA)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (saves memory, costs ~30% compute)."""
    ppo_epochs: int = 1
    """Passes over each rollout batch."""
    cpu_affinity: list[int] = field(default_factory=list)
    """CPU cores the ranks' processes run on (os.sched_setaffinity); empty: any (see rollout.engine.cpu_affinity)."""

    def __post_init__(self) -> None:
        _check(self.num_ranks >= 1, "learner.num_ranks", self.num_ranks, "must be >= 1")
        _check_choice("learner.backend", self.backend, ["auto", "nccl", "gloo"])
        _check(self.gpus_per_rank >= -1, "learner.gpus_per_rank", self.gpus_per_rank, "must be -1 (auto), 0 or more")
        _check(self.cpus_per_rank >= 0, "learner.cpus_per_rank", self.cpus_per_rank, "must be >= 0")
        _check_seconds("learner.placement_timeout_s", self.placement_timeout_s)
        _check_choice("learner.precision", self.precision, ["auto", "bf16", "fp32"])
        _check(self.lr > 0 and math.isfinite(self.lr), "learner.lr", self.lr, "must be finite and > 0")
        _check(self.weight_decay >= 0, "learner.weight_decay", self.weight_decay, "must be >= 0")
        _check(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            "learner.betas",
            self.betas,
            "must be two numbers in [0, 1)",
        )
        _check(0.0 <= self.warmup_ratio < 1.0, "learner.warmup_ratio", self.warmup_ratio, "must be in [0, 1)")
        _check_choice("learner.lr_schedule", self.lr_schedule, ["constant", "cosine"])
        _check(0.0 <= self.min_lr_ratio <= 1.0, "learner.min_lr_ratio", self.min_lr_ratio, "must be in [0, 1]")
        _check(self.grad_clip >= 0, "learner.grad_clip", self.grad_clip, "must be >= 0 (0 disables clipping)")
        _check(self.global_batch_size >= 1, "learner.global_batch_size", self.global_batch_size, "must be >= 1")
        _check(self.micro_batch_tokens >= 64, "learner.micro_batch_tokens", self.micro_batch_tokens, "must be >= 64")
        _check(self.ppo_epochs >= 1, "learner.ppo_epochs", self.ppo_epochs, "must be >= 1")
        _check_choice("learner.attn_implementation", self.attn_implementation, ["auto", "sdpa", "flash_attention_2"])


# ------------------------------------------------------------------------------------------ reward


JUDGE_ON_FAILURE = ("zero", "mask")
"""``reward.judge.on_failure`` values."""


@dataclass(frozen=True)
class JudgeConfig:
    """The LLM judge for consistency and free-form accuracy (see ivgr_dist.reward.judge)."""

    backend: str = "rule"
    """``rule`` (deterministic, synthetic data / tests), ``openai`` (HTTP endpoints) or ``engine`` (vLLM actors)."""
    urls: list[str] = field(default_factory=list)
    """openai: base URLs of OpenAI-compatible servers (``http://host:port/v1``), load-balanced."""
    model: str = "judge"
    """openai/engine: served model name, or the model directory for ``engine``."""
    api_key_env: str = "IVGR_JUDGE_API_KEY"
    """openai: NAME of the environment variable holding the API key (the key itself never enters config or logs).
    Reward workers read it from THEIR environment: under ``ray job submit`` the submitting shell's variables do not
    reach them; pass it in the job's runtime_env ``env_vars`` (``cluster/submit.sh`` does) or use ``api_key_file``."""
    api_key_file: str | None = None
    """openai: absolute path of a file holding the API key (read where the judge is built, in each reward worker;
    it must be on storage every node sees). When set it is used instead of ``api_key_env``."""
    concurrency: int = 64
    """Judge calls in flight at once (per reward worker)."""
    timeout_s: float = 30.0
    """Deadline of one call."""
    max_retries: int = 3
    """Retries after a failed call (timeouts, 5xx, dropped connections, unparsable answers)."""
    backoff_s: float = 0.5
    """First retry delay; doubles per retry, with full jitter."""
    samples: int = 1
    """Judge samples per request, averaged (recipe: 4 at temperature 0.5; paper: 1 at temperature 0)."""
    temperature: float = 0.0
    """Judge sampling temperature."""
    max_tokens: int = 256
    """Longest judge answer."""
    fallback_consistency: float = 0.0
    """Consistency score when every try fails and ``on_failure=zero`` (counted in judge/failures)."""
    max_failure_rate: float = 0.5
    """Stop the run (after writing the step's checkpoint, exit 1) when more than this share of judge requests failed
    over the last ``failure_window`` steps; in [0, 1], 1 never stops. Every step with a failure warns on the console."""
    failure_window: int = 3
    """Steps over which ``max_failure_rate`` is measured (the stop needs that many steps)."""
    on_failure: str = "mask"
    """What a failed judge request (every try failed, worker error, group deadline) does to the reward:
    ``mask`` (default) leaves the unknown component out so GRPO compares only known rewards: a failed consistency
    drops consistency for its whole textual group, a failed judged accuracy excludes that rollout from its
    group's advantage (advantage 0); ``zero`` scores ``fallback_consistency`` / 0.0 and trains on it
    (docs/algorithm.md, 3.3)."""
    num_engines: int = 1
    """engine: judge vLLM engines, ONE fleet shared by every reward worker (and the driver's scorer)."""
    engine: EngineConfig = field(default_factory=EngineConfig)
    """engine: the judge engines' own vLLM arguments (``max_model_len``, ``max_num_seqs``, ...)."""
    health: HealthConfig = field(default_factory=HealthConfig)
    """engine: health checks of the judge engines (as ``rollout.health``): dead or hung ones are replaced."""
    max_restarts: int = 8
    """engine: replacements of failed judge engines over the run."""
    resources: dict[str, float] = field(default_factory=dict)
    """engine: extra Ray resources of each judge engine, e.g. ``{judge_node: 1}``."""

    def __post_init__(self) -> None:
        p = "reward.judge."
        _check(self.max_restarts >= 0, p + "max_restarts", self.max_restarts, "must be >= 0")
        _check_choice(p + "backend", self.backend, ["rule", "openai", "engine"])
        if self.backend == "openai":
            _check(len(self.urls) > 0, p + "urls", self.urls, "must list at least one endpoint for backend=openai")
        for url in self.urls:
            _check(url.startswith(("http://", "https://")), p + "urls[]", url, "must start with http:// or https://")
        _check(self.concurrency >= 1, p + "concurrency", self.concurrency, "must be >= 1")
        _check_seconds(p + "timeout_s", self.timeout_s)
        _check(0 <= self.max_retries <= 20, p + "max_retries", self.max_retries, "must be in [0, 20]")
        _check_seconds(p + "backoff_s", self.backoff_s, allow_zero=True)
        _check(self.samples >= 1, p + "samples", self.samples, "must be >= 1")
        _check(self.temperature >= 0, p + "temperature", self.temperature, "must be >= 0")
        _check(
            self.fallback_consistency in (0.0, 0.3, 0.7, 1.0),
            p + "fallback_consistency",
            self.fallback_consistency,
            "must be a rubric value: 0.0, 0.3, 0.7 or 1.0",
        )
        _check_choice(p + "on_failure", self.on_failure, JUDGE_ON_FAILURE)
        _check(0.0 <= self.max_failure_rate <= 1.0, p + "max_failure_rate", self.max_failure_rate, "must be in [0, 1]")
        _check(self.failure_window >= 1, p + "failure_window", self.failure_window, "must be >= 1 (steps)")
        if self.api_key_file is not None:
            _check(
                os.path.isabs(self.api_key_file),
                p + "api_key_file",
                self.api_key_file,
                "must be an absolute path (on storage every node sees; each reward worker reads it)",
            )
        _check(self.num_engines >= 1, p + "num_engines", self.num_engines, "must be >= 1")
        self.health.check(p + "health")


@dataclass(frozen=True)
class RewardConfig:
    """Reward computation: worker pool, reference cache and judge."""

    num_workers: int = 2
    """Reward worker actors (CPU); 0 scores in the driver process."""
    cpus_per_worker: float = 0.5
    """CPUs reserved per reward worker."""
    resources: dict[str, float] = field(default_factory=dict)
    """Extra Ray resources per reward worker (node roles, e.g. ``{cpu_node: 1}``)."""
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    """The judge."""
    recipe_exact: bool = False
    """Score boxes and pick consistency references exactly by the public recipe's rules: boxes of four integers
    only, the recipe's duplicate-box scope (the first ``total // 2`` parsed entries, ordered or not, against every
    other parsed entry), and no non-blank ``<think>`` required of a reference. docs/algorithm.md, section 7."""
    rule_timeout_s: float = 10.0
    """Hard bound on one math-verify call (seconds). math-verify runs in a few spawned processes per reward worker
    and in the driver (``reward/rule_pool.py``); a call past this kills and replaces its process, and the rollout's
    accuracy is scored by ``reward.judge.on_failure`` (``reward/rule_timeouts``). Normal calls take milliseconds."""

    def __post_init__(self) -> None:
        _check(self.num_workers >= 0, "reward.num_workers", self.num_workers, "must be >= 0 (0 = in the driver)")
        _check(self.cpus_per_worker >= 0, "reward.cpus_per_worker", self.cpus_per_worker, "must be >= 0")
        _check_seconds("reward.rule_timeout_s", self.rule_timeout_s)


# -------------------------------------------------------------------------------------------- sync


@dataclass(frozen=True)
class SyncConfig:
    """Weight sync from the learner group into every rollout engine after each update."""

    backend: str = "auto"
    """``auto`` (nccl with GPUs, else ivgr_shm), ``ivgr_shm`` (shared-memory files: CPU, one node), ``gloo``
    (learner rank 0 broadcasts over a gloo group: CPU, any nodes) or ``nccl`` (the same over NCCL: GPUs)."""
    bucket_mb: int = 256
    """Weights move in buckets of about this many MiB."""
    timeout_s: float = 300.0
    """Deadline of one push (and of forming the transfer group): a push that has not completed by then raises,
    naming the engines that died or did not answer; they are dropped and the push is tried once more."""
    verify_every: int = 1
    """Every this many steps, check the engines hold the learner's weights: each engine scores a fixed probe
    (prompt + response) and its log-probs must match the learner's within ``verify_tolerance``
    (``sync/verified``); a mismatch stops the run. 0 turns the check off."""
    verify_tolerance: float = 0.05
    """Largest allowed mean |engine - learner| log-prob over the probe's tokens (bf16 engines vs the learner's
    precision: ~0.001-0.003 measured on the tiny models; a stale or corrupted bucket is off by far more)."""

    def __post_init__(self) -> None:
        _check_choice("sync.backend", self.backend, ["auto", "ivgr_shm", "gloo", "nccl"])
        _check(self.bucket_mb >= 1, "sync.bucket_mb", self.bucket_mb, "must be >= 1")
        _check_seconds("sync.timeout_s", self.timeout_s)
        _check(self.verify_every >= 0, "sync.verify_every", self.verify_every, "must be >= 0 (0 = off)")
        _check(self.verify_tolerance > 0, "sync.verify_tolerance", self.verify_tolerance, "must be > 0")


# ----------------------------------------------------------------------------------------------- sft


@dataclass(frozen=True)
class SFTConfig:
    """Supervised warm start on the learner group (``ivgr-dist sft``; ``ivgr-dist train`` runs it first
    when ``enabled``). The learner section's ranks, precision and micro-batching apply; the values
    below replace its optimiser settings for this stage."""

    enabled: bool = True
    """``ivgr-dist train`` starts RL from the warm start's model (training it first unless its output
    already exists). Off in the recipe configs, whose ``model.path`` already is an SFT checkpoint."""
    output_dir: str | None = None
    """Model directory the warm start writes; default ``<trainer.output_dir>/sft_model``."""
    steps: int = 200
    """Optimizer steps (tiny default: the format is learned, sampled accuracy is ~0.8 and half or more
    of the boxes are well-formed, leaving RL room on both accuracy and IoU; at 120 steps few boxes
    were well-formed and RL's IoU gain varied from none to large between runs)."""
    batch_size: int = 16
    """Records per step (a paired record gives one sample per stream in ``streams``)."""
    lr: float = 1e-3
    """AdamW learning rate (the tiny random model needs a large one)."""
    warmup_ratio: float = 0.05
    """Linear warm-up over this share of ``steps``."""
    response_column: str | None = None
    """Parquet column holding target responses (real data); unset: templated responses built from
    the answer and target boxes (the synthetic set; see ``ivgr_dist.data.targets``)."""
    streams: list[str] = field(default_factory=lambda: ["grounded", "textual"])
    """Streams a paired record is trained in (templated targets)."""
    seed: int = 0
    """Record order (a seeded permutation per epoch)."""

    def __post_init__(self) -> None:
        _check(self.steps >= 1, "sft.steps", self.steps, "must be >= 1")
        _check(self.batch_size >= 1, "sft.batch_size", self.batch_size, "must be >= 1")
        _check(self.lr > 0 and math.isfinite(self.lr), "sft.lr", self.lr, "must be finite and > 0")
        _check(0.0 <= self.warmup_ratio < 1.0, "sft.warmup_ratio", self.warmup_ratio, "must be in [0, 1)")
        _check(len(self.streams) >= 1, "sft.streams", self.streams, "must name at least one stream")
        for stream in self.streams:
            _check_choice("sft.streams[]", stream, ["grounded", "textual"])
        _check(self.response_column != "", "sft.response_column", self.response_column, "must be a column name or null")


# ------------------------------------------------------------------------------------------- trainer


LOGGERS = ("jsonl", "tensorboard", "wandb")


@dataclass(frozen=True)
class TrainerConfig:
    """Run-level settings."""

    output_dir: str = "outputs/run"
    """Metrics, checkpoints, the warm start and the exported policy go here. On several nodes: an absolute
    path on storage every node mounts (checked at start; a relative path is made absolute on the driver)."""
    seed: int = 0
    """Seeds the driver's random, NumPy and torch generators. The sampler (``data.seed``), engines
    (``rollout.engine.seed``), warm start (``sft.seed``) and synthetic set have seeds of their own."""
    max_steps: int = 40
    """RL steps to run."""
    save_every: int = 20
    """Checkpoint every this many steps (and after the last step); 0 = only after the last step."""
    keep_checkpoints: int = 2
    """Complete checkpoints to keep (the newest ones; a 7B checkpoint with optimizer state is ~100 GB); 0 keeps all."""
    resume: bool = True
    """Continue from the newest checkpoint in output_dir/checkpoints that is complete and loads (a corrupt newer
    one is reported, renamed ``step_N.corrupt`` and the previous one used). false in an output_dir that holds
    checkpoints is refused at start: ``ivgr-dist train --overwrite`` moves the earlier run aside, or choose another
    output_dir."""
    loggers: list[str] = field(default_factory=lambda: ["jsonl", "tensorboard"])
    """Where each step's metrics go, the same record to each: ``jsonl`` (output_dir/metrics.jsonl, and the sample
    log output_dir/samples.jsonl), ``tensorboard`` (event files in output_dir/tensorboard), ``wandb`` (Weights &
    Biases: ``pip install -e .[wandb]``; the API key only from the environment or ``wandb login``, WANDB_MODE=offline
    honoured). A single name is accepted for a list: ``trainer.loggers=wandb``."""
    wandb_project: str = "ivgr-dist"
    """W&B project."""
    wandb_entity: str | None = None
    """W&B entity (team or user); None: the account's default."""
    wandb_run_name: str | None = None
    """W&B run name; None: the last part of output_dir. The run id is kept in output_dir/wandb_run_id, so a resumed
    run continues the same W&B run."""
    wandb_tags: list[str] = field(default_factory=list)
    """W&B run tags."""
    log_samples_every: int = 5
    """Every this many steps, write a few whole rollouts per stream (prompt, response, answer, every reward component,
    advantage, versions, the consistency reference) to output_dir/samples.jsonl (and a ``samples`` table to W&B);
    0 turns the sample log off."""
    log_samples_per_stream: int = 2
    """Rollouts per stream in each sample log: the best and the worst of the stream's first groups in batch order,
    groups whose rewards differ first (see ivgr_dist.driver.samples)."""
    ray_address: str | None = None
    """Ray cluster to join; None: RAY_ADDRESS if set (ray job submit sets it), else a local cluster."""
    max_staleness: int = 0
    """0: on-policy (generate, then train, then push: the recipe's loop). k >= 1: engines keep generating while
    the learner trains (at most k + 1 batches ahead) and weights are pushed into running generations; a rollout
    is trained on at most k policy versions after the one it was submitted under (its oldest token's)."""
    trace: bool = False
    """Write a Chrome/Perfetto trace of every step (engines' generations, reward scoring, learner phases,
    weight pushes) to output_dir/trace.json (open it in ui.perfetto.dev or chrome://tracing)."""

    def __post_init__(self) -> None:
        _check(bool(self.output_dir), "trainer.output_dir", self.output_dir, "must be a non-empty path")
        _check(self.max_staleness >= 0, "trainer.max_staleness", self.max_staleness, "must be >= 0 (0 = on-policy)")
        _check(self.max_steps >= 0, "trainer.max_steps", self.max_steps, "must be >= 0")
        _check(self.save_every >= 0, "trainer.save_every", self.save_every, "must be >= 0")
        _check(self.keep_checkpoints >= 0, "trainer.keep_checkpoints", self.keep_checkpoints, "must be >= 0 (0 = all)")
        for name in self.loggers:
            _check_choice("trainer.loggers[]", name, LOGGERS)
        _check(len(set(self.loggers)) == len(self.loggers), "trainer.loggers", self.loggers, "must not repeat a logger")
        _check(bool(self.wandb_project), "trainer.wandb_project", self.wandb_project, "must be a non-empty name")
        _check(
            self.log_samples_every >= 0, "trainer.log_samples_every", self.log_samples_every, "must be >= 0 (0 = off)"
        )
        _check(
            self.log_samples_per_stream >= 1,
            "trainer.log_samples_per_stream",
            self.log_samples_per_stream,
            "must be >= 1",
        )


@dataclass(frozen=True)
class Config:
    """The whole tree; each role gets only its own section."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    sync: SyncConfig = field(default_factory=SyncConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)

    @property
    def sft_model_dir(self) -> str:
        """Where the warm start writes (and ``train`` reads) its model."""
        return self.sft.output_dir or str(Path(self.trainer.output_dir) / "sft_model")

    @property
    def sft_logs_dir(self) -> str:
        """Where the warm start writes its metrics.jsonl (and TensorBoard events)."""
        return str(Path(self.trainer.output_dir) / "sft_logs")

    def __post_init__(self) -> None:
        needed = self.data.max_prompt_length + self.rollout.max_response_length
        _check(
            needed <= self.rollout.engine.max_model_len,
            "rollout.engine.max_model_len",
            self.rollout.engine.max_model_len,
            f"must be >= data.max_prompt_length + rollout.max_response_length = {needed}",
        )


# ------------------------------------------------------------------------------------------- loading


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Defaults <- YAML file <- dotted overrides (``a.b=c``), validated; raises :class:`ConfigError`."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    schema = OmegaConf.structured(Config)
    try:
        layers = [schema]
        if path is not None:
            path = Path(path)
            if not path.is_file():
                raise ConfigError(f"--config {str(path)!r}: no such file")
            where = f" (in {path})"
            layers.append(_scalars_to_lists(_refuse_removed(OmegaConf.load(path), where), where))
        bad = [o for o in overrides if "=" not in o or o.startswith("=")]
        if bad:
            raise ConfigError(f"override {bad[0]!r}: must look like key.sub=value")
        layers.append(_scalars_to_lists(_refuse_removed(OmegaConf.from_dotlist(list(overrides)))))
        merged = OmegaConf.merge(*layers)
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        # OmegaConf knows the key and the expected type; keep that, drop its multi-line context.
        key = getattr(exc, "full_key", None)
        msg = str(getattr(exc, "msg", None) or exc).split("\n")[0]
        where = f" (from {path})" if path is not None else ""
        raise ConfigError(f"{key + ': ' if key else ''}{msg}{where}") from None
    except ConfigError:
        raise
    assert isinstance(cfg, Config)
    return cfg


_REMOVED = {
    "trainer.tensorboard": "set trainer.loggers, the loggers to write (default [jsonl, tensorboard]; "
    "trainer.loggers=[jsonl] for no TensorBoard)",
}
"""Keys that configs and scripts of earlier versions set, and what replaces each."""


def _refuse_removed(layer, where: str = ""):
    """``layer`` (one YAML file or the overrides) unchanged; a key of :data:`_REMOVED` in it raises
    :class:`ConfigError` naming what replaces it (the merge would only say the key is unknown)."""
    from omegaconf import OmegaConf

    tree = OmegaConf.to_container(layer, resolve=False)
    for dotted, instead in _REMOVED.items():
        node = tree
        for part in dotted.split("."):
            node = node.get(part) if isinstance(node, dict) and part in node else _MISSING
        if node is not _MISSING:
            raise ConfigError(f"{dotted}: removed; {instead}{where}")
    return layer


_MISSING = object()
_EXAMPLE_ITEMS = {str: "a,b", int: "0,1", float: "0.5,1.0", bool: "true,false"}


def _scalars_to_lists(layer, where: str = ""):
    """``layer`` (one YAML file or the overrides) with a single value given for a ``list[str]`` field made a
    one-element list (``data.train_files=a.parquet`` means ``[a.parquet]``); a single value for another list
    field raises :class:`ConfigError` with an example of the list syntax (``cpu_affinity=3``: core 3, or 3
    cores?). Keys that are not fields are left for the merge to report."""
    import dataclasses
    import typing

    from omegaconf import OmegaConf

    def fix(node: dict, cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for key, value in node.items():
            kind = hints.get(key) if key in fields else None
            if kind is None:
                continue
            if dataclasses.is_dataclass(kind) and isinstance(value, dict):
                fix(value, kind, f"{prefix}{key}.")
            elif typing.get_origin(kind) is list and value is not None and not isinstance(value, (list, dict)):
                if isinstance(value, str) and value.startswith("${"):
                    continue  # an interpolation: resolved at merge
                (item,) = typing.get_args(kind)
                if item is str:
                    node[key] = [value]
                    continue
                default = fields[key].default_factory() if callable(fields[key].default_factory) else []
                items = ",".join(str(v) for v in default) if default else _EXAMPLE_ITEMS.get(item, "a,b")
                raise ConfigError(f"{prefix}{key} expects a list, e.g. {prefix}{key}=[{items}]; got {value!r}{where}")

    tree = OmegaConf.to_container(layer, resolve=False)
    if not isinstance(tree, dict):
        return layer
    fix(tree, Config, "")
    return OmegaConf.create(tree)


def to_yaml(cfg: Config) -> str:
    """The resolved config as YAML (written next to every run's outputs)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
