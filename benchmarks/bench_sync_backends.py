"""Weight-sync backends side by side, one run; prints ONE JSON line.

The same random Qwen2.5-VL (default ~25 M parameters: text hidden 512, 8 layers), the same learner group
(FSDP2 over gloo, 2 ranks) and 2 engines per backend, on a local Ray cluster:

- ``shm``: ``ivgr_shm`` pushes (every rank writes its shards to /dev/shm, every engine reads them);
- ``gloo``: the collective backend (learner rank 0 broadcasts packed bf16 buckets to every engine worker);
- ``bcast``: the floor of the gloo push: a plain gloo broadcast of the SAME bytes in the same buckets
  between 1 + engines bare processes (no learner gather, no vLLM load).

Each backend pushes ``--pushes`` times (the first is a warm-up). Reported: median push seconds, and the
ratios ``gloo_over_shm`` and ``gloo_over_bcast`` measured in this one run (the machine is shared: compare
ratios, not seconds across runs).

    python benchmarks/bench_sync_backends.py [--hidden 512] [--layers 8] [--engines 2] [--pushes 4]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def _bcast_rank(rank: int, world: int, port: int, sizes: list[int], pushes: int, q) -> None:
    import torch

    from ivgr_dist.sync.collective import broadcast, open_group

    group = open_group("127.0.0.1", port, rank, world, "gloo", timeout_s=120)
    bufs = [torch.zeros(n, dtype=torch.uint8) for n in sizes]
    times = []
    for _ in range(pushes):
        t0 = time.perf_counter()
        for b in bufs:
            broadcast(group, b)
        times.append(time.perf_counter() - t0)
    q.put((rank, times))


def plain_broadcast(sizes: list[int], receivers: int, pushes: int) -> list[float]:
    """Seconds per push of a bare gloo broadcast of ``sizes`` (bytes per bucket) to ``receivers`` processes."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    world = 1 + receivers
    procs = [ctx.Process(target=_bcast_rank, args=(r, world, port, sizes, pushes, q)) for r in range(world)]
    for p in procs:
        p.start()
    results = dict(q.get(timeout=600) for _ in range(world))
    for p in procs:
        p.join(timeout=60)
    return results[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--engines", type=int, default=2)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--pushes", type=int, default=4)
    ap.add_argument("--bucket-mb", type=int, default=16)
    ap.add_argument("--workdir", default="outputs/bench")
    args = ap.parse_args()

    from bench_sync import build_model
    from ivgr_dist.runtime._ext_fix import install

    install()
    import ray

    from ivgr_dist.config import AlgorithmConfig, EngineConfig, LearnerConfig, ModelConfig, RolloutConfig
    from ivgr_dist.learner.group import LearnerGroup
    from ivgr_dist.rollout.pool import RolloutPool
    from ivgr_dist.sync.buckets import TensorMeta, bucket_layout, plan_buckets
    from ivgr_dist.sync.collective import CollectiveWeightSync
    from ivgr_dist.sync.shm import ShmWeightSync

    model_dir = build_model(
        Path(args.workdir) / f"sync-qwen2.5-vl-h{args.hidden}-l{args.layers}", args.hidden, args.layers
    )
    model_cfg = ModelConfig(path=str(model_dir), make_tiny_if_missing=False, dtype="bfloat16")
    rollout_cfg = RolloutConfig(num_engines=args.engines, engine=EngineConfig(max_num_seqs=16))
    bucket_bytes = args.bucket_mb << 20
    from ivgr_dist.runtime.startup import worker_runtime_env  # the import fix in every Ray worker

    ray.init(
        num_cpus=max(4, args.engines + args.ranks),
        include_dashboard=False,
        log_to_driver=False,
        runtime_env=worker_runtime_env(),
    )
    out: dict = {}
    learners = None
    try:
        learners = LearnerGroup(
            model_cfg, LearnerConfig(num_ranks=args.ranks, cpus_per_rank=0), AlgorithmConfig(kl_coef=0.0), 1, 600
        )
        metas = [TensorMeta(*m) for m in ray.get(learners.actors[0].weight_metadata.remote("bfloat16"))]
        for name, backend, make in (
            ("shm", "ivgr_shm", lambda: ShmWeightSync(bucket_bytes=bucket_bytes, dtype="bfloat16")),
            ("gloo", "ivgr_collective", lambda: CollectiveWeightSync("gloo", bucket_bytes, "bfloat16", timeout_s=300)),
        ):
            pool = RolloutPool(model_cfg, rollout_cfg, backend, use_gpus=False, start_timeout_s=600)
            try:
                sync = make()
                sync.setup(learners, pool)
                runs = []
                for v in range(1, args.pushes + 1):
                    t0 = time.perf_counter()
                    sync.push(learners, pool, v)
                    runs.append(time.perf_counter() - t0)
                if pool.versions() != [args.pushes] * args.engines:
                    raise RuntimeError(f"{name}: engines report {pool.versions()}")
                out[name] = runs
            finally:
                pool.shutdown()
    finally:
        if learners is not None:
            learners.shutdown()
        ray.shutdown()
    sizes = [bucket_layout([metas[i] for i in b])[1] for b in plan_buckets(metas, bucket_bytes)]
    out["bcast"] = plain_broadcast(sizes, args.engines, args.pushes)
    med = {k: statistics.median(v[1:]) for k, v in out.items()}
    print(
        json.dumps(
            {
                "bench": "sync_backends",
                "bytes": sum(m.nbytes for m in metas),
                "buckets": len(sizes),
                "engines": args.engines,
                "learner_ranks": args.ranks,
                **{f"{k}_push_s": round(v, 4) for k, v in med.items()},
                "gloo_over_shm": round(med["gloo"] / med["shm"], 2),
                "gloo_over_bcast": round(med["gloo"] / med["bcast"], 2),
                "push_s_all": {k: [round(x, 4) for x in v] for k, v in out.items()},
                "cpus": os.cpu_count(),
                "loadavg_1m": round(os.getloadavg()[0], 2),
            }
        )
    )


if __name__ == "__main__":
    main()
