"""From config to prompts: make missing CPU assets, load the tokenizer, the records and the sampler.

This is the one place that wires ``model`` + ``data`` config into the pipeline, so the driver,
``ivgr-dist prepare`` and the evaluation command all build it the same way.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from ivgr_dist.config import DataConfig, ModelConfig
from ivgr_dist.data.dataset import RecordTable
from ivgr_dist.data.prompts import PromptBuilder
from ivgr_dist.data.sampler import PairSampler
from ivgr_dist.models.family import check_pixel_bounds, image_spec

log = logging.getLogger(__name__)

__all__ = ["DataPipeline", "build_pipeline", "ensure_model", "ensure_synthetic"]


def ensure_model(cfg: ModelConfig) -> Path:
    """The model directory; builds the tiny random model there when it is missing and allowed."""
    path = Path(cfg.path)
    if (path / "config.json").is_file():
        built = _tiny_family(path)
        if built is not None and built != cfg.tiny.family and cfg.make_tiny_if_missing:
            raise FileExistsError(
                f"model.path={cfg.path!r} holds a tiny {built} model but model.tiny.family={cfg.tiny.family!r}; "
                "point model.path at another directory (or delete this one) to build the tiny model of that family"
            )
        return path
    if path.exists() and any(path.iterdir()):
        raise FileNotFoundError(f"model.path={cfg.path!r} exists but has no config.json: not a model directory")
    if not cfg.make_tiny_if_missing:
        raise FileNotFoundError(
            f"model.path={cfg.path!r} does not exist; point it at a Hugging Face model directory "
            "or set model.make_tiny_if_missing=true to build the tiny CPU model there"
        )
    from ivgr_dist.models.tiny import make_tiny_model

    log.info("building the tiny random %s model at %s", cfg.tiny.family, path)
    if path.exists():
        path.rmdir()  # empty directory left by a user; make_tiny_model renames into place
    return make_tiny_model(path, cfg.tiny)


def _tiny_family(path: Path) -> str | None:
    """The family a tiny model directory was built as (``ivgr_tiny.json``); None for any other model."""
    marker = path / "ivgr_tiny.json"
    if not marker.is_file():
        return None
    return json.loads(marker.read_text()).get("tiny_model_config", {}).get("family", "qwen2_5_vl")


def ensure_synthetic(cfg: DataConfig) -> None:
    """Generates the synthetic set into the train file's folder when data files are missing and allowed."""
    files = [Path(f) for f in [*cfg.train_files, *cfg.val_files]]
    missing = [f for f in files if not f.is_file()]
    if not missing:
        _warn_if_stale(files[0], cfg)
        return
    if not cfg.make_synthetic_if_missing:
        raise FileNotFoundError(
            f"data file {str(missing[0])!r} does not exist; fix data.train_files / data.val_files "
            "or set data.make_synthetic_if_missing=true to generate the synthetic set there"
        )
    out = Path(cfg.train_files[0]).parent
    expected = {out / "train.parquet", out / "val.parquet"}
    if not set(missing) <= expected:
        raise FileNotFoundError(
            f"data file {str(missing[0])!r} does not exist and is not where the synthetic set would be written "
            f"({sorted(str(e) for e in expected)})"
        )
    from ivgr_dist.data.synthetic import make_synthetic

    log.info("generating the synthetic data set in %s", out)
    make_synthetic(out, cfg.synthetic)


def _warn_if_stale(path: Path, cfg: DataConfig) -> None:
    """A synthetic set made with other ``data.synthetic`` settings is used as it is, with a warning
    naming the keys that differ (a set from ``make-synthetic --n/--seed`` differs on purpose)."""
    from ivgr_dist.data.synthetic import generated_with

    stored = generated_with(path)
    if stored is None or not cfg.make_synthetic_if_missing:
        return
    wanted = json.loads(json.dumps(dataclasses.asdict(cfg.synthetic)))  # lists/tuples as JSON has them
    diff = [
        f"data.synthetic.{k}: {stored.get(k)!r} in the files, {v!r} in the config"
        for k, v in wanted.items()
        if stored.get(k) != v
    ]
    if diff:
        log.warning(
            "%s was generated with other settings than this config's (%s); using it as it is. "
            "Delete its folder to generate the set again with the config's settings.",
            path,
            "; ".join(diff),
        )


@dataclass
class DataPipeline:
    """Everything needed to turn sampler draws into prompts for one split."""

    tokenizer: object
    builder: PromptBuilder
    records: RecordTable
    sampler: PairSampler | None

    def next_prompts(self):
        """The next rollout batch as :class:`~ivgr_dist.types.Prompt` objects (A/B pairs adjacent)."""
        if self.sampler is None:
            raise RuntimeError("this pipeline has no sampler (built with sampler=False)")
        return self.records.prompts(self.sampler.next_batch())


def build_pipeline(
    model_cfg: ModelConfig,
    data_cfg: DataConfig,
    split: str = "train",
    sampler: bool = True,
    max_images: int | None = None,
):
    """Assets (if missing and allowed) -> tokenizer -> validated records -> pair-keeping sampler.

    ``max_images``: records with more images are bad rows (``too_many_images``), skipped and counted or raised
    per ``data.bad_rows``; pass ``rollout.engine.max_images_per_prompt`` wherever engines will generate."""
    from transformers import AutoTokenizer

    if split not in ("train", "val"):
        raise ValueError(f"split={split!r}: must be 'train' or 'val'")
    model_dir = ensure_model(model_cfg)
    ensure_synthetic(data_cfg)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=model_cfg.trust_remote_code)
    spec = image_spec(model_dir)
    check_pixel_bounds(spec, data_cfg.min_pixels, data_cfg.max_pixels, model_dir)
    builder = PromptBuilder(tokenizer, data_cfg, factor=spec.factor, box_coords=spec.box_coords)
    files = data_cfg.train_files if split == "train" else data_cfg.val_files
    records = RecordTable(files, data_cfg, builder=builder, max_images=max_images)
    draw = None
    if sampler:
        draw = PairSampler(
            records.paired_ids,
            records.single_ids,
            batch_size=data_cfg.rollout_batch_size,
            paired_ratio=data_cfg.paired_ratio,
            seed=data_cfg.seed,
            shuffle=data_cfg.shuffle,
            pair_streams=data_cfg.streams,
        )
    return DataPipeline(tokenizer=tokenizer, builder=builder, records=records, sampler=draw)
