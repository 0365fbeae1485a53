"""End-to-end training throughput with ``trainer.max_staleness`` 0, 1 and 2, in one run; prints ONE JSON line.

The same config trains for ``--steps`` steps three times (a local Ray cluster each, ``ivgr-dist train`` as a
user runs it) in the disaggregated shape a GPU cluster has: the rollout engine and the learner rank on
DISJOINT cores (``rollout.engine.cpu_affinity=[0]``, ``learner.cpu_affinity=[1]``; one engine, one rank), so
in the synchronous run each side idles while the other works. The tiny model starts random (no warm
start: every response runs to ``--response`` tokens, so generation costs the same every step).

Per setting: steps/s, samples/s and tokens/s over steps 2..N (step 1 has no previous step to overlap
with), the engine idle fraction (1 - generation time / wall time) and the learner idle fraction
(1 - learner time / wall time), staleness mean/max. Speedups are steps/s relative to ``max_staleness=0``;
``overlap_efficiency_k1`` is the k=1 speedup over the ideal one, ``(generation + learner) /
max(generation, learner)`` of the synchronous run (per-step medians). ``trace.json`` of every run is kept
under ``--workdir`` (open it in ui.perfetto.dev).

    python benchmarks/bench_e2e.py [--steps 10] [--prompts 16] [--response 96] [--staleness 0,1,2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from _tiny_assets import asset_overrides, ensure_assets  # noqa: E402 - a sibling module

N_SAMPLES = 5  # rollout.n of the embedded config (rollouts per prompt)


def run(workdir: Path, k: int, args) -> dict:
    from ivgr_dist.runtime.metrics import read_metrics

    out = workdir / f"run-k{k}"
    shutil.rmtree(out, ignore_errors=True)
    cores = sorted(os.sched_getaffinity(0))
    overrides = [
        *asset_overrides(workdir),
        f"data.rollout_batch_size={args.prompts}",
        f"rollout.max_response_length={args.response}",
        "rollout.num_engines=1",
        f"rollout.engine.cpu_affinity=[{cores[0]}]",
        "learner.num_ranks=1",
        "learner.cpus_per_rank=1",
        f"learner.cpu_affinity=[{cores[-1]}]",
        f"learner.global_batch_size={args.prompts}",
        "reward.num_workers=0",
        "sft.enabled=false",
        f"trainer.max_steps={args.steps}",
        "trainer.save_every=0",
        "trainer.loggers=[jsonl]",
        "trainer.trace=true",
        f"trainer.max_staleness={k}",
        f"trainer.output_dir={out}",
    ]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "ivgr_dist.cli", "train", *overrides], capture_output=True, text=True, env=env
    )
    if proc.returncode != 0:
        raise RuntimeError(f"max_staleness={k} failed:\n{proc.stderr[-3000:]}")
    records = read_metrics(out / "metrics.jsonl")[1:]  # step 1 cannot overlap with anything
    wall = sum(r["time/step_s"] for r in records)
    gen = sum(r["time/generate_s"] for r in records)
    learn = sum(r["time/learner_s"] for r in records)
    return {
        "steps_per_s": len(records) / wall,
        "samples_per_s": sum(r["rollout/groups"] for r in records) * N_SAMPLES / wall,
        "tokens_per_s": sum(r["rollout/tokens"] for r in records) / wall,
        "engine_idle_frac": max(0.0, 1 - gen / wall),
        "learner_idle_frac": max(0.0, 1 - learn / wall),
        "staleness_mean": statistics.fmean(r["rollout/staleness_mean"] for r in records),
        "staleness_max": max(r["rollout/staleness_max"] for r in records),
        "mixed_version_frac": statistics.fmean(r["rollout/mixed_version_frac"] for r in records),
        "generate_s_median": statistics.median(r["time/generate_s"] for r in records),
        "learner_s_median": statistics.median(r["time/learner_s"] for r in records),
        "step_s_median": statistics.median(r["time/step_s"] for r in records),
        "run_s": time.perf_counter() - t0,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--response", type=int, default=96)
    ap.add_argument("--staleness", default="0,1,2")
    ap.add_argument("--workdir", default="outputs/bench/e2e")
    args = ap.parse_args()
    if len(os.sched_getaffinity(0)) < 2:
        raise SystemExit("bench_e2e needs at least 2 cores: one for the engine, one for the learner")

    workdir = Path(args.workdir).resolve()
    ensure_assets(workdir)
    ks = [int(k) for k in args.staleness.split(",")]
    results = {k: run(workdir, k, args) for k in ks}
    out = {"bench": "e2e", "steps": args.steps, "prompts": args.prompts, "response_tokens": args.response}
    for k, r in results.items():
        out.update({f"k{k}_{name}": round(v, 4) for name, v in r.items()})
    if 0 in results:
        sync = results[0]
        g, learn = sync["generate_s_median"], sync["learner_s_median"]
        ideal = (g + learn) / max(g, learn)
        out["ideal_speedup"] = round(ideal, 3)
        for k in ks:
            if k:
                out[f"speedup_k{k}"] = round(results[k]["steps_per_s"] / sync["steps_per_s"], 3)
        if 1 in results:
            out["overlap_efficiency_k1"] = round(out["speedup_k1"] / ideal, 3)
    out.update({"cpus": os.cpu_count(), "loadavg_1m": round(os.getloadavg()[0], 2)})
    print(json.dumps(out))


if __name__ == "__main__":
    main()
