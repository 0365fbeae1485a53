"""``ivgr-dist preflight``'s checks, each on declared inputs: node resources, device memory and model dimensions
are given, the model and data are small real files. (Placement, storage, the judge request and the command
itself run against a loopback cluster declaring 2 nodes x 8 GPUs: tests/integration/test_preflight_cluster.py.)"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from safetensors.torch import load_file

from ivgr_dist.commands import preflight as pf
from ivgr_dist.config import SyntheticConfig, TinyModelConfig, load_config

GIB = 1 << 30
# Qwen2.5-VL-7B's text dimensions and parameter count (its public config.json; 8.29 B with the vision tower)
QWEN25_7B = pf.ModelFacts(
    family="qwen2_5_vl", factor=28, layers=28, hidden=3584, intermediate=18944, heads=28, kv_heads=4,
    head_dim=128, vocab=152064, params=8_292_166_656, largest_layer_params=233_057_792,
)  # fmt: skip


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    from ivgr_dist.models.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("m") / "tiny", TinyModelConfig())


@pytest.fixture(scope="module")
def big_images(tmp_path_factory) -> Path:
    """A synthetic set whose images are 900-2400 pixels a side (the recipe's images are that large)."""
    from ivgr_dist.data.synthetic import make_synthetic

    out = tmp_path_factory.mktemp("d") / "big"
    make_synthetic(out, SyntheticConfig(num_records=16, min_image_size=900, max_image_size=2400, val_fraction=0.25))
    return out


def _cfg(tiny: Path, data: Path, *overrides: str):
    return load_config(
        None,
        [
            f"model.path={tiny}",
            f"data.train_files=[{data}/train.parquet]",
            f"data.val_files=[{data}/val.parquet]",
            "data.make_synthetic_if_missing=false",
            *overrides,
        ],
    )


# ----------------------------------------------------------------------------------------- resources


def test_resources_name_an_engine_that_fits_on_no_single_node():
    cfg = load_config(None, ["rollout.tensor_parallel_size=2", "rollout.num_engines=1", "learner.num_ranks=1"])
    one_gpu_nodes = [{"CPU": 8.0, "GPU": 1.0}, {"CPU": 8.0, "GPU": 1.0}]
    check = pf.check_resources(cfg, one_gpu_nodes, gpus=True)
    assert check.blocker and "rollout engine 0 needs" in check.detail and "on ONE node" in check.detail, check
    # the same GPUs on one node: fits
    assert pf.check_resources(cfg, [{"CPU": 16.0, "GPU": 3.0}], gpus=True).status == "ok"


def test_resources_name_what_the_cluster_lacks_in_total():
    cfg = load_config(None, ["rollout.num_engines=4", "learner.num_ranks=8"])
    check = pf.check_resources(cfg, [{"CPU": 64.0, "GPU": 8.0}], gpus=True)
    assert check.blocker and "GPU 12 (cluster has 8)" in check.detail, check
    # on a CPU cluster the same roles need CPUs only
    assert pf.check_resources(cfg, [{"CPU": 64.0}], gpus=False).status == "ok"


def test_resources_count_custom_node_labels():
    cfg = load_config(None, ["rollout.resources={rollout_node: 1}"])
    check = pf.check_resources(cfg, [{"CPU": 16.0}], gpus=False)
    assert check.blocker and "rollout_node" in check.detail, check
    assert pf.check_resources(cfg, [{"CPU": 16.0, "rollout_node": 4.0}], gpus=False).status == "ok"


# ------------------------------------------------------------------------------------------------ model


def test_model_counts_parameters_from_safetensors_headers(tiny):
    cfg = load_config(None, [f"model.path={tiny}"])
    check, facts = pf.check_model(cfg)
    assert check.status == "ok", check
    weights = load_file(str(tiny / "model.safetensors"))
    assert facts.params == sum(t.numel() for t in weights.values())
    assert facts.family == "qwen2_5_vl" and facts.factor == 28 and facts.layers == TinyModelConfig().num_layers


def test_model_missing_or_unsupported_is_a_blocker(tiny, tmp_path):
    check, _ = pf.check_model(
        load_config(None, [f"model.path={tmp_path / 'none'}", "model.make_tiny_if_missing=false"])
    )
    assert check.blocker and "no config.json" in check.detail
    # missing but the run builds the tiny model there: not a blocker
    check, _ = pf.check_model(load_config(None, [f"model.path={tmp_path / 'none'}"]))
    assert check.status == "skip"
    other = tmp_path / "llama"
    other.mkdir()
    (other / "config.json").write_text('{"model_type": "llama"}')
    check, _ = pf.check_model(load_config(None, [f"model.path={other}", "model.make_tiny_if_missing=false"]))
    assert check.blocker and "model_type='llama'" in check.detail


def test_model_pixel_bounds_outside_the_processor_are_a_blocker(tiny):
    check, _ = pf.check_model(load_config(None, [f"model.path={tiny}", "data.max_pixels=3211264"]))
    assert check.blocker and "data.max_pixels=3211264" in check.detail


# ------------------------------------------------------------------------------------------------- data


def test_data_wrong_column_type_or_missing_file_is_a_blocker(tiny, big_images, tmp_path):
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"problem": ["q"], "answer": [7.0]}), bad)
    cfg = _cfg(tiny, big_images, f"data.val_files=[{bad}]")
    check, _ = pf.check_data(cfg, None)
    assert check.blocker and "'answer'" in check.detail and "double" in check.detail, check
    cfg = _cfg(tiny, big_images, f"data.val_files=[{tmp_path}/nope.parquet]")
    check, _ = pf.check_data(cfg, None)
    assert check.blocker and "nope.parquet does not exist" in check.detail


