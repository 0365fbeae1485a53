"""Stream ablation with several seeds: textual-only GRPO, grounded-only GRPO, the dual stream with consistency
and the dual stream without it.

Runs, with the configs in ``configs/ablation/`` (identical except ``data.streams``, ``algorithm.consistency_weight``
and the output dir; or ``--configs configs/localise`` for the search task, README "A task that needs
localisation"):

1. the shared warm start (``ivgr-dist sft``; reused when it already exists): every variant and seed starts
   from the same model, so seeds vary the RL run only (sampling, record order, driver generators),
2. ``ivgr-dist train`` for each variant and seed (``--seeds 0,1,2``; seed ``s`` sets ``trainer.seed``,
   ``data.seed`` and ``rollout.engine.seed`` to ``s`` and writes to ``<output_dir>/seed<s>``),
3. ``ivgr-dist eval --mode both`` on the val set of the warm start and of each RL model, greedy and sampled
   (``--sample``: temperature 1, n=5),

then writes ``report.json`` and ``report.md`` next to the warm start: per variant, textual (T) and grounded (G)
accuracy and G box IoU, greedy and sampled, as the mean over seeds with two 95% intervals: over seeds
(Student t on the per-seed means; the seed-to-seed spread of the RL runs) and over records (normal, on the
per-record means of every seed's records; how much the val set's size alone leaves uncertain). It also gives
each variant's per-seed difference to ``dual_stream`` (paired by seed) with its t interval.

Finished pieces (a run's exported model, an eval.json) are reused, so an interrupted run continues. Pass dotted
overrides to change all variants at once (``python benchmarks/ablation.py trainer.max_steps=60``).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = ("textual_only", "grounded_only", "dual_stream", "dual_no_consistency")
METRICS = (  # (column, stream, reward key, eval kind)
    ("T acc greedy", "textual", "accuracy", "greedy"),
    ("T acc sampled", "textual", "accuracy", "sample"),
    ("G acc greedy", "grounded", "accuracy", "greedy"),
    ("G acc sampled", "grounded", "accuracy", "sample"),
    ("G IoU greedy", "grounded", "box_iou", "greedy"),
    ("G IoU sampled", "grounded", "box_iou", "sample"),
)
# two-sided 95% Student t quantiles by degrees of freedom
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


# ------------------------------------------------------------------------------------------ statistics


def mean_interval(values: list[float], z: float | None = None) -> tuple[float, float | None]:
    """``(mean, half-width of its 95% interval)``: Student t with ``len - 1`` degrees of freedom (``z=None``) or a
    normal quantile ``z``. The half-width is None for fewer than two values."""
    n = len(values)
    if n == 0:
        raise ValueError("mean_interval of no values")
    mean = sum(values) / n
    if n < 2:
        return mean, None
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    q = z if z is not None else _T975.get(n - 1, 1.96)
    return mean, q * sd / math.sqrt(n)


def record_means(predictions: Path, stream: str, key: str) -> list[float]:
    """Per val record of ``stream``: the mean of ``key`` over its responses (``predictions.jsonl`` of an eval)."""
    sums: dict[tuple[str, int], list[float]] = defaultdict(lambda: [0.0, 0.0])
    with predictions.open() as f:
        for line in f:
            row = json.loads(line)
            if row["stream"] != stream:
                continue
            entry = sums[(row["datasource"], row["original_idx"])]
            entry[0] += float(row["rewards"].get(key, 0.0))
            entry[1] += 1
    return [total / n for total, n in sums.values()]


def summarize(per_seed: dict[int, dict[str, list[float]]]) -> dict[str, dict]:
    """``per_seed``: seed -> column -> per-record values. Per column: mean over seeds of the per-seed means, its
    t interval over seeds, the normal interval over all records, and the counts."""
    out = {}
    columns = sorted({c for cols in per_seed.values() for c in cols}, key=[m[0] for m in METRICS].index)
    for column in columns:
        seed_means = [sum(v) / len(v) for cols in per_seed.values() if (v := cols.get(column))]
        pooled = [x for cols in per_seed.values() for x in cols.get(column, [])]
        if not seed_means:
            continue
        mean, seeds_hw = mean_interval(seed_means)
        _, records_hw = mean_interval(pooled, z=1.96)
        out[column] = {
            "mean": mean,
            "seeds_ci95": seeds_hw,
            "records_ci95": records_hw,
            "seed_means": seed_means,
            "seeds": len(seed_means),
            "records": len(pooled),
        }
    return out


def paired_difference(a: dict[int, float], b: dict[int, float]) -> dict | None:
    """Mean and t interval of ``a[s] - b[s]`` over the seeds both have."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    mean, hw = mean_interval([a[s] - b[s] for s in seeds])
    return {"mean": mean, "ci95": hw, "seeds": len(seeds)}


def _cell(stats: dict | None) -> str:
    if stats is None:
        return "-"
    seeds = "" if stats["seeds_ci95"] is None else f" ± {stats['seeds_ci95']:.3f}"
    records = "" if stats["records_ci95"] is None else f" [±{stats['records_ci95']:.3f}]"
    return f"{stats['mean']:.3f}{seeds}{records}"


