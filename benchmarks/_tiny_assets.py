"""The tiny model and synthetic data set the end-to-end benchmarks train on, made once under a work directory."""

from __future__ import annotations

from pathlib import Path


def asset_overrides(workdir: Path) -> list[str]:
    """Config overrides pointing ``model.path`` and the data files at ``workdir``'s assets."""
    return [
        f"model.path={workdir / 'tiny-qwen2.5-vl'}",
        f"data.train_files=[{workdir / 'synthetic' / 'train.parquet'}]",
        f"data.val_files=[{workdir / 'synthetic' / 'val.parquet'}]",
    ]


def ensure_assets(workdir: Path) -> None:
    """Write the tiny model and the synthetic set under ``workdir`` unless they are there."""
    from ivgr_dist.runtime._ext_fix import install

    install()
    from ivgr_dist.config import load_config
    from ivgr_dist.data.pipeline import ensure_model, ensure_synthetic

    base = load_config(None, asset_overrides(workdir))
    ensure_model(base.model)
    ensure_synthetic(base.data)
