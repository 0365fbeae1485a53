"""Regenerate the README's main-job numbers: the default job, then the four evaluations of its warm start and its
RL policy, written as the README's tables to ``OUT/readme_numbers.md`` (and printed).

    python benchmarks/readme_numbers.py --out outputs/readme     # ~30 min on the 2-core CPU machine

It runs exactly the README's commands (``ivgr-dist train`` with the embedded config and only the output paths
moved under OUT, then ``ivgr-dist eval`` greedy and ``--sample`` on both models), each as a subprocess, so a
fresh clone with the package installed reproduces the procedure. What is and is not reproducible: see the
README ("Measured on"): the same machine, code and seeds give the same sampler draws, data and engine seeds,
but not bit-identical numbers on CPU (float reductions across threads and the engines' batching differ between
runs), so the tables move between runs of this script; the header records the machine and commit.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _run(cmd: list[str], log: Path) -> float:
    t0 = time.monotonic()
    print("$", " ".join(cmd), flush=True)
    with log.open("w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd[:4])} ... failed (exit {proc.returncode}); see {log}")
    return time.monotonic() - t0


def _row(name: str, decoding: str, tables: dict) -> str:
    t, g = tables["all"]["textual"], tables["all"]["grounded"]
    return (
        f"| {name} | {decoding} | {t['accuracy']:.3f} | {g['accuracy']:.3f} | {g['box_iou']:.3f} | "
        f"{g['box_valid']:.3f} | {t['format']:.3f} / {g['format']:.3f} |"
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="outputs/readme", help="where the run, the evaluations and the tables go")
    args = p.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    cli = [sys.executable, "-m", "ivgr_dist.cli"]
    data = out / "synthetic"
    paths = [
        f"trainer.output_dir={out / 'run'}",
        f"model.path={out / 'tiny-qwen2.5-vl'}",
        f"data.train_files=[{data / 'train.parquet'}]",
        f"data.val_files=[{data / 'val.parquet'}]",
    ]
    seconds = {"train": _run([*cli, "train", *paths], out / "train.log")}
    models = {"warm start": out / "run" / "sft_model", "RL (40 steps)": out / "run" / "model"}
    rows = []
    for decoding, extra in (("greedy", []), ("`--sample` (T=1, n=5)", ["--sample"])):
        for name, model in models.items():
            tag = f"{'sft' if 'warm' in name else 'rl'}_{'sample' if extra else 'greedy'}"
            cmd = [*cli, "eval", "--model", str(model), "--data", str(data / "val.parquet"), "--mode", "both"]
            seconds[tag] = _run([*cmd, "--out", str(out / f"eval_{tag}"), *extra], out / f"eval_{tag}.log")
            tables = json.loads((out / f"eval_{tag}" / "eval.json").read_text())["tables"]
            rows.append((0 if "warm" in name else 1, 0 if not extra else 1, _row(name, decoding, tables)))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO)
    summary = (out / "train.log").read_text().split("ivgr-dist train:", 1)[-1].strip().splitlines()
    lines = [
        f"Measured on {platform.node()} ({os.cpu_count()} CPUs, {platform.machine()}, Python "
        f"{platform.python_version()}), commit {commit.stdout.strip() or 'unknown'}, "
        f"{time.strftime('%Y-%m-%d')}; train {seconds['train'] / 60:.1f} min, evaluations "
        f"{sum(v for k, v in seconds.items() if k != 'train') / 60:.1f} min.",
        "",
        "```text",
        "ivgr-dist train: " + "\n".join(summary),
        "```",
        "",
        "| model | decoding | T accuracy | G accuracy | G box IoU | G box_valid | T / G answer format |",
        "| --- | --- | ---: | ---: | ---: | ---: | --- |",
        *[r for *_, r in sorted(rows, key=lambda x: (x[1], x[0]))],
    ]
    text = "\n".join(lines) + "\n"
    (out / "readme_numbers.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
