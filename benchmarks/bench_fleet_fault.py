"""An engine killed mid-run costs time, not rollouts: two training runs of the same config, one undisturbed and
one whose engine's vLLM EngineCore is SIGKILLed during step ``--kill-at``; prints ONE JSON line.

Both runs are ``ivgr-dist train`` as a user runs it (a local Ray cluster each, the embedded tiny config with two
engines, no warm start: the random model's responses run to the config's length, so steps cost the same).
Reported per run: steps, trained rollouts (from ``trained.jsonl``), wall time; for the disturbed run the time
from the kill to the replacement serving, two ways: wall clock from the kill to the first step whose metrics
show the fleet back at its target with a restart counted (step granularity, an upper bound), and the pool's
own ``rollout/replacement_s`` (from noticing the failure to the new engine serving with the current weights).

    python benchmarks/bench_fleet_fault.py [--steps 20] [--kill-at 5]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from _tiny_assets import asset_overrides, ensure_assets  # noqa: E402 - a sibling module


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _cores_of(pid: int) -> list:
    import psutil

    out = []
    for child in psutil.Process(pid).children(recursive=True):
        try:
            if "EngineCore" in " ".join([child.name(), *child.cmdline()]):
                out.append(child)
        except psutil.Error:
            continue
    return out


def run(workdir: Path, name: str, args, kill_at: int | None) -> dict:
    out = workdir / name
    shutil.rmtree(out, ignore_errors=True)
    overrides = [
        *asset_overrides(workdir),
        *([f"data.rollout_batch_size={args.prompts}"] if args.prompts else []),
        "rollout.num_engines=2",
        "rollout.restart_backoff_s=1",
        "reward.num_workers=0",
        "sft.enabled=false",
        f"trainer.max_steps={args.steps}",
        "trainer.save_every=0",
        "trainer.loggers=[jsonl]",
        f"trainer.output_dir={out}",
    ]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    t0 = time.monotonic()
    log = open(workdir / f"{name}.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "ivgr_dist.cli", "train", *overrides], stdout=log, stderr=subprocess.STDOUT, env=env
    )
    killed_at = back_at = None
    while proc.poll() is None:
        time.sleep(0.2)
        if kill_at is None:
            continue
        recs = _records(out / "metrics.jsonl")
        if killed_at is None and len(recs) >= kill_at - 1:
            cores = _cores_of(proc.pid)
            if len(cores) == 2:
                cores[0].kill()
                killed_at = time.monotonic()
        elif killed_at is not None and back_at is None:
            if any(r["rollout/engine_restarts"] >= 1 and r["rollout/engines_live"] == 2 for r in recs):
                back_at = time.monotonic()
    log.close()
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed (exit {proc.returncode}); see {workdir / f'{name}.log'}")
    trained = _records(out / "trained.jsonl")
    recs = _records(out / "metrics.jsonl")
    result = {
        "steps": len(recs),
        "trained_rollouts": sum(t["rollouts"] for t in trained),
        "trained_groups": sum(len(t["groups"]) for t in trained),
        "wall_s": round(time.monotonic() - t0, 1),
        "step_s_median": round(sorted(r["time/step_s"] for r in recs)[len(recs) // 2], 2),
    }
    if kill_at is not None:
        took = [r["rollout/replacement_s"] for r in recs if "rollout/replacement_s" in r]
        result |= {
            "killed": killed_at is not None,
            "kill_to_serving_wall_s": round(back_at - killed_at, 1) if back_at and killed_at else None,
            "pool_replacement_s": round(took[0], 1) if took else None,
            "restarts": max(r["rollout/engine_restarts"] for r in recs),
            "engines_live_last": recs[-1]["rollout/engines_live"],
        }
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--kill-at", type=int, default=5)
    ap.add_argument("--prompts", type=int, default=0, help="data.rollout_batch_size (0: the config's)")
    ap.add_argument("--workdir", default="outputs/bench/fleet_fault")
    args = ap.parse_args()

    workdir = Path(args.workdir).resolve()
    ensure_assets(workdir)
    calm = run(workdir, "undisturbed", args, None)
    hit = run(workdir, "killed", args, args.kill_at)
    out = {"bench": "fleet_fault", "steps": args.steps, "kill_at_step": args.kill_at}
    out |= {f"undisturbed_{k}": v for k, v in calm.items()} | {f"killed_{k}": v for k, v in hit.items()}
    out["same_trained_rollouts"] = calm["trained_rollouts"] == hit["trained_rollouts"]
    out["wall_ratio_killed_over_undisturbed"] = round(hit["wall_s"] / calm["wall_s"], 3)
    out.update({"cpus": os.cpu_count(), "loadavg_1m": round(os.getloadavg()[0], 2)})
    print(json.dumps(out))


if __name__ == "__main__":
    main()
