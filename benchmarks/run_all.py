"""Run the stage benchmarks one after another and print one comparison table.

Each benchmark is a script in this folder that prints ONE JSON line on stdout; this runner starts
each in its own process (they start Ray clusters and vLLM engines, which must not overlap on a small
machine), keeps its stderr in ``<logs>/<bench>.log``, collects the JSON lines into ``--jsonl`` and
prints a table of the key numbers, each ratio next to its target.

    python benchmarks/run_all.py                          # rules, rollout, sync (several minutes)
    python benchmarks/run_all.py --only rules,sync        # a subset
    python benchmarks/run_all.py --skip rollout --args rollout="--prompts 32" --args sync="--engines 1"
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Bench:
    name: str
    script: str
    keys: tuple[str, ...]
    """Fields shown in the table (besides the ratio)."""
    ratio: str | None = None
    """Field holding the headline ratio, compared with ``target``."""
    target: tuple[str, float] | None = None
    """(">=" | "<=", value): the target for ``ratio``."""
    default_args: tuple[str, ...] = field(default_factory=tuple)


BENCHES = {
    b.name: b
    for b in (
        Bench(
            "rules",
            "bench_rules.py",
            ("responses", "us_per_response", "us_rule_accuracy_math", "us_math_pool_overhead_per_group"),
        ),
        Bench(
            "rollout",
            "bench_rollout.py",
            ("prompts", "n", "pool_engines", "bare_vllm_tokens_per_s", "pool_tokens_per_s", "seeded_over_unseeded"),
            ratio="pool_over_bare",
            target=(">=", 0.95),
        ),
        Bench(
            "sync",
            "bench_sync.py",
            ("bytes", "engines", "push_s", "copy_bound_s", "ratio", "gather_write_s", "engine_load_s"),
            ratio="per_engine_ratio",
            target=("<=", 3.0),
        ),
        Bench(
            "sync_backends",
            "bench_sync_backends.py",
            ("bytes", "engines", "shm_push_s", "gloo_push_s", "bcast_push_s", "gloo_over_shm"),
            ratio="gloo_over_bcast",
        ),
        Bench(
            "learner_io",
            "bench_learner_io.py",
            ("samples", "driver_bytes_before", "driver_bytes_after", "padding_ratio", "peak_rss_ratio"),
            ratio="driver_bytes_ratio",
            target=("<=", 0.2),  # 1/n of before, n = 5
        ),
        Bench(
            "e2e",
            "bench_e2e.py",
            ("k0_steps_per_s", "k1_steps_per_s", "k2_steps_per_s", "ideal_speedup", "overlap_efficiency_k1"),
            ratio="speedup_k1",
            target=(">=", 1.3),
        ),
        Bench(
            "prompts",
            "bench_prompts.py",
            ("records", "serial_s", "threaded_s", "wait_before_s", "wait_after_s", "load_avg_1m"),
            ratio="wait_ratio",
            target=("<=", 0.1),  # the next batch's prompts ready when the step asks (step longer than building)
        ),
        Bench(
            "reward",
            "bench_reward.py",
            ("rewards_total", "rewards_missing", "judge_calls", "judge_failures", "reward_tail_s"),
            ratio="tail_ratio_pipelined_over_after",
            target=("<=", 1 / 3),
            default_args=("--records", "256", "--judge-latency-s", "0.1", "--generation-s", "20"),
        ),
    )
}


def run_one(bench: Bench, extra: list[str], timeout_s: float, log_dir: Path) -> tuple[dict | None, str, float]:
    """(JSON result or None, status, seconds) of one benchmark process."""
    cmd = [sys.executable, str(HERE / bench.script), *bench.default_args, *extra]
    log = log_dir / f"{bench.name}.log"
    t0 = time.perf_counter()
    with log.open("w") as err:
        err.write(f"$ {shlex.join(cmd)}\n")
        err.flush()
        try:
            proc = subprocess.run(
                cmd, stdout=subprocess.PIPE, stderr=err, text=True, timeout=timeout_s, cwd=HERE.parent
            )
        except subprocess.TimeoutExpired:
            return None, f"timed out after {timeout_s:.0f}s (log: {log})", time.perf_counter() - t0
    seconds = time.perf_counter() - t0
    result = None
    for line in reversed(proc.stdout.strip().splitlines()):
        try:
            value = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict):
            result = value
            break
    if proc.returncode != 0:
        return result, f"exit {proc.returncode} (log: {log})", seconds
    if result is None:
        return None, f"no JSON line on stdout (log: {log})", seconds
    return result, "ok", seconds


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int) and value >= 10_000:
        return f"{value:.3g}"
    return str(value)


def table(rows: list[tuple[Bench, dict | None, str, float]]) -> str:
    header = ["bench", "status", "time_s", "ratio", "target", "met", "key numbers"]
    lines = []
    for bench, result, status, seconds in rows:
        result = result or {}
        ratio = result.get(bench.ratio) if bench.ratio else None
        target = f"{bench.target[0]} {bench.target[1]:g}" if bench.target else "-"
        met = "-"
        if ratio is not None and bench.target:
            op, goal = bench.target
            met = "yes" if (ratio >= goal if op == ">=" else ratio <= goal) else "NO"
        keys = "  ".join(f"{k}={_fmt(result[k])}" for k in bench.keys if k in result)
        ratio_s = f"{bench.ratio}={_fmt(ratio)}" if ratio is not None else "-"
        lines.append([bench.name, status, f"{seconds:.0f}", ratio_s, target, met, keys])
    widths = [max(len(r[i]) for r in [header, *lines]) for i in range(len(header) - 1)]
    out = []
    for r in [header, *lines]:
        out.append("  ".join(c.ljust(w) for c, w in zip(r[:-1], widths, strict=True)) + "  " + r[-1])
    out.insert(1, "-" * len(out[0]))
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", default="", help=f"comma-separated subset of {list(BENCHES)}")
    ap.add_argument("--skip", default="", help="comma-separated benchmarks to leave out")
    ap.add_argument(
        "--args",
        action="append",
        default=[],
        metavar='NAME="ARGS"',
        help='extra arguments for one benchmark, e.g. --args rollout="--prompts 32" (repeatable)',
    )
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per benchmark")
    ap.add_argument("--jsonl", default="outputs/bench/results.jsonl", help="where the JSON lines are collected")
    args = ap.parse_args(argv)

    def names(text: str) -> list[str]:
        chosen = [n.strip() for n in text.split(",") if n.strip()]
        unknown = [n for n in chosen if n not in BENCHES]
        if unknown:
            ap.error(f"unknown benchmark(s) {unknown}; valid: {list(BENCHES)}")
        return chosen

    selected = names(args.only) or list(BENCHES)
    selected = [n for n in selected if n not in set(names(args.skip))]
    extra: dict[str, list[str]] = {}
    for item in args.args:
        name, sep, rest = item.partition("=")
        if not sep or name not in BENCHES:
            ap.error(f'--args {item!r}: expected NAME="ARGS" with NAME in {list(BENCHES)}')
        extra.setdefault(name, []).extend(shlex.split(rest))

    jsonl = Path(args.jsonl)
    log_dir = jsonl.parent / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    with jsonl.open("a") as sink:
        for name in selected:
            bench = BENCHES[name]
            print(f"running {name} ...", file=sys.stderr, flush=True)
            result, status, seconds = run_one(bench, extra.get(name, []), args.timeout, log_dir)
            rows.append((bench, result, status, seconds))
            if result is not None:
                sink.write(json.dumps({**result, "run_at": time.strftime("%Y-%m-%dT%H:%M:%S")}) + "\n")
                sink.flush()
                print(json.dumps(result), file=sys.stderr, flush=True)
    print(table(rows))
    print(f"JSON lines appended to {jsonl}; logs in {log_dir}")
    return 0 if all(status == "ok" for _, _, status, _ in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
