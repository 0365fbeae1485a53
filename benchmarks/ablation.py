"""Stream ablation on the synthetic task: textual-only GRPO, grounded-only GRPO, and the full dual stream.

Runs, with the configs in ``configs/ablation/`` (identical except ``data.streams`` and the output dir; or
``--configs configs/localise`` for the search task, README "A task that needs localisation"):

1. the shared warm start (``ivgr-dist sft``; reused when it already exists),
2. ``ivgr-dist train`` for each variant (same steps, batch, optimiser, seeds),
3. ``ivgr-dist eval --mode both`` on the synthetic val set of the warm start and of each RL model,
   greedy and sampled (``--sample``: temperature 1, n=5; greedy accuracy saturates on this easy task),

then writes ``outputs/ablation/report.json`` and ``report.md``: textual (T) and grounded (G) accuracy
after the same number of steps, G box IoU, and the last-window training rewards. Finished pieces
(a variant's exported model, an eval.json) are reused, so an interrupted run continues. Pass dotted
overrides to change all variants at once (``python benchmarks/ablation.py trainer.max_steps=60``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = ("textual_only", "grounded_only", "dual_stream")


def _cli(*args: str) -> None:
    cmd = [sys.executable, "-m", "ivgr_dist.cli", *args]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def _eval(config: Path, model: Path, val: str, out: Path, overrides: list[str]) -> dict:
    """``{"greedy": all-table, "sample": all-table}`` of one model."""
    tables = {}
    for kind, flags in (("greedy", []), ("sample", ["--sample"])):
        where = out / kind
        if not (where / "eval.json").is_file():
            _cli("eval", "--config", str(config), "--model", str(model), "--mode", "both", "--out", str(where),
                 *flags, "--data", val, *overrides)  # fmt: skip
        tables[kind] = json.loads((where / "eval.json").read_text())["tables"]["all"]
    return tables


def _last_window(metrics: Path, key: str, window: int = 5) -> float | None:
    """The last-window mean of the run's final summary (``ivgr_dist.trainer.window_means``)."""
    from ivgr_dist.metrics import read_metrics
    from ivgr_dist.trainer import window_means

    means = window_means(read_metrics(metrics), key, window)
    return None if means is None else means[1]


def main(argv: list[str]) -> int:
    from ivgr_dist.config import load_config

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", default="configs/ablation", help="folder with the three variants' YAML files")
    parser.add_argument("overrides", nargs="*", help="dotted overrides applied to every variant")
    args = parser.parse_args(argv)
    overrides = args.overrides
    folder = Path(args.configs) if Path(args.configs).is_absolute() else ROOT / args.configs
    configs = {v: folder / f"{v}.yaml" for v in VARIANTS}
    cfgs = {v: load_config(p, overrides) for v, p in configs.items()}
    first = cfgs[VARIANTS[0]]
    val = first.data.val_files[0]
    _cli("sft", "--config", str(configs[VARIANTS[0]]), *overrides)
    rows = {"sft (warm start)": _eval(configs[VARIANTS[0]], Path(first.sft_model_dir), val,
                                       Path(first.sft_model_dir).parent / "eval_sft", overrides)}  # fmt: skip
    train = {}
    for v in VARIANTS:
        out = Path(cfgs[v].trainer.output_dir)
        if not (out / "model" / "config.json").is_file():
            _cli("train", "--config", str(configs[v]), *overrides)
        rows[v] = _eval(configs[v], out / "model", val, out / "eval", overrides)
        train[v] = {k: _last_window(out / "metrics.jsonl", k) for k in
                    ("reward/textual/accuracy", "reward/grounded/accuracy", "reward/grounded/box_iou")}  # fmt: skip

    def cell(table: dict, stream: str, key: str) -> str:
        return f"{table[stream][key]:.3f}" if stream in table else "-"

    def fmt(x):
        return "-" if x is None else f"{x:.3f}"

    lines = [
        f"# Stream ablation: {first.trainer.max_steps} RL steps each, eval on `{val}`",
        "",
        "| model | T acc greedy | T acc sampled | G acc sampled | G box IoU greedy / sampled | "
        "train T acc (last 5) | train G IoU (last 5) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, table in rows.items():
        t, g, smp = train.get(name, {}), table["greedy"], table["sample"]
        lines.append(
            f"| {name} | {cell(g, 'textual', 'accuracy')} | {cell(smp, 'textual', 'accuracy')} | "
            f"{cell(smp, 'grounded', 'accuracy')} | {cell(g, 'grounded', 'box_iou')} / {cell(smp, 'grounded', 'box_iou')} | "
            f"{fmt(t.get('reward/textual/accuracy'))} | {fmt(t.get('reward/grounded/box_iou'))} |"
        )
    report = Path(first.sft_model_dir).parent
    (report / "report.json").write_text(json.dumps({"eval": rows, "train_last_window": train}, indent=2))
    (report / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
