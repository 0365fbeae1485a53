"""The Hugging Face export's files: config.json names the dtype its weights are stored in; the warm start is
exported in the engines' dtype."""

from __future__ import annotations

import json

import pytest

SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


def stored_dtypes(model_dir) -> set[str]:
    """The dtypes of every tensor in a model directory's safetensors files, as torch names them."""
    from safetensors import safe_open

    out = set()
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            out |= {SAFETENSORS_DTYPES[st.get_slice(k).get_dtype()] for k in st.keys()}
    return out


def assert_config_names_the_weights_dtype(model_dir, dtype: str) -> None:
    config = json.loads((model_dir / "config.json").read_text())
    assert stored_dtypes(model_dir) == {dtype}
    assert config["dtype"] == dtype
    assert config.get("torch_dtype", dtype) == dtype
    for sub in (v for v in config.values() if isinstance(v, dict)):
        assert sub.get("dtype", dtype) == dtype and sub.get("torch_dtype", dtype) == dtype


@pytest.mark.parametrize(("dtype", "shards"), [("bfloat16", 1), ("bfloat16", 3), ("float32", 1)])
def test_write_hf_model_config_dtype_is_the_weights_dtype(tiny_model_dir, tmp_path, dtype, shards):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from ivgr_dist.models.export import write_hf_model

    state = list(load_file(str(tiny_model_dir / "model.safetensors")).items())  # float32, as the learner holds it
    size = -(-len(state) // shards)
    write_hf_model(tmp_path / "hf", tiny_model_dir, [state[i : i + size] for i in range(0, len(state), size)], dtype)
    assert len(list((tmp_path / "hf").glob("*.safetensors"))) == shards
    assert_config_names_the_weights_dtype(tmp_path / "hf", dtype)
    assert AutoConfig.from_pretrained(tmp_path / "hf").dtype == getattr(torch, dtype)


def test_set_config_dtype_sets_every_entry():
    from ivgr_dist.models.export import set_config_dtype

    config = {"torch_dtype": "float32", "text_config": {"dtype": "float32", "x": 1}, "vision_config": {"y": 2}}
    assert set_config_dtype(config, "bfloat16") == {
        "torch_dtype": "bfloat16",
        "text_config": {"dtype": "bfloat16", "x": 1},
        "vision_config": {"y": 2},
    }


def test_the_warm_start_is_exported_in_the_engines_dtype(tiny_model_dir, tmp_path, monkeypatch):
    """run_sft writes its model in model.dtype (bf16 by default), not the base model's float32: the engines load
    it without converting every weight (vLLM logs a line for each)."""
    from ivgr_dist.commands.sft import run_sft
    from ivgr_dist.config import SyntheticConfig, load_config
    from ivgr_dist.data.synthetic import make_synthetic

    exported = []

    class FakeGroup:  # the learner group without Ray: one step, then the export call is recorded
        def __init__(self, *args, **kwargs):
            pass

        def load_batch(self, batch):
            return {}

        def train_step(self, mini_batch, objective="grpo"):
            return {"loss/nll": 1.0}

        def export_hf(self, path, dtype=None):
            exported.append(dtype)

        def shutdown(self):
            pass

    monkeypatch.setattr("ivgr_dist.learner.group.LearnerGroup", FakeGroup)
    make_synthetic(tmp_path / "data", SyntheticConfig(), num_records=12)
    cfg = load_config(
        None,
        [
            f"model.path={tiny_model_dir}",
            f"data.train_files=[{tmp_path / 'data' / 'train.parquet'}]",
            f"data.val_files=[{tmp_path / 'data' / 'val.parquet'}]",
            f"trainer.output_dir={tmp_path / 'run'}",
            "trainer.loggers=[jsonl]",
            "sft.steps=1",
            "sft.batch_size=2",
        ],
    )
    assert json.loads((tiny_model_dir / "config.json").read_text())["dtype"] == "float32"
    run_sft(cfg)
    assert exported == [cfg.model.dtype] == ["bfloat16"]


def _umask_mode() -> int:
    import os

    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def assert_umask_modes(directory) -> None:
    """Every file under ``directory`` has the mode a plain ``open()`` gives (0644 with umask 022), not 0600."""
    import os
    import stat

    files = [p for p in directory.rglob("*") if p.is_file()]
    assert files
    modes = {str(p.relative_to(directory)): oct(stat.S_IMODE(os.stat(p).st_mode)) for p in files}
    assert modes == dict.fromkeys(modes, oct(_umask_mode()))


@pytest.mark.parametrize("shards", [1, 2])
def test_exported_files_get_the_umask_mode(tiny_model_dir, tmp_path, shards):
    import shutil

    from safetensors.torch import load_file

    from ivgr_dist.models.export import write_hf_model

    src = tmp_path / "src"
    shutil.copytree(tiny_model_dir, src)
    (src / "tokenizer.json").chmod(0o600)  # a private source file: the copy is readable all the same
    state = list(load_file(str(src / "model.safetensors")).items())
    size = -(-len(state) // shards)
    write_hf_model(tmp_path / "hf", src, [state[i : i + size] for i in range(0, len(state), size)], "bfloat16")
    assert_umask_modes(tmp_path / "hf")


def test_the_tiny_model_files_get_the_umask_mode(tiny_model_dir):
    assert_umask_modes(tiny_model_dir)