def test_data_sample_counts_prompts_too_long(tiny, big_images):
    cfg = _cfg(tiny, big_images, "data.max_pixels=200704", "data.max_prompt_length=300")
    _, facts = pf.check_model(cfg)
    check, data = pf.check_data(cfg, facts)
    assert data.sample_rows == 12 and data.filtered_long > 0, data
    assert check.status == "warn" and "too long for data.max_prompt_length=300" in check.detail
    cfg = _cfg(tiny, big_images)
    check, data = pf.check_data(cfg, facts)
    assert check.status == "ok" and data.filtered_long == 0 and 256 < data.median_prompt_tokens <= 512, check


# ----------------------------------------------------------------------------------------- token budget


def test_token_budget_fails_when_the_largest_image_does_not_fit(tiny, big_images):
    cfg = _cfg(tiny, big_images, "data.max_prompt_length=300")  # an image at 200704 pixels is 256 tokens
    _, facts = pf.check_model(cfg)
    _, data = pf.check_data(cfg, facts)
    check = pf.check_token_budget(cfg, facts, data)
    assert check.blocker and "256 tokens" in check.detail and "> data.max_prompt_length=300" in check.detail, check
    assert pf.check_token_budget(_cfg(tiny, big_images), facts, data).status == "ok"
    # without a sample, the template's own length is counted
    no_sample = pf.check_token_budget(cfg, facts, pf.DataFacts())
    assert no_sample.blocker and "the prompt template" in no_sample.detail


# ---------------------------------------------------------------------------------------------- memory


def _recipe(*overrides: str):
    return load_config(Path(__file__).resolve().parents[2] / "configs" / "qwen2_5_vl_7b.yaml", list(overrides))


def test_kv_cache_against_max_model_len_and_max_num_seqs():
    data = pf.DataFacts(median_prompt_tokens=2000)
    check = pf.check_kv_cache(_recipe(), QWEN25_7B, data, 80 * GIB, gpus=True)
    assert check.status == "warn" and "max_num_seqs=512" in check.detail, check  # 80 GiB x 2: ~300 sequences
    assert pf.check_kv_cache(_recipe("rollout.engine.max_num_seqs=64"), QWEN25_7B, data, 80 * GIB, True).status == "ok"
    small = pf.check_kv_cache(_recipe(), QWEN25_7B, data, 11 * GIB, gpus=True)  # 2 x 11 GiB: the weights, no KV
    assert small.blocker and "vLLM refuses to start" in small.detail, small
    assert pf.check_kv_cache(_recipe(), QWEN25_7B, data, None, gpus=True).status == "skip"


def test_learner_memory_per_rank():
    check = pf.check_learner_memory(_recipe(), QWEN25_7B, 80 * GIB, gpus=True)
    assert check.status == "ok" and "per rank of 8" in check.detail, check
    need, _ = pf.learner_bytes_per_rank(_recipe(), QWEN25_7B)
    assert 16 * QWEN25_7B.params / 8 < need < 80 * GIB
    one_rank = pf.check_learner_memory(_recipe("learner.num_ranks=1"), QWEN25_7B, 80 * GIB, gpus=True)
    assert one_rank.blocker and "does not fit" in one_rank.detail  # 16 bytes x 8.3 B parameters on one GPU
    no_ckpt, _ = pf.learner_bytes_per_rank(_recipe("learner.gradient_checkpointing=false"), QWEN25_7B)
    assert no_ckpt > need
    assert pf.check_learner_memory(_recipe(), QWEN25_7B, None, gpus=False).status == "skip"


# ------------------------------------------------------------------------------------------------- ray


def test_ray_auth_disabled_on_several_nodes_is_a_warning(monkeypatch):
    import ray._private.authentication.authentication_utils as auth

    nodes = [{"id": "a" * 16, "ip": "10.0.0.1", "resources": {}}, {"id": "b" * 16, "ip": "10.0.0.2", "resources": {}}]
    monkeypatch.setattr(auth, "is_token_auth_enabled", lambda: False)
    check = pf.check_ray(nodes)
    assert check.status == "warn" and "RAY_AUTH_MODE=token" in check.detail
    assert pf.check_ray(nodes[:1]).status == "ok"
    monkeypatch.setattr(auth, "is_token_auth_enabled", lambda: True)
    assert pf.check_ray(nodes).status == "ok" and "token" in pf.check_ray(nodes).detail


def test_table_lists_every_check():
    checks = [pf.Check("model", "ok", "fine"), pf.Check("token budget", "FAIL", "x " * 80)]
    text = pf.format_table(checks)
    assert "model" in text and "FAIL" in text and len(text.splitlines()) >= 4
