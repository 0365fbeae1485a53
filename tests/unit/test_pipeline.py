"""Config -> assets -> records -> sampler -> prompts, and the ``ivgr-dist prepare`` command."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from ivgr_dist.config import load_config
from ivgr_dist.data.pipeline import build_pipeline, ensure_model, ensure_synthetic


def _cfg(tmp_path: Path, model_dir: Path, *extra: str):
    data = tmp_path / "data"
    return load_config(
        None,
        [
            f"model.path={model_dir}",
            f"data.train_files=[{data}/train.parquet]",
            f"data.val_files=[{data}/val.parquet]",
            "data.synthetic.num_records=80",
            "data.rollout_batch_size=10",
            *extra,
        ],
    )


def test_pipeline_generates_missing_data_and_yields_paired_batches(tmp_path, tiny_model_dir):
    cfg = _cfg(tmp_path, tiny_model_dir)
    pipe = build_pipeline(cfg.model, cfg.data, "train")
    assert (tmp_path / "data" / "train.parquet").is_file() and (tmp_path / "data" / "images").is_dir()
    prompts = pipe.next_prompts()
    assert len(prompts) == 10
    # A/B pairs adjacent and sharing original_idx; the rest single.
    pairs = [(a, b) for a, b in zip(prompts[::2], prompts[1::2], strict=False) if a.stream == "grounded"]
    assert pairs and all(b.stream == "textual" and a.original_idx == b.original_idx for a, b in pairs)
    assert {p.stream for p in prompts} <= {"grounded", "textual", "single"}
    for p in prompts:
        assert p.num_prompt_tokens <= cfg.data.max_prompt_length
        assert p.prompt_token_ids[-3:] == pipe.tokenizer.encode("<|im_start|>assistant\n")[-3:]
    val = build_pipeline(cfg.model, cfg.data, "val", sampler=False)
    assert len(val.records) == 10 and val.sampler is None


def test_missing_model_without_permission_is_a_clear_error(tmp_path):
    cfg = _cfg(tmp_path, tmp_path / "nope", "model.make_tiny_if_missing=false")
    with pytest.raises(FileNotFoundError, match="model.path=.*nope.* does not exist"):
        ensure_model(cfg.model)


def test_missing_data_without_permission_is_a_clear_error(tmp_path, tiny_model_dir):
    cfg = _cfg(tmp_path, tiny_model_dir, "data.make_synthetic_if_missing=false")
    with pytest.raises(FileNotFoundError, match="train.parquet' does not exist"):
        ensure_synthetic(cfg.data)


def test_a_synthetic_set_made_with_other_settings_is_used_with_a_warning(tmp_path, tiny_model_dir, caplog):
    from ivgr_dist.data.synthetic import generated_with

    cfg = _cfg(tmp_path, tiny_model_dir, "data.synthetic.num_records=20")
    ensure_synthetic(cfg.data)  # generates
    stored = generated_with(tmp_path / "data" / "train.parquet")
    assert stored["num_records"] == 20 and stored["colors"] == list(cfg.data.synthetic.colors)
    assert stored == generated_with(tmp_path / "data" / "val.parquet")
    with caplog.at_level("WARNING", logger="ivgr_dist.data.pipeline"):
        ensure_synthetic(cfg.data)  # same settings: reused silently
        assert not caplog.records
        other = _cfg(tmp_path, tiny_model_dir, "data.synthetic.num_records=20", "data.synthetic.colors=[red,blue]")
        ensure_synthetic(other.data)
    (warning,) = caplog.records
    assert "data.synthetic.colors" in warning.getMessage() and "['red', 'blue'] in the config" in warning.getMessage()
    assert "num_records" not in warning.getMessage()
    assert generated_with(tmp_path / "data" / "train.parquet") == stored  # left as it was


def test_a_tiny_model_of_another_family_is_not_used_silently(tmp_path, tiny_model_dir):
    from ivgr_dist.config import load_config

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    assert ensure_model(load_config(None, [f"model.path={model}"]).model) == model
    cfg = load_config(None, [f"model.path={model}", "model.tiny.family=qwen3_vl"])
    with pytest.raises(FileExistsError, match=r"holds a tiny qwen2_5_vl model but model.tiny.family='qwen3_vl'"):
        ensure_model(cfg.model)


def test_prepare_command_end_to_end(tmp_path, tiny_model_dir):
    exe = shutil.which("ivgr-dist")
    assert exe
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    args = [exe, "prepare", f"model.path={model}", f"data.train_files=[{tmp_path}/d/train.parquet]"]
    args += [f"data.val_files=[{tmp_path}/d/val.parquet]", "data.synthetic.num_records=64"]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["train_records"] + summary["val_records"] == 64
    batch = load_config(None).data.rollout_batch_size  # the embedded default
    assert summary["batch_prompts"] == batch and summary["data/bad_rows/total"] == 0
    assert "--- grounded prompt" in proc.stdout and "<box>[x1,y1,x2,y2]</box>" in proc.stdout

    bad = subprocess.run(
        [exe, "prepare", f"model.path={tmp_path}/absent", "model.make_tiny_if_missing=false"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert bad.returncode == 1 and "make_tiny_if_missing" in bad.stderr


def test_a_truncated_train_file_is_a_one_line_data_error(tmp_path, tiny_model_dir, capsys):
    """The synthetic-set staleness check opens the first train file before the record loader does: a damaged
    file gives the loader's one-line DataError naming it there too, not a pyarrow traceback."""
    from ivgr_dist.cli import main
    from ivgr_dist.config import SyntheticConfig
    from ivgr_dist.data.synthetic import make_synthetic

    data = tmp_path / "data"
    make_synthetic(data, SyntheticConfig(), num_records=12)
    train = data / "train.parquet"
    train.write_bytes(train.read_bytes()[: train.stat().st_size // 2])
    args = [f"model.path={tiny_model_dir}", f"data.train_files=[{train}]", f"data.val_files=[{data}/val.parquet]"]
    assert main(["prepare", *args]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"ivgr-dist prepare: {train}: cannot read as parquet ("), err
