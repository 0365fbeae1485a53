"""The FSDP2 learner on the tiny Qwen2.5-VL: one rank in this process (gloo over tcp), then a Ray
learner group of 2 ranks checked against 1 rank on the same global batch."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from ivgr_dist.config import AlgorithmConfig, LearnerConfig, ModelConfig
from ivgr_dist.learner.batch import SampleEncoder
from ivgr_dist.learner.step_data import StepBatch, place
from ivgr_dist.learner.worker import LearnerWorker, pick_master_address
from ivgr_dist.types import Prompt, Rollout
from support.weights import full_state

pytestmark = pytest.mark.integration

TEMPERATURE = 0.8
BUDGET = 192  # tokens per micro-batch: forces several micro-batches on the samples below


def _rollouts(processor, groups: list[tuple[tuple[int, int] | None, list[tuple[float, int]]]]) -> list[Rollout]:
    """One prompt per group (an image of the given size, or text only), one rollout per
    ``(advantage, response length)``."""
    tok = processor.tokenizer
    out = []
    for g, (size, rollouts) in enumerate(groups):
        content = ([{"type": "image"}] if size else []) + [{"type": "text", "text": "What color is the shape?"}]
        text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        images = []
        if size:
            img = Image.new("RGB", size, "white")
            ImageDraw.Draw(img).ellipse((4, 4, size[0] // 2, size[1] // 2), fill=(200, 40 * g % 255, 30))
            images = [img]
        n_tokens = processor(text=[text], images=images or None, return_tensors="pt")["input_ids"].shape[1]
        ids = tok(text, add_special_tokens=False)["input_ids"]
        prompt = Prompt(g, "textual", text, ids, n_tokens, "red", "exact", "test", images=images)
        for k, (adv, length) in enumerate(rollouts):
            response = [(37 * g + 11 * k + 7 * t) % 500 + 20 for t in range(length)]
            out.append(Rollout(prompt, k, response, "", [0.0] * len(response), 0, advantage=adv))
    return out


@pytest.fixture(scope="module")
def encoder(tiny_model_dir):
    return SampleEncoder(tiny_model_dir)


@pytest.fixture(scope="module")
def rollouts(encoder):
    # Sized so that the 2-rank split puts both image groups on one rank and both text-only groups
    # (shorter, more per micro-batch) on the other: see the checks in the Ray test.
    groups = [
        ((112, 84), [(1.0, 20), (-1.0, 24), (0.5, 28)]),
        (None, [(-0.5, 4), (0.5, 6), (0.9, 8)]),
        (None, [(0.7, 5), (-0.7, 3)]),
        ((56, 56), [(1.2, 30)]),
    ]
    return _rollouts(encoder.processor, groups)


@pytest.fixture(scope="module")
def samples(encoder, rollouts):
    return encoder.samples(StepBatch.from_rollouts(rollouts))


def _cfgs(model_dir, **learner):
    learner = {"micro_batch_tokens": BUDGET, "lr": 1e-3, "num_ranks": 1, **learner}
    return ModelConfig(path=str(model_dir)), LearnerConfig(**learner)


@pytest.fixture(scope="module")
def make_worker(tiny_model_dir):
    """Builds single-rank workers in this process; one process group at a time, so the previous
    worker is closed first."""
    live: list[LearnerWorker] = []

    def make(kl_coef: float = 0.01, model_dir=None, **learner) -> LearnerWorker:
        while live:
            live.pop().close()
        model_cfg, learner_cfg = _cfgs(model_dir or tiny_model_dir, **learner)
        w = LearnerWorker(model_cfg, learner_cfg, AlgorithmConfig(kl_coef=kl_coef), 0, 1, total_steps=10)
        w.init_distributed("127.0.0.1", pick_master_address()[1])
        live.append(w)
        return w

    yield make
    while live:
        live.pop().close()


def _with_logprobs(worker, samples):
    """Copies of ``samples`` carrying reference log-probs, and old log-probs a little off-policy."""
    out = copy.deepcopy(samples)
    ref = worker.logprobs(out, "reference", TEMPERATURE)
    for s, r in zip(out, ref, strict=True):
        s.ref_logprobs = r
        s.old_logprobs = [x + (0.3 if k % 3 == 0 else -0.05) for k, x in enumerate(r)]
    return out


def _hf_logprobs(model, encoder, sample, temperature):
    """log_softmax(logits / T) gathered at the response tokens, from a plain transformers forward."""
    ids = torch.tensor([sample.input_ids])
    kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    kwargs["mm_token_type_ids"] = (ids == encoder.image_pad_id).long()
    if sample.pixel_values is not None:
        kwargs.update(pixel_values=sample.pixel_values, image_grid_thw=sample.image_grid_thw)
    with torch.no_grad():
        logits = model(**kwargs).logits[0].float()
    logp = torch.log_softmax(logits[:-1] / temperature, dim=-1).gather(1, ids[0, 1:, None])[:, 0]
    return logp[sample.prompt_len - 1 :]


# ------------------------------------------------------------------------------ one rank, in process


def test_logprobs_equal_a_plain_transformers_forward(make_worker, encoder, samples, tiny_model_dir):
    from transformers import Qwen2_5_VLForConditionalGeneration

    worker = make_worker()
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    policy = worker.logprobs(samples, "policy", TEMPERATURE)
    reference = worker.logprobs(samples, "reference", TEMPERATURE)
    for s, got, ref in zip(samples, policy, reference, strict=True):
        want = _hf_logprobs(model, encoder, s, TEMPERATURE)
        assert len(got) == s.response_len
        torch.testing.assert_close(torch.tensor(got), want, rtol=0, atol=1e-5)
        torch.testing.assert_close(torch.tensor(ref), want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_packed_rows_give_the_padded_batches_log_probs_and_loss(family, make_worker, request):
    """Packing (one row per micro-batch, SDPA within each sequence, per-sequence rotary positions) computes
    what padded rectangles compute, to 1e-5 in fp32, for both model families; and it pads nothing."""
    model_dir = request.getfixturevalue("tiny_model_dir" if family == "qwen2_5_vl" else "tiny_qwen3_dir")
    enc = SampleEncoder(model_dir)
    groups = [
        ((112, 84), [(1.0, 20), (-1.0, 24), (0.5, 28)]),
        (None, [(-0.5, 4), (0.5, 6)]),
        ((64, 96), [(0.7, 9), (-0.7, 13)]),
    ]
    samples = enc.samples(StepBatch.from_rollouts(_rollouts(enc.processor, groups)))
    results = {}
    for packed in (True, False):
        worker = make_worker(model_dir=model_dir, pack_sequences=packed, micro_batch_tokens=256)
        ref = worker.logprobs(samples, "reference", TEMPERATURE)
        batch = copy.deepcopy(samples)
        for s, r in zip(batch, ref, strict=True):
            s.ref_logprobs, s.old_logprobs = r, r + 0.1
        results[packed] = (ref, worker.update(batch, TEMPERATURE), full_state(worker))
    (lp_p, m_p, s_p), (lp_u, m_u, s_u) = results[True], results[False]
    for a, b in zip(lp_p, lp_u, strict=True):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=0, atol=1e-5)
    for key in ("loss/policy", "loss/kl", "grad_norm", "learner/tokens"):
        assert m_p[key] == pytest.approx(m_u[key], rel=1e-4, abs=1e-6), key
    assert m_p["learner/padding_ratio"] == 0.0 < m_u["learner/padding_ratio"]
    from safetensors.torch import load_file

    start = load_file(str(model_dir / "model.safetensors"))
    diff = sum(float((s_p[k] - s_u[k]).double().square().sum()) for k in start) ** 0.5
    update = sum(float((s_p[k] - start[k]).double().square().sum()) for k in start) ** 0.5
    assert update > 0 and diff / update < 1e-3, (diff, update)  # the same update, up to float rounding


def test_sharded_initialisation_loads_the_checkpoint_exactly(make_worker, tiny_qwen3_dir):
    """Meta-device build + each rank's rows read from safetensors == the checkpoint (and == transformers'
    own loading with learner.sharded_init=false)."""
    from safetensors import safe_open

    with safe_open(str(tiny_qwen3_dir / "model.safetensors"), "pt") as f:
        want = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    for sharded in (True, False):
        got = full_state(make_worker(model_dir=tiny_qwen3_dir, sharded_init=sharded))
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k].float()) for k in want), sharded


def test_train_step_changes_params_and_reports_finite_metrics(make_worker, samples):
    worker = make_worker()
    batch = _with_logprobs(worker, samples)
    before = worker.state_checksum()
    metrics = worker.update(batch, TEMPERATURE)
    after = worker.state_checksum()
    assert set(before) == set(after)
    assert sum(before[k] != after[k] for k in before) > 0.9 * len(before)
    assert all(isinstance(v, float) and math.isfinite(v) for v in metrics.values()), metrics
    assert metrics["learner/tokens"] == sum(s.response_len for s in samples)
    assert metrics["learner/micro_batches"] >= 2 and metrics["grad_norm"] > 0
    assert metrics["loss/kl"] >= 0 and metrics["clip/frac"] > 0  # old log-probs were moved by 0.3
    assert metrics["loss/total"] == pytest.approx(metrics["loss/policy"] + 0.01 * metrics["loss/kl"], abs=1e-6)


def test_zero_advantages_without_kl_only_apply_weight_decay(make_worker, samples):
    worker = make_worker(kl_coef=0.0, weight_decay=0.1)
    batch = copy.deepcopy(samples)
    for s in batch:
        s.advantage = 0.0
    with pytest.raises(ValueError, match="no reference policy"):
        worker.logprobs(batch[:1], "reference", TEMPERATURE)
    before = full_state(worker)
    metrics = worker.update(batch, TEMPERATURE)
    after = full_state(worker)
    # Zero advantages give exactly zero gradients, so AdamW's moment update adds exactly nothing and
    # only the decoupled decay p <- p * (1 - lr * wd) remains.
    assert metrics["grad_norm"] == 0.0
    decay = 1.0 - metrics["lr"] * 0.1
    for name, p in before.items():
        torch.testing.assert_close(after[name], p * decay, rtol=1e-6, atol=1e-9)
        assert not torch.equal(after[name], p) or not p.any()


def test_sft_objective_is_the_token_mean_nll_and_lowers_it(make_worker, encoder, samples, tiny_model_dir):
    """``objective="sft"``: loss/nll is the token mean of -log p(response) over ALL samples (advantages and
    old/ref log-probs play no part), and repeated steps on the same batch drive it down."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    worker = make_worker(kl_coef=0.0, grad_clip=1.0)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    logps = torch.cat([_hf_logprobs(model, encoder, s, 1.0) for s in samples])
    metrics = worker.update(samples, objective="sft")
    assert metrics["loss/nll"] == pytest.approx(-float(logps.mean()), abs=1e-4)
    assert "loss/policy" not in metrics and metrics["grad_norm"] > 0
    for _ in range(5):
        last = worker.update(samples, objective="sft")
    assert last["loss/nll"] < metrics["loss/nll"] - 0.5
    with pytest.raises(ValueError, match="objective='dpo'"):
        worker.update(samples, objective="dpo")


