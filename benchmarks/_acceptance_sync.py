"""The weight-transfer part of benchmarks/gpu_acceptance.py: a TP=2 vLLM engine, 2 learner ranks, a collective
push and the ``sync.verify`` probe. Kept apart so that the acceptance script's learner path never imports Ray,
vLLM or OmegaConf: this module imports them only after finding that they import."""

from __future__ import annotations

import os
import time
import traceback
from pathlib import Path


def importable(name: str) -> bool:
    """True when ``import name`` works (a package that is present but fails to import counts as absent)."""
    import importlib

    try:
        importlib.import_module(name)
    except Exception:  # noqa: BLE001 - ImportError, or an install that is broken on this machine
        return False
    return True


def weight_sync_check(device_type: str, model_dir: str, work: Path, timeout_s: float) -> dict:
    """A TP=2 vLLM engine, one GRPO update on 2 learner ranks (Ray actors), a push by the collective backend
    (``nccl`` on CUDA, ``gloo`` on CPU) and the ``sync.verify`` probe before (stale: must fail) and after the push
    (must pass). Runs only where vllm and ray import; on CUDA it needs 4 devices (NCCL puts no two ranks on one
    device: 2 engine TP ranks + 2 learner ranks)."""
    missing = [name for name in ("vllm", "ray", "omegaconf") if not importable(name)]
    if missing:
        return {"status": "skipped", "reason": f"skipped: {', '.join(missing)} not importable"}
    import torch

    cuda = device_type == "cuda"
    if cuda and torch.cuda.device_count() < 4:
        return {
            "status": "skipped",
            "reason": f"skipped: {torch.cuda.device_count()} CUDA device(s); the NCCL push needs 4 "
            "(a TP=2 engine and 2 learner ranks, one device each)",
        }
    import ray

    from ivgr_dist.config import load_config
    from ivgr_dist.data.pipeline import build_pipeline
    from ivgr_dist.learner.group import LearnerGroup
    from ivgr_dist.learner.grpo import group_advantages
    from ivgr_dist.learner.step_data import StepBatch
    from ivgr_dist.rollout.pool import RolloutPool
    from ivgr_dist.runtime.startup import worker_runtime_env
    from ivgr_dist.sync import make_weight_sync
    from ivgr_dist.sync.verify import WeightVerifier

    t0 = time.perf_counter()
    backend = "nccl" if cuda else "gloo"
    data = work / "sync-data"
    cfg = load_config(
        None,
        [
            f"model.path={model_dir}",
            f"data.train_files=[{data}/train.parquet]",
            f"data.val_files=[{data}/val.parquet]",
            "data.synthetic.num_records=16",
            "data.rollout_batch_size=4",
            "rollout.num_engines=1",
            "rollout.tensor_parallel_size=2",
            "rollout.n=4",
            "rollout.max_response_length=16",
            "learner.num_ranks=2",
            "learner.cpus_per_rank=0" if not cuda else "learner.cpus_per_rank=1",
            "learner.lr=1e-3",
            "learner.warmup_ratio=0",
            "algorithm.kl_coef=0",
            f"sync.backend={backend}",
        ],
    )
    out: dict = {"backend": backend, "tensor_parallel_size": 2, "learner_ranks": 2}
    ray.init(
        num_cpus=max(8, os.cpu_count() or 1),
        num_gpus=torch.cuda.device_count() if cuda else 0,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env=worker_runtime_env(),
    )
    sync = pool = learners = None
    try:
        sync = make_weight_sync(backend, cuda, cfg.sync.bucket_mb << 20, cfg.model.dtype, cfg.sync.timeout_s)
        pool = RolloutPool(cfg.model, cfg.rollout, sync.engine_backend, cuda, start_timeout_s=timeout_s)
        learners = LearnerGroup(cfg.model, cfg.learner, cfg.algorithm, total_steps=1, timeout_s=timeout_s)
        sync.setup(learners, pool)
        out["engines_started_s"] = time.perf_counter() - t0
        prompts = build_pipeline(cfg.model, cfg.data).next_prompts()
        rollouts = [r for g in pool.generate(prompts[:4]) for r in g]
        for r in rollouts:
            r.reward = float(r.sample_idx)
        adv = group_advantages(torch.tensor([r.reward for r in rollouts]), [r.group_key for r in rollouts])
        for r, a in zip(rollouts, adv.tolist(), strict=True):
            r.advantage = a
        learners.load_batch(StepBatch.from_rollouts(rollouts))
        out["grpo_step"] = {k: v for k, v in learners.train_step(0, cfg.rollout.temperature).items() if "loss" in k}
        verifier = WeightVerifier(cfg.sync.verify_tolerance)
        verifier.choose_probe(rollouts)
        out["verify_before_push"] = _floats(verifier.check(learners, pool, 0))  # the engine still has the old weights
        t1 = time.perf_counter()
        out["push"] = sync.push(learners, pool, version=1)
        out["push_s"] = time.perf_counter() - t1
        out["verify_after_push"] = _floats(verifier.check(learners, pool, 1))
        out["engine_versions"] = pool.versions()
    except Exception as exc:  # noqa: BLE001 - the verdict names it
        out.update(status="failed", error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc(limit=8))
        return out
    finally:
        for part in (learners, pool):
            if part is not None:
                part.shutdown()
        if sync is not None:
            sync.close()
        ray.shutdown()
    bad = []
    if out["verify_after_push"].get("sync/verified") != 1.0:
        bad.append(f"the probe disagrees after the push: {out['verify_after_push']}")
    if out["verify_before_push"].get("sync/verified") != 0.0:
        bad.append(f"the probe did not see the stale engine before the push: {out['verify_before_push']}")
    if out["engine_versions"] != [1]:
        bad.append(f"engine versions {out['engine_versions']} after pushing version 1")
    out.update(status="failed" if bad else "ran", failures=bad, total_s=time.perf_counter() - t0)
    return out


def _floats(metrics: dict) -> dict:
    return {k: float(v) for k, v in metrics.items()}
