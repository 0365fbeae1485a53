"""Time prompt building for a batch of realistic images, and what of it is left on a step's critical path.

Usage: ``python benchmarks/bench_prompts.py [--records 64] [--step-s 8.0] [--steps 3] [--workers 4] [--repeats 2]``

A batch of ``--records`` paired records (128 prompts: grounded + textual), each with one JPEG of 1-3 MP (sizes
drawn between 1200x900 and 2000x1500), resized the Qwen2.5-VL way at the recipe's ``max_pixels`` 3211264. Timed in
one run, so the ratios compare like with like on this machine:

- ``serial_s``: ``RecordTable.prompts`` for the batch with one thread (the code before: decode and resize one
  record after another in the driver); ``threaded_s``: with ``--workers`` threads (``data.image_workers``); best
  of ``--repeats``, interleaved.
- ``wait_before_s`` / ``wait_after_s``: the per-step time the driver waits for prompts (``time/prompts_wait_s``,
  mean over steps 2..N) in ``BatchProducer`` with no prefetch and one thread (before) and with the prefetch and
  ``--workers`` threads (after). A stand-in pool returns at once and each step then "trains" for ``--step-s``
  seconds (sleeping, as the driver does while the learner ranks and engines work), so the prefetch has that long
  to prepare the next batch.

Prints ONE JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from ivgr_dist.config import DataConfig, TinyModelConfig
from ivgr_dist.data.dataset import RecordTable
from ivgr_dist.data.prompts import PromptBuilder
from ivgr_dist.data.sampler import PairSampler
from ivgr_dist.driver.producer import BatchProducer
from ivgr_dist.models.tiny import build_tokenizer
from ivgr_dist.types import Rollout

RECIPE_MAX_PIXELS = 3211264


def write_set(out: Path, n: int, seed: int = 0) -> Path:
    """``n`` records with one 1-3 MP JPEG each (smooth colour fields plus noise: photo-like compression)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    rng = np.random.default_rng(seed)
    (out / "images").mkdir(parents=True)
    rows = []
    for i in range(n):
        w, h = int(rng.integers(1200, 2001)), int(rng.integers(900, 1501))
        x = np.linspace(0, 255, w, dtype=np.float32)[None, :]
        y = np.linspace(0, 255, h, dtype=np.float32)[:, None]
        pixels = np.stack([x + 0 * y, y + 0 * x, (x + y) % 256], axis=-1).astype(np.uint8)
        pixels += rng.integers(0, 24, (h, w, 3), dtype=np.uint8)  # sensor-like noise; wraps rarely, harmless
        Image.fromarray(pixels).save(out / "images" / f"{i}.jpg", quality=90)
        box = [float(w // 4), float(h // 4), float(w // 2), float(h // 2)]
        rows.append(
            {
                "problem": "<image>\nWhat color is the object?",
                "answer": "red",
                "images": [f"images/{i}.jpg"],
                "target_instances": [{"bbox": box, "label": "red object"}],
                "datasource": "bench",
                "question_type": "exact",
            }
        )
    pq.write_table(pa.Table.from_pylist(rows), out / "train.parquet")
    return out / "train.parquet"


class _Pool:
    def sampling_seed(self, step):
        return None

    def generate(self, prompts, stats=None, seed=None, trace=None):
        return ([Rollout(p, 0, [1], "", [0.0], 0)] for p in prompts)


class _Scorer:
    def score_stream(self, groups, prompts, step):
        yield from groups

    def metrics(self):
        return {}


def producer_wait(path: Path, cfg: DataConfig, builder, workers: int, prefetch: bool, steps: int, step_s: float):
    """Mean ``time/prompts_wait_s`` over steps 2..N of a producer over the set."""
    table = RecordTable([path], cfg, builder, num_workers=workers)
    sampler = PairSampler(table.paired_ids, [], cfg.rollout_batch_size, 1.0, seed=0)
    prod = BatchProducer(SimpleNamespace(records=table, sampler=sampler), _Pool(), _Scorer(), 0, prefetch=prefetch)
    prod.start(1, steps, version=0)
    waits = []
    try:
        for step in range(1, steps + 1):
            batch = prod.get(step)
            waits.append(batch.metrics["time/prompts_wait_s"])
            time.sleep(step_s)  # the learner trains; the driver waits on its ranks
            prod.trained(step, 0, batch)  # the stand-in engines never take a new version: no record goes stale
    finally:
        prod.close()
    return statistics.mean(waits[1:]), waits[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=64)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--step-s", type=float, default=8.0)
    args = ap.parse_args()

    cfg = DataConfig(
        max_pixels=RECIPE_MAX_PIXELS,
        max_prompt_length=100_000,
        rollout_batch_size=2 * args.records,
        paired_ratio=1.0,
        image_workers=args.workers,
    )
    builder = PromptBuilder(build_tokenizer(TinyModelConfig()), cfg)
    with tempfile.TemporaryDirectory() as tmp:
        # two epochs' worth of records, so steps 2..N draw new records, not the page cache's
        path = write_set(Path(tmp), args.records * max(2, args.steps))
        items = [(i, s) for i in range(args.records) for s in ("grounded", "textual")]
        timings = {"serial_s": [], "threaded_s": []}
        for _ in range(args.repeats):  # interleaved, best of: the machine may be shared
            for name, workers in (("serial_s", 1), ("threaded_s", args.workers)):
                table = RecordTable([path], cfg, builder, num_workers=workers)
                t0 = time.perf_counter()
                prompts = table.prompts(items)
                timings[name].append(time.perf_counter() - t0)
                pixels = [p.images[0].size[0] * p.images[0].size[1] for p in prompts[::2]]
                del prompts, table  # ~0.5 GB of resized images per batch
        timings = {k: min(v) for k, v in timings.items()}
        before, _ = producer_wait(path, cfg, builder, 1, False, args.steps, args.step_s)
        after, first = producer_wait(path, cfg, builder, args.workers, True, args.steps, args.step_s)
    print(
        json.dumps(
            {
                "records": args.records,
                "prompts": len(items),
                "workers": args.workers,
                "mean_resized_mpix": round(statistics.mean(pixels) / 1e6, 3),
                "serial_s": round(timings["serial_s"], 3),
                "threaded_s": round(timings["threaded_s"], 3),
                "threaded_over_serial": round(timings["threaded_s"] / timings["serial_s"], 3),
                "step_s": args.step_s,
                "wait_before_s": round(before, 3),
                "wait_after_s": round(after, 4),
                "wait_after_first_step_s": round(first, 3),
                "wait_ratio": round(after / before, 4),
                "load_avg_1m": round(os.getloadavg()[0], 2),
            }
        )
    )


if __name__ == "__main__":
    main()