def _optim_state(worker) -> dict:
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    state = get_optimizer_state_dict(worker.policy, worker.optimizer)["state"]
    return {
        (k, f): v.full_tensor().clone() if hasattr(v, "full_tensor") else v
        for k, d in state.items()
        for f, v in d.items()
    }


def test_checkpoint_round_trip_is_exact(make_worker, samples, tmp_path):
    worker = make_worker()
    batch = _with_logprobs(worker, samples)
    worker.update(batch, TEMPERATURE)
    worker.save_checkpoint(tmp_path / "ckpt")
    saved_params, saved_optim, saved_step = full_state(worker), _optim_state(worker), worker.step
    saved_lr = worker.scheduler.get_last_lr()
    worker.update(batch, TEMPERATURE)
    continued = full_state(worker)
    assert not torch.equal(continued["lm_head.weight"], saved_params["lm_head.weight"])
    worker.load_checkpoint(tmp_path / "ckpt")
    for name, p in full_state(worker).items():
        assert torch.equal(p, saved_params[name]), name
    restored = _optim_state(worker)
    assert restored.keys() == saved_optim.keys()
    for key, value in saved_optim.items():
        assert torch.equal(torch.as_tensor(restored[key]), torch.as_tensor(value)), key
    assert worker.step == saved_step and worker.scheduler.get_last_lr() == saved_lr
    worker.update(batch, TEMPERATURE)  # resuming repeats the update that followed the save
    for name, p in full_state(worker).items():
        torch.testing.assert_close(p, continued[name], rtol=0, atol=1e-7)


