"""Weight sync (``ivgr_shm`` backend) vs the copy lower bound, one run; prints ONE JSON line.

A random Qwen2.5-VL of ~90 M parameters (text hidden 1024, 8 layers: big enough that bytes dominate
fixed costs, small enough to start on 2 cores in well under a minute) goes into a LearnerGroup
(FSDP2, gloo) and a RolloutPool on a local Ray cluster. ``ShmWeightSync.push`` runs ``--pushes``
times (the first is a warm-up and not counted): every learner rank casts its own shards to bf16 and
writes them as bucket files to /dev/shm (no gather); every engine reads them and loads them through vLLM's
weight-transfer lifecycle (layerwise reload, then CPU repacking in ``finish_weight_update``).

The lower bound is one copy of the pushed bytes per engine at this machine's copy bandwidth
(``torch`` ``copy_`` of the same number of bytes, best of 5): ``copy_bound_s = bytes / bandwidth``,
``ratio = push_s / copy_bound_s``, ``per_engine_ratio = push_s / (engines * copy_bound_s)`` (the
the target (docs/architecture.md) is <= 3). Reported split: ``gather_write_s`` (learner side, until the files
exist), ``engine_load_s`` (slowest engine's whole update), the rest (Ray round trips, clean-up), and,
measured in this process on the same bytes, what the file format alone costs (``stage_write_s``,
``stage_read_s``: the same bucket files, written by one rank holding whole tensors, to / from /dev/shm).

    python benchmarks/bench_sync.py [--hidden 1024] [--layers 8] [--engines 2] [--ranks 2] [--pushes 4]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def build_model(path: Path, hidden: int, layers: int) -> Path:
    from ivgr_dist.config import TinyModelConfig
    from ivgr_dist.models.tiny import make_tiny_model

    if (path / "config.json").is_file():
        return path
    cfg = TinyModelConfig(
        hidden_size=hidden,
        num_layers=layers,
        num_heads=hidden // 64,
        num_kv_heads=2,
        intermediate_size=int(hidden * 2.75) // 64 * 64,
        vocab_size=32000,  # an upper bound: the local BPE corpus yields what it yields
    )
    return make_tiny_model(path, cfg)


def copy_bandwidth(nbytes: int, repeats: int = 5) -> float:
    """Bytes per second of ``dst.copy_(src)`` over ``nbytes`` (best of ``repeats``, after a warm-up)."""
    import torch

    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8)
    dst = torch.empty_like(src)
    dst.copy_(src)  # first touch of every page happens here, not in the timing
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return nbytes / best


def file_stages(model_dir: Path, bucket_bytes: int) -> tuple[float, float, int]:
    """Seconds to write the bf16 weights as bucket files to shared memory and to read them back."""
    import shutil

    import torch
    from safetensors.torch import load_file

    from ivgr_dist.sync.shm import make_shm_dir, merge_rank_buckets, read_sharded_bucket, write_rank_buckets

    state = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        state.update({k: v.to(torch.bfloat16) for k, v in load_file(str(f)).items()})
    buckets, bucket, size = [], [], 0
    for name, t in state.items():
        bucket.append((name, tuple(t.shape), t, 0))  # one rank's files, every tensor whole
        size += t.numel() * t.element_size()
        if size >= bucket_bytes:
            buckets.append(bucket)
            bucket, size = [], 0
    buckets.append(bucket)
    out = make_shm_dir(prefix="ivgr_bench_sync_")
    try:
        t0 = time.perf_counter()
        refs = merge_rank_buckets([write_rank_buckets(buckets, out, 0)])
        write_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        n = sum(
            t.numel() for r in refs for _, t in read_sharded_bucket(r["names"], r["shapes"], r["dtypes"], r["files"])
        )
        read_s = time.perf_counter() - t0
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return write_s, read_s, n * 2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, default=1024, help="text hidden size (multiple of 64)")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--engines", type=int, default=2)
    ap.add_argument("--ranks", type=int, default=2, help="learner ranks (FSDP2 over gloo)")
    ap.add_argument("--pushes", type=int, default=4, help="pushes; the first is a warm-up")
    ap.add_argument("--bucket-mb", type=int, default=256)
    ap.add_argument("--workdir", default="outputs/bench")
    args = ap.parse_args()
    if args.pushes < 2:
        ap.error("--pushes must be >= 2 (the first is a warm-up)")

    from ivgr_dist.runtime._ext_fix import install

    install()
    import ray
    import torch

    from ivgr_dist.config import AlgorithmConfig, EngineConfig, LearnerConfig, ModelConfig, RolloutConfig
    from ivgr_dist.learner.group import LearnerGroup
    from ivgr_dist.rollout.pool import RolloutPool
    from ivgr_dist.sync.shm import ShmWeightSync

    model_dir = build_model(
        Path(args.workdir) / f"sync-qwen2.5-vl-h{args.hidden}-l{args.layers}", args.hidden, args.layers
    )
    model_cfg = ModelConfig(path=str(model_dir), make_tiny_if_missing=False, dtype="bfloat16")
    rollout_cfg = RolloutConfig(num_engines=args.engines, engine=EngineConfig(max_num_seqs=16))
    learner_cfg = LearnerConfig(num_ranks=args.ranks, cpus_per_rank=1)
    bucket_bytes = args.bucket_mb << 20

    load_before = os.getloadavg()[0]
    approx_bytes = sum(f.stat().st_size for f in model_dir.glob("*.safetensors")) // 2  # fp32 files -> bf16
    bandwidth_before = copy_bandwidth(approx_bytes)  # before the cluster starts (others may share the machine)
    from ivgr_dist.runtime.startup import worker_runtime_env  # the import fix in every Ray worker

    ray.init(
        num_cpus=max(4, args.engines + args.ranks),
        include_dashboard=False,
        log_to_driver=False,
        runtime_env=worker_runtime_env(),
    )
    learners = rollouts = None
    try:
        t0 = time.perf_counter()
        learners = LearnerGroup(model_cfg, learner_cfg, AlgorithmConfig(kl_coef=0.0), total_steps=1, timeout_s=600)
        rollouts = RolloutPool(model_cfg, rollout_cfg, "ivgr_shm", use_gpus=False, start_timeout_s=600)
        setup_s = time.perf_counter() - t0
        num_params = learners.num_params()
        sync = ShmWeightSync(bucket_bytes=bucket_bytes, dtype="bfloat16")
        runs = [sync.push(learners, rollouts, version=v) for v in range(1, args.pushes + 1)]
        versions = rollouts.versions()
        if versions != [args.pushes] * args.engines:
            raise RuntimeError(f"engines report versions {versions}, expected {args.pushes}")
    finally:
        if rollouts is not None:
            rollouts.shutdown()
        if learners is not None:
            learners.shutdown()
        ray.shutdown()

    timed = runs[1:]
    nbytes = int(timed[0]["sync/bytes"])
    push_s = statistics.median(r["time/sync_s"] for r in timed)
    gather_write_s = statistics.median(r["sync/gather_write_s"] for r in timed)
    engine_load_s = statistics.median(r["sync/engine_load_s_max"] for r in timed)
    bandwidth = max(copy_bandwidth(nbytes), bandwidth_before)  # a lower bound: the best copy rate seen
    copy_bound_s = nbytes / bandwidth
    stage_write_s, stage_read_s, stage_bytes = file_stages(model_dir, bucket_bytes)
    assert stage_bytes == nbytes, (stage_bytes, nbytes)  # the same bytes as a push
    result = {
        "bench": "sync",
        "backend": "ivgr_shm",
        "params": num_params,
        "bytes": nbytes,
        "buckets": int(timed[0]["sync/buckets"]),
        "engines": args.engines,
        "learner_ranks": args.ranks,
        "pushes_timed": len(timed),
        "push_s": round(push_s, 4),
        "push_s_all": [round(r["time/sync_s"], 4) for r in runs],
        "copy_gb_per_s": round(bandwidth / 1e9, 2),
        "copy_threads": torch.get_num_threads(),
        "copy_bound_s": round(copy_bound_s, 4),
        "ratio": round(push_s / copy_bound_s, 2),
        "per_engine_ratio": round(push_s / (args.engines * copy_bound_s), 2),
        "gather_write_s": round(gather_write_s, 4),
        "engine_load_s": round(engine_load_s, 4),
        "other_s": round(
            statistics.median(r["time/sync_s"] - r["sync/gather_write_s"] - r["sync/engine_load_s_max"] for r in timed),
            4,
        ),
        "gather_write_over_copy": round(gather_write_s / copy_bound_s, 2),
        "engine_load_over_copy": round(engine_load_s / copy_bound_s, 2),
        "stage_write_s": round(stage_write_s, 4),
        "stage_read_s": round(stage_read_s, 4),
        "setup_s": round(setup_s, 1),
        "cpus": os.cpu_count(),
        "loadavg_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],  # before, after: >cpus = contended
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
