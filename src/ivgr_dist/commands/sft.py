"""The supervised warm start: the same FSDP2 learner group as RL, trained on target responses.

iVGR starts RL from an SFT checkpoint. :func:`run_sft` builds that checkpoint with the RL stack
itself, not a second trainer: the :class:`~ivgr_dist.learner.group.LearnerGroup` (same ranks,
precision, micro-batching, global token-mean denominator, grad clip, AdamW) runs
``train_step(objective="sft")``, the token-mean negative log-likelihood of the response tokens.
Only the optimiser settings come from the ``sft`` section (``lr``, ``warmup_ratio``; the rate stays
constant after the warm-up, whatever ``learner.lr_schedule`` says for RL); no reference policy is loaded.

Samples: records are drawn in a seeded permutation per epoch, ``sft.batch_size`` per step. A
paired record gives one sample per stream in ``sft.streams`` (templated responses), or one sample
with the response column's text; a single record gives one ``single`` sample. Responses end with
``<|im_end|>``, the token the rollout engines stop on. See :mod:`ivgr_dist.data.targets`.

Output: a Hugging Face model directory at ``cfg.sft_model_dir`` that transformers and vLLM load
(``LearnerGroup.export_hf`` writes a temporary sibling and renames it when complete, so a present
directory is a finished one), and per-step metrics (``loss/nll``, ``grad_norm``, ``lr`` ...) in
``<trainer.output_dir>/sft_logs/metrics.jsonl``. The stage is short and not resumable: an
interrupted warm start runs again from the base model.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import numpy as np

from ivgr_dist.config import Config
from ivgr_dist.data.targets import infer_stream, templated_response
from ivgr_dist.learner.step_data import StepBatch
from ivgr_dist.quote import short_repr
from ivgr_dist.types import Prompt, Rollout

log = logging.getLogger(__name__)

__all__ = ["RETRAIN_HINTS", "SFTData", "run_sft", "sft_config_for_rl"]

END_TOKEN = "<|im_end|>"


class SFTData:
    """Draws SFT batches: ``(prompt, response text)`` pairs, as rollouts of their target responses."""

    def __init__(self, cfg: Config, pipeline):
        self.cfg, self.records = cfg, pipeline.records
        self.box_coords = pipeline.builder.box_coords  # the space of the prompts' target boxes
        tok = pipeline.tokenizer
        self.tokenizer = tok
        end = tok.convert_tokens_to_ids(END_TOKEN)
        self.end_id = end if end is not None and end != tok.unk_token_id else tok.eos_token_id
        if self.end_id is None:
            raise ValueError(f"the tokenizer has neither {END_TOKEN!r} nor an eos token to end responses with")
        self.paired = set(self.records.paired_ids)
        self.ids = np.array(sorted(self.records.paired_ids + self.records.single_ids), dtype=np.int64)
        if len(self.ids) == 0:
            raise ValueError("no usable records for SFT in data.train_files")
        self.column = cfg.sft.response_column
        self.epoch, self.pos, self.order = 0, 0, self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.cfg.sft.seed, epoch]).permutation(self.ids)

    def next_ids(self, n: int | None = None) -> list[int]:
        """The next ``n`` records of the epoch order (default ``sft.batch_size``)."""
        out: list[int] = []
        while len(out) < (self.cfg.sft.batch_size if n is None else n):
            if self.pos == len(self.order):
                self.epoch, self.pos = self.epoch + 1, 0
                self.order = self._permutation(self.epoch)
            out.append(int(self.order[self.pos]))
            self.pos += 1
        return out

    def pairs(self, original_idx: int) -> list[tuple[Prompt, str]]:
        """(prompt, target response) pairs of one record; none when its image cannot be read (the record table
        drops, counts and names it)."""
        paired = original_idx in self.paired
        if self.column is None:
            streams = self.cfg.sft.streams if paired else ["single"]
            prompts = self.records.prompts([(original_idx, s) for s in streams])
            return [(p, templated_response(p, self.box_coords)) for p in prompts]
        row = self.records.record(original_idx)
        if self.column not in row:
            raise ValueError(
                f"sft.response_column={self.column!r}: no such column in {self.records.location(original_idx)[0]} "
                f"(columns: {sorted(row)})"
            )
        text = row[self.column]
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"record {original_idx}: empty {self.column!r} response")
        stream = infer_stream(text, paired, row.get("stream"))
        if stream != "single" and not paired:
            raise ValueError(f"record {original_idx}: stream={short_repr(stream)} but the record has no target boxes")
        return [(p, text) for p in self.records.prompts([(original_idx, stream)])]

    def encode(self, prompt: Prompt, response: str) -> Rollout:
        """The target response as a rollout (token ids ending with the stop token)."""
        ids = self.tokenizer(response, add_special_tokens=False)["input_ids"] + [self.end_id]
        return Rollout(prompt, 0, ids, response, logprobs=[], weight_version=0, advantage=1.0)

    def next_batch(self) -> StepBatch:
        """The next step's samples from ``sft.batch_size`` records (a record's streams share its image); a record
        dropped for an unreadable image is replaced by the next one in the order."""
        samples, records = [], 0
        while records < self.cfg.sft.batch_size:
            if len(self.records.dropped) >= len(self.ids):
                raise ValueError(f"every record of data.train_files was dropped: {self.records.metrics()}")
            for i in self.next_ids(self.cfg.sft.batch_size - records):
                pairs = self.pairs(i)
                records += bool(pairs)
                samples += [self.encode(p, r) for p, r in pairs]
        return StepBatch.from_rollouts(samples)


def sft_config_for_rl(cfg: Config) -> Config:
    """The config RL runs with after the warm start: ``model.path`` is the warm start's output."""
    model = dataclasses.replace(cfg.model, path=cfg.sft_model_dir, make_tiny_if_missing=False)
    return dataclasses.replace(cfg, model=model)