def test_a_checkpoint_that_does_not_load_raises_corrupt_and_the_previous_one_restores_exactly(
    make_worker, samples, tmp_path
):
    """DCP reads into the live parameters: a truncated shard fails part-way (CorruptCheckpoint, naming the rank),
    and loading the previous checkpoint then restores every parameter and the step exactly."""
    from ivgr_dist.driver.checkpoints import CorruptCheckpoint

    worker = make_worker()
    batch = _with_logprobs(worker, samples)
    worker.update(batch, TEMPERATURE)
    worker.save_checkpoint(tmp_path / "a")
    saved, saved_step = full_state(worker), worker.step
    worker.update(batch, TEMPERATURE)
    worker.save_checkpoint(tmp_path / "b")
    shard = next((tmp_path / "b").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(CorruptCheckpoint, match=r"learner rank 0: DCP cannot load .*/b"):
        worker.load_checkpoint(tmp_path / "b")
    worker.load_checkpoint(tmp_path / "a")
    assert worker.step == saved_step
    for name, p in full_state(worker).items():
        assert torch.equal(p, saved[name]), name


def test_export_hf_swaps_the_model_in_without_a_moment_missing(make_worker, tmp_path, monkeypatch):
    """A reader (an eval, a serving process) of the exported model never finds it missing while exports replace
    it; an export that fails while writing leaves the previous model and no temporary directory."""
    import errno
    import json
    import threading

    worker = make_worker()
    final = tmp_path / "hf"
    worker.export_hf(final)
    stop, missing, reads = threading.Event(), [], [0]

    def watch():
        while not stop.is_set():
            try:
                json.loads((final / "config.json").read_text())
                reads[0] += 1
            except FileNotFoundError:
                missing.append(1)

    reader = threading.Thread(target=watch)
    reader.start()
    try:
        for _ in range(3):
            worker.export_hf(final)
    finally:
        stop.set()
        reader.join()
    assert not missing and reads[0] > 0
    before = (final / "model.safetensors").read_bytes()

    def full(out, *args, **kwargs):
        out.mkdir()
        (out / "model.safetensors").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("ivgr_dist.models.export.write_hf_model", full)
    with pytest.raises(OSError, match="No space left"):
        worker.export_hf(final)
    assert (final / "model.safetensors").read_bytes() == before and (final / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no half-written .hf.tmp holding the disk


def test_export_hf_loads_in_transformers_with_the_same_weights_and_logits(make_worker, encoder, samples, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    worker = make_worker()
    worker.update(_with_logprobs(worker, samples), TEMPERATURE)
    worker.export_hf(tmp_path / "hf")
    state = full_state(worker)
    exported = load_file(tmp_path / "hf" / "model.safetensors")
    assert exported.keys() == state.keys()
    assert all(torch.equal(exported[k], state[k]) for k in state)
    AutoProcessor.from_pretrained(tmp_path / "hf")
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    ours = worker.logprobs(samples, "policy", TEMPERATURE)
    for s, got in zip(samples, ours, strict=True):
        torch.testing.assert_close(torch.tensor(got), _hf_logprobs(model, encoder, s, TEMPERATURE), rtol=0, atol=1e-5)


def test_export_hf_config_json_names_the_dtype_of_its_weights(make_worker, tmp_path):
    import json

    from safetensors import safe_open

    worker = make_worker()  # a float32 base model and learner
    worker.export_hf(tmp_path / "hf", dtype="bfloat16")  # the engines' dtype (the trainer's and the warm start's)
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and config.get("torch_dtype", "bfloat16") == "bfloat16"


def test_export_and_checkpoint_files_get_the_umask_mode(make_worker, tmp_path):
    """Not 0600 (safetensors writes through a private temporary file): other users of a shared cluster read them."""
    import os
    import stat

    mask = os.umask(0o022)
    os.umask(mask)
    worker = make_worker()
    worker.export_hf(tmp_path / "hf", dtype="bfloat16")
    worker.save_checkpoint(tmp_path / "ckpt")
    for directory in (tmp_path / "hf", tmp_path / "ckpt"):
        files = [p for p in directory.rglob("*") if p.is_file()]
        assert files and {p.name: stat.S_IMODE(p.stat().st_mode) for p in files} == dict.fromkeys(
            (p.name for p in files), 0o666 & ~mask
        )


# -------------------------------------------------------------------------------------- Ray group


def test_two_ranks_update_like_one_rank_on_the_same_global_batch(ray_cluster, rollouts, tiny_model_dir):
    from safetensors import safe_open

    from ivgr_dist.learner.group import LearnerGroup

    batch = StepBatch.from_rollouts(rollouts)
    # The 2-rank placement puts the text-only records on one rank (dummy-image path) and gives the ranks
    # different token counts (a per-rank denominator would weight them differently).
    shards = [r[0] for r in place(batch, [list(range(len(batch)))], 2)]
    assert any(all(not batch.prompt_images[batch.sample_prompt[i]] for i in s) for s in shards)
    response = np.diff(batch.response_offsets)
    assert len({int(response[s].sum()) for s in shards}) == 2
    results = {}
    for n in (1, 2):
        model_cfg, learner_cfg = _cfgs(tiny_model_dir, num_ranks=n, cpus_per_rank=1)
        group = LearnerGroup(model_cfg, learner_cfg, AlgorithmConfig(), total_steps=10, timeout_s=300)
        try:
            if n == 2:  # sharded initialisation: each rank read its own rows; gathered, they are the checkpoint
                with safe_open(str(tiny_model_dir / "model.safetensors"), "pt") as f:
                    loaded = full_state(group)
                    assert loaded.keys() == set(f.keys())
                    assert all(torch.equal(loaded[k], f.get_tensor(k)) for k in loaded)
            group.load_batch(batch)
            old = group.compute_logprobs("policy", TEMPERATURE)
            ref = group.compute_logprobs("reference", TEMPERATURE)
            assert [len(x) for x in ref] == response.tolist()
            # one sample on two ranks: rank 1 has nothing and runs a dummy forward; the loaded step stays
            alone = group.score(batch.select([0]), "reference", TEMPERATURE)[0]
            torch.testing.assert_close(torch.tensor(alone), torch.tensor(ref[0]), rtol=0, atol=1e-5)
            metrics = group.train_step(0, TEMPERATURE)
            results[n] = (ref, metrics, full_state(group))
            torch.testing.assert_close(torch.tensor(np.concatenate(old)), torch.tensor(np.concatenate(ref)))
            if n == 2:
                group.load_batch(batch.select([0]))
                group.compute_logprobs("reference", TEMPERATURE)
                lonely = group.train_step(0, TEMPERATURE)
                assert lonely["learner/dummy_micro_batches"] == 1 and math.isfinite(lonely["grad_norm"])
                with pytest.raises(RuntimeError, match=r"learner rank \d failed in compute_logprobs\(bogus\)"):
                    group.compute_logprobs("bogus")
        finally:
            group.shutdown()
    (lp1, m1, s1), (lp2, m2, s2) = results[1], results[2]
    for a, b in zip(lp1, lp2, strict=True):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=0, atol=1e-5)
    for key in ("loss/policy", "loss/kl", "grad_norm", "clip/frac", "learner/tokens"):
        assert m2[key] == pytest.approx(m1[key], rel=1e-5, abs=1e-7), key
    # Compare the updates (not the weights, which hide them): they agree up to float rounding.
    # (Elements whose gradient is ~1e-8, Adam's eps, amplify rounding, hence a norm, not a max.)
    with safe_open(str(tiny_model_dir / "model.safetensors"), "pt") as f:
        start = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    assert s1.keys() == s2.keys() == start.keys()  # names are exactly the checkpoint's keys
    diff = sum(float((s1[k] - s2[k]).double().square().sum()) for k in start) ** 0.5
    update = sum(float((s1[k] - start[k]).double().square().sum()) for k in start) ** 0.5
    assert update > 0 and diff / update < 1e-3, (diff, update)
