"""Reward tail: the pipelined reward pool vs the public recipe's score-after-generation schedule.

A thin wrapper over ``ivgr-dist bench reward --schedule both`` with a local judge server of fixed
latency, so ``run_all.py`` can run it like the other benchmarks. The last JSON line carries
``tail_ratio_pipelined_over_after`` (target <= 1/3). Extra arguments go to the command, e.g.
``python benchmarks/bench_reward.py --records 256 --judge-latency-s 0.2 --generation-s 20``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

if __name__ == "__main__":
    from ivgr_dist.cli import main

    defaults = ["--schedule", "both", "--records", "256", "--judge-latency-s", "0.1", "--generation-s", "20"]
    sys.exit(main(["bench", "reward", *defaults, *sys.argv[1:]]))