RETRAIN_HINTS = {"sft": "ivgr-dist sft --overwrite", "train": "ivgr-dist train --overwrite-sft"}
"""Per command that runs the warm start: how to make it train again over an existing output."""


def run_sft(cfg: Config, overwrite: bool = False, command: str = "sft") -> Path:
    """Train the warm start and write its model directory; returns it.

    An existing complete output is reused unless ``overwrite`` (then it is replaced). ``command``: the
    ``ivgr-dist`` command running it (``sft`` or ``train``), whose option the reuse message names.
    """
    from tqdm import tqdm

    from ivgr_dist.data.pipeline import build_pipeline
    from ivgr_dist.learner.group import LearnerGroup
    from ivgr_dist.runtime.metrics import MetricsLogger, wandb_options

    out = Path(cfg.sft_model_dir)
    if (out / "config.json").is_file() and not overwrite:
        log.info(
            "SFT model %s exists; reusing it (to train it again: %s, or set sft.output_dir to another directory)",
            out,
            RETRAIN_HINTS.get(command, RETRAIN_HINTS["sft"]),
        )
        return out
    if Path(cfg.model.path).resolve() == out.resolve():
        raise ValueError(f"sft.output_dir={str(out)!r} is model.path: the warm start would overwrite its own base")
    pipeline = build_pipeline(cfg.model, cfg.data, "train", sampler=False)
    data = SFTData(cfg, pipeline)
    learner_cfg = dataclasses.replace(
        cfg.learner, lr=cfg.sft.lr, warmup_ratio=cfg.sft.warmup_ratio, lr_schedule="constant"
    )
    algo_cfg = dataclasses.replace(cfg.algorithm, kl_coef=0.0)  # no reference policy for SFT
    logs = MetricsLogger(cfg.sft_logs_dir, cfg.trainer.loggers, wandb=wandb_options(cfg, name_suffix="-sft"))
    from ivgr_dist.runtime.storage import StorageProbe

    storage = StorageProbe(out.parent, cfg.model.path)
    try:
        group = LearnerGroup(cfg.model, learner_cfg, algo_cfg, cfg.sft.steps, storage=storage)
    finally:
        storage.close()
    try:
        bar = tqdm(range(1, cfg.sft.steps + 1), desc="sft steps", unit="step")
        first = last = None
        for step in bar:
            t0 = time.perf_counter()
            placed = group.load_batch(data.next_batch())
            metrics = group.train_step(0, objective="sft")
            metrics.update(placed)
            metrics.update({"time/step_s": time.perf_counter() - t0, "sft/epoch": data.epoch})
            last = logs.log(step, metrics)
            first = first or last
            bar.set_postfix(nll=f"{metrics['loss/nll']:.3f}")
        # complete or absent: a present directory is a finished warm start. In the engines' dtype (model.dtype),
        # so they load it as it is; the RL learner reads it into its fp32 masters.
        group.export_hf(out, dtype=cfg.model.dtype)
    finally:
        logs.close()
        group.shutdown()
    log.info(
        "SFT done: %d steps, loss/nll %.3f -> %.3f; model written to %s",
        cfg.sft.steps,
        first["loss/nll"],
        last["loss/nll"],
        out,
    )
    return out