def _diff_cell(d: dict | None) -> str:
    if d is None:
        return "-"
    return f"{d['mean']:+.3f}" + ("" if d["ci95"] is None else f" ± {d['ci95']:.3f}")


def render(rows: dict[str, dict], diffs: dict[str, dict], title: str) -> str:
    columns = [m[0] for m in METRICS]
    lines = [
        title,
        "",
        "Mean over seeds ± 95% interval over seeds (t) [± 95% interval over records (normal)].",
        "",
        "| model | " + " | ".join(columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for name, stats in rows.items():
        lines.append(f"| {name} | " + " | ".join(_cell(stats.get(c)) for c in columns) + " |")
    if diffs:
        lines += ["", "Per-seed difference to dual_stream (paired by seed; mean ± 95% t interval):", ""]
        lines += ["| model | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
        for name, by_column in diffs.items():
            lines.append(
                f"| {name} - dual_stream | " + " | ".join(_diff_cell(by_column.get(c)) for c in columns) + " |"
            )
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ runs


def _cli(*args: str) -> float:
    cmd = [sys.executable, "-m", "ivgr_dist.cli", *args]
    print("+", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT)
    return time.perf_counter() - t0


def _eval(config: Path, model: Path, val: str, out: Path, overrides: list[str]) -> dict[str, list[float]]:
    """Column -> per-record values of one model (greedy and sampled evals, each run once and then reused)."""
    values = {}
    for kind, flags in (("greedy", []), ("sample", ["--sample"])):
        where = out / kind
        if not (where / "eval.json").is_file():
            _cli("eval", "--config", str(config), "--model", str(model), "--mode", "both", "--out", str(where),
                 *flags, "--data", val, *overrides)  # fmt: skip
        for column, stream, key, k in METRICS:
            if k == kind:
                recs = record_means(where / "predictions.jsonl", stream, key)
                if recs:
                    values[column] = recs
    return values


def main(argv: list[str]) -> int:
    from ivgr_dist.config import load_config

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", default="configs/ablation", help="folder with one YAML file per variant")
    parser.add_argument("--seeds", default="0", help="RL seeds per variant, comma-separated (default: 0)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated (default: all four)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides applied to every variant")
    args = parser.parse_args(argv)
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.variants = args.variants.split(",")
    unknown = sorted(set(args.variants) - set(VARIANTS))
    if unknown:
        parser.error(f"--variants {unknown}: must be among {', '.join(VARIANTS)}")
    overrides = args.overrides
    folder = Path(args.configs) if Path(args.configs).is_absolute() else ROOT / args.configs
    configs = {v: folder / f"{v}.yaml" for v in args.variants}
    base = {v: load_config(p, overrides) for v, p in configs.items()}
    first = base[args.variants[0]]
    val = first.data.val_files[0]
    report_dir = Path(first.sft_model_dir).parent
    _cli("sft", "--config", str(configs[args.variants[0]]), *overrides)
    rows = {"sft (warm start)": summarize({0: _eval(configs[args.variants[0]], Path(first.sft_model_dir), val,
                                                    report_dir / "eval_sft", overrides)})}  # fmt: skip
    seed_means: dict[str, dict[str, dict[int, float]]] = {}
    wall: dict[str, dict[int, float]] = defaultdict(dict)
    for v in args.variants:
        per_seed = {}
        for seed in args.seeds:
            out = Path(base[v].trainer.output_dir) / f"seed{seed}"
            seeded = [*overrides, f"trainer.seed={seed}", f"data.seed={seed}", f"rollout.engine.seed={seed}",
                      f"trainer.output_dir={out}"]  # fmt: skip
            if not (out / "model" / "config.json").is_file():
                wall[v][seed] = _cli("train", "--config", str(configs[v]), *seeded)
            per_seed[seed] = _eval(configs[v], out / "model", val, out / "eval", seeded)
        rows[v] = summarize(per_seed)
        seed_means[v] = {
            column: {s: sum(vals) / len(vals) for s, cols in per_seed.items() if (vals := cols.get(column))}
            for column in rows[v]
        }
    diffs = {}
    if "dual_stream" in seed_means:
        for v in args.variants:
            if v != "dual_stream":
                diffs[v] = {
                    c: d
                    for c in rows[v]
                    if (d := paired_difference(seed_means[v][c], seed_means["dual_stream"].get(c, {}))) is not None
                }
    title = (
        f"# Stream ablation: {first.trainer.max_steps} RL steps, seeds {args.seeds}, eval on `{val}` "
        f"({rows['sft (warm start)'].get('T acc greedy', {}).get('records', 0)} records per stream)"
    )
    report = {"seeds": args.seeds, "val": val, "rows": rows, "diff_to_dual_stream": diffs, "train_wall_s": wall}
    (report_dir / "report.json").write_text(json.dumps(report, indent=2))
    text = render(rows, diffs, title)
    (report_dir / "report.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
