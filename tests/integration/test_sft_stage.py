"""``run_sft`` end to end on local Ray: the learner group trains on templated targets, writes a model
directory that transformers loads (with new weights) and the vLLM rollout pool serves (via ``run_eval``),
and a finished output is reused rather than retrained."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.integration


def test_sft_trains_writes_a_loadable_model_and_is_reused(tiny_model_dir, tmp_path, ray_cluster):
    from safetensors.torch import load_file

    from ivgr_dist.commands.evaluate import run_eval
    from ivgr_dist.commands.sft import run_sft, sft_config_for_rl
    from ivgr_dist.config import SyntheticConfig, load_config
    from ivgr_dist.data.synthetic import make_synthetic
    from ivgr_dist.runtime.metrics import read_metrics

    make_synthetic(tmp_path / "data", SyntheticConfig(), num_records=24)
    data = tmp_path / "data"
    cfg = load_config(
        None,
        [
            f"model.path={tiny_model_dir}",
            f"data.train_files=[{data / 'train.parquet'}]",
            f"data.val_files=[{data / 'val.parquet'}]",
            f"trainer.output_dir={tmp_path / 'run'}",
            "trainer.loggers=[jsonl]",
            "sft.steps=12",
            "sft.batch_size=4",
            "sft.lr=2e-3",
            "rollout.num_engines=1",
            "rollout.max_response_length=24",
        ],
    )
    out = run_sft(cfg)
    assert out == tmp_path / "run" / "sft_model" and not (tmp_path / "run" / ".sft_model.tmp").exists()
    logs = read_metrics(tmp_path / "run" / "sft_logs" / "metrics.jsonl")
    assert [r["step"] for r in logs] == list(range(1, 13))
    nll = [r["loss/nll"] for r in logs]
    assert sum(nll[-3:]) / 3 < sum(nll[:3]) / 3 - 1.0, nll  # templated targets are easy to fit
    assert max(r["sft/epoch"] for r in logs) >= 1  # 48 draws from 21 records: wrapped around
    # sft.lr after a 1-step warm-up, constant: RL's learner.lr_schedule (cosine by default) is not used.
    assert {r["lr"] for r in logs} == {2e-3}

    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32)
    assert model.config.model_type == "qwen2_5_vl"
    base = load_file(str(tiny_model_dir / "model.safetensors"))
    trained = load_file(str(out / "model.safetensors"))
    assert set(base) == set(trained)
    changed = [k for k in base if not torch.equal(base[k].float(), trained[k].float())]
    assert len(changed) > 0.9 * len(base)

    stamp = (out / "model.safetensors").stat().st_mtime_ns
    assert run_sft(cfg) == out and (out / "model.safetensors").stat().st_mtime_ns == stamp  # reused

    rl = sft_config_for_rl(cfg)
    assert rl.model.path == str(out) and not rl.model.make_tiny_if_missing
    result = run_eval(rl, out, [data / "val.parquet"], "both", tmp_path / "eval")  # vLLM serves it
    assert result["tables"]["all"]["grounded"]["records"] >= 1


def test_sft_refuses_to_overwrite_its_own_base(tiny_model_dir, tmp_path):
    from ivgr_dist.commands.sft import run_sft
    from ivgr_dist.config import load_config

    cfg = load_config(None, [f"model.path={tmp_path / 'm'}", f"sft.output_dir={tmp_path / 'm'}"])
    with pytest.raises(ValueError, match="would overwrite its own base"):
        run_sft(cfg)
