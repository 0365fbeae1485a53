"""Reward tail: the pipelined reward pool vs the public recipe's score-after-generation schedule.

Usage: ``python benchmarks/bench_reward.py [--schedule both] [--records 256] [--judge-latency-s 0.1]
[--generation-s 20] [--workers 2]`` (``run_all.py`` runs it with a 100 ms judge over 20 s of generation).

Synthetic rollouts (no model): ``--records`` records as A/B pairs with ``--rollouts-per-group``
responses each, written so that every reward path runs: think/answer format, boxes (grounded),
consistency (textual; the judge), and free-form answers the rules cannot decide (equivalence;
the judge). Finished groups "arrive" spread uniformly over ``--generation-s`` seconds, in a
seeded random order, as from generation.

- ``after`` (the public recipe): wait for every group, then a thread pool over records (up to 64
  threads); each record's judge calls run one after another (grounded first, then textual).
- ``pipelined`` (ours): :class:`~ivgr_dist.reward.pool.RewardPool` (``--workers`` M on a local Ray cluster, or the
  one RAY_ADDRESS names; 0 = the in-process scorer) via ``score_stream`` while the groups arrive.

Judge: ``--judge-url`` (repeatable; openai backend), or ``--judge-latency-s S``: a local
fixed-latency OpenAI-compatible server (loopback, own process) answering every call after S
seconds; without either, the rule judge. One JSON line per schedule: rewards_total,
rewards_missing (must be 0; else the exit status is 1), judge_calls/timeouts/failures, reward_wall_s (first group
arrived -> last reward ready), reward_tail_s (last group arrived -> last reward ready); with ``both`` the
pipelined line, the last one, also carries ``tail_ratio_pipelined_over_after`` (target <= 1/3).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import socket
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import replace

from ivgr_dist.config import AlgorithmConfig, JudgeConfig, RewardConfig
from ivgr_dist.types import Prompt, Rollout

COLOURS = ("red", "green", "blue", "yellow")
SHAPES = ("circle", "square", "triangle")
ANSWER_TEXT = "<score>1.0</score> <verdict>yes</verdict>"


# ------------------------------------------------------------------------------------ synthetic data


def _box(rng: random.Random) -> list[int]:
    x, y, w, h = rng.randint(0, 60), rng.randint(0, 60), rng.randint(20, 50), rng.randint(20, 50)
    return [x, y, x + w, y + h]


def synthetic_batch(records: int, n: int, seed: int) -> list[list[Rollout]]:
    """``records`` A/B pairs (2 groups each) of ``n`` rollouts, with rewards to compute."""
    rng, groups = random.Random(seed), []
    for idx in range(records):
        k = rng.randint(1, 3)
        shapes = rng.sample(SHAPES, k)
        objects = [{"color": rng.choice(COLOURS), "shape": s, "bbox": _box(rng)} for s in shapes]
        target = objects[0]
        free = rng.random() < 0.5  # free-form: answers other than the exact word go to the judge
        base = dict(original_idx=idx, prompt_text="", prompt_token_ids=[1], num_prompt_tokens=1,
                    answer=target["color"], question_type="free_form" if free else "exact", datasource="bench",
                    target_boxes=[target["bbox"]], question=f"What color is the {target['shape']}?",
                    extra={"objects": json.dumps(objects)})  # fmt: skip
        a, b = Prompt(stream="grounded", **base), Prompt(stream="textual", **base)
        other = next(c for c in COLOURS if c != target["color"])
        desc = f"the {target['color']} {target['shape']}"
        a_texts, b_texts = [], []
        for i in range(n):
            box = [v + rng.randint(-4, 4) for v in target["bbox"]]
            answer = rng.choice([target["color"], f"It is {target['color']}.", other])
            extra = f" next to the {objects[1]['color']} {objects[1]['shape']}" if k > 1 and i % 2 else ""
            a_texts.append(f"<think>I look at {desc} <box>[{','.join(map(str, box))}]</box>{extra}.</think>"
                           f"<answer>{answer}</answer>")  # fmt: skip
            b_think = [f"I see {desc}{extra}.", f"The {target['shape']} is {other}.", "It looks colourful.",
                       f"I see {desc} and a {other} star."][i % 4]  # fmt: skip
            b_texts.append(f"<think>{b_think}</think><answer>{rng.choice([target['color'], answer])}</answer>")
        groups.append([Rollout(a, i, [1], t, [0.0], 0) for i, t in enumerate(a_texts)])
        groups.append([Rollout(b, i, [1], t, [0.0], 0) for i, t in enumerate(b_texts)])
    return groups


def _fresh(groups: list[list[Rollout]]) -> list[list[Rollout]]:
    return [[replace(r, rewards={}, reward=0.0) for r in g] for g in groups]


class Arrivals:
    """Yields the groups at uniformly spread times over ``generation_s`` (seeded order); records arrival times."""

    def __init__(self, groups: list[list[Rollout]], generation_s: float, seed: int):
        self.groups = list(groups)
        random.Random(seed + 1).shuffle(self.groups)
        self.generation_s = generation_s
        self.first = self.last = 0.0

    def __iter__(self) -> Iterator[list[Rollout]]:
        t0 = time.perf_counter()
        gap = self.generation_s / max(1, len(self.groups))
        for i, g in enumerate(self.groups):
            delay = t0 + (i + 1) * gap - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            self.last = time.perf_counter()
            if i == 0:
                self.first = self.last
            yield g


# ------------------------------------------------------------------------- fixed-latency judge server


def _serve(port: int, latency_s: float, max_s: float) -> None:
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server API
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
            time.sleep(latency_s)
            choices = [{"index": i, "message": {"role": "assistant", "content": ANSWER_TEXT}, "finish_reason": "stop"}
                       for i in range(int(body.get("n", 1)))]  # fmt: skip
            out = json.dumps({"id": "bench", "object": "chat.completion", "choices": choices}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        def log_message(self, *args):
            return None

    ThreadingHTTPServer.request_queue_size = 512
    srv = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    srv.daemon_threads = True
    threading.Timer(max_s, srv.shutdown).start()  # bounded even if the parent never stops it
    srv.serve_forever()


@contextmanager
def fixed_latency_server(latency_s: float, max_s: float = 3600.0) -> Iterator[str]:
    """A local OpenAI-compatible judge answering every call after ``latency_s``; yields its base URL."""
    import multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = mp.get_context("spawn").Process(target=_serve, args=(port, latency_s, max_s), daemon=True)
    proc.start()
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline or not proc.is_alive():
                proc.terminate()
                raise RuntimeError("fixed-latency judge server did not start within 30 s") from None
            time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.terminate()
        proc.join(timeout=10)


# ---------------------------------------------------------------------------------------- schedules


def _summary(schedule: str, groups: list[list[Rollout]], arrivals: Arrivals, done: float, counts: dict) -> dict:
    total = sum(len(g) for g in groups)
    rewarded = sum(1 for g in groups for r in g if r.rewards)
    return {
        "schedule": schedule,
        "records": len(groups) // 2,
        "rewards_total": rewarded,
        "rewards_missing": total - rewarded,
        "judge_calls": int(counts.get("judge/calls", 0)),
        "judge_timeouts": int(counts.get("judge/timeouts", 0)),
        "judge_failures": int(counts.get("judge/failures", 0)),
        "generation_s": round(arrivals.last - arrivals.first, 3),
        "reward_wall_s": round(done - arrivals.first, 3),
        "reward_tail_s": round(max(0.0, done - arrivals.last), 3),
    }


def run_pipelined(groups, reward_cfg: RewardConfig, algo: AlgorithmConfig, generation_s: float, seed: int) -> dict:
    from ivgr_dist.reward.pool import make_scorer

    prompts = [g[0].prompt for g in groups]
    scorer = make_scorer(reward_cfg, algo)
    try:
        arrivals = Arrivals(groups, generation_s, seed)
        done = time.perf_counter()
        for _ in scorer.score_stream(arrivals, prompts, step=1):
            done = time.perf_counter()
        counts = scorer.metrics()
    finally:
        scorer.close()
    return _summary("pipelined", groups, arrivals, done, counts)


class _Sequential:
    """A judge whose requests run one after another (one record's calls in the recipe's schedule)."""

    def __init__(self, inner):
        self.inner = inner

    async def score(self, requests):
        return [(await self.inner.score([r]))[0] for r in requests]


def run_after(groups, judge_cfg: JudgeConfig, algo: AlgorithmConfig, generation_s: float, seed: int) -> dict:
    """Wait for all groups, then a thread pool over records; each record's judge calls in sequence."""
    from ivgr_dist.reward.judge import make_judge
    from ivgr_dist.reward.reference import ReferenceTable
    from ivgr_dist.reward.rule_pool import RulePool
    from ivgr_dist.reward.scorer import apply_result, job_from_group, score_job

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    judge, table, lock, counts = make_judge(judge_cfg), ReferenceTable(), threading.Lock(), {}
    rule_pool = RulePool(RewardConfig().rule_timeout_s, max_chars=algo.max_answer_chars)
    budget = judge_cfg.timeout_s * (judge_cfg.max_retries + 2) * 2 * len(groups[0]) + 60

    def record(pair: list[list[Rollout]]) -> None:
        for group in sorted(pair, key=lambda g: g[0].prompt.stream != "grounded"):
            job = job_from_group(group, 1)
            ref = table.get(job.record_key) if job.stream == "textual" else None
            coro = score_job(
                job,
                _Sequential(judge),
                algo,
                judge_cfg.fallback_consistency,
                ref,
                on_failure=judge_cfg.on_failure,
                rule_pool=rule_pool,
            )
            result = asyncio.run_coroutine_threadsafe(coro, loop).result(timeout=budget)
            apply_result(group, result)
            with lock:
                if result.candidate is not None:
                    table.update(job.record_key, result.candidate)
                for k, v in result.counts.items():
                    counts[k] = counts.get(k, 0) + v

    try:
        arrivals = Arrivals(groups, generation_s, seed)
        by_record: dict[int, list[list[Rollout]]] = {}
        for g in arrivals:
            by_record.setdefault(g[0].prompt.original_idx, []).append(g)
        with ThreadPoolExecutor(max_workers=min(64, max(1, len(by_record)))) as pool:
            for f in [pool.submit(record, pair) for pair in by_record.values()]:
                f.result(timeout=budget * 4)
        done = time.perf_counter()
    finally:
        rule_pool.close()
        asyncio.run_coroutine_threadsafe(judge.close(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
    return _summary("after", groups, arrivals, done, counts)


def run_bench(args) -> list[dict]:
    """Run the schedules named by ``args.schedule``; returns (and prints) one JSON-able dict per schedule."""
    algo = AlgorithmConfig()
    groups = synthetic_batch(args.records, args.rollouts_per_group, args.seed)

    def judge_cfg(urls: list[str]) -> JudgeConfig:
        if not urls:
            return JudgeConfig(backend="rule", concurrency=args.concurrency, timeout_s=args.timeout_s)
        return JudgeConfig(backend="openai", urls=urls, concurrency=args.concurrency, timeout_s=args.timeout_s,
                           max_retries=args.max_retries)  # fmt: skip

    def go(urls: list[str]) -> list[dict]:
        jc = judge_cfg(urls)
        out = []
        if args.schedule in ("after", "both"):
            out.append(run_after(_fresh(groups), jc, algo, args.generation_s, args.seed))
            print(json.dumps(out[-1]), flush=True)
        if args.schedule in ("pipelined", "both"):
            if args.workers > 0:
                _init_ray(args.workers)
            rc = RewardConfig(num_workers=args.workers, cpus_per_worker=0.5, judge=jc)
            line = run_pipelined(_fresh(groups), rc, algo, args.generation_s, args.seed)
            if out:
                line["tail_ratio_pipelined_over_after"] = round(line["reward_tail_s"] / max(out[0]["reward_tail_s"],
                                                                                            1e-9), 4)  # fmt: skip
            out.append(line)
            print(json.dumps(line), flush=True)
        return out

    if args.judge_url:
        return go(list(args.judge_url))
    if args.judge_latency_s is not None:
        with fixed_latency_server(args.judge_latency_s) as url:
            return go([url])
    return go([])


def _init_ray(workers: int) -> None:
    import os

    import ray

    from ivgr_dist.runtime.startup import (
        worker_runtime_env,  # the import fix in every Ray worker, as the project's jobs
    )

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False, runtime_env=worker_runtime_env())
    else:
        ray.init(
            num_cpus=max(2, math.ceil(workers * 0.5)),
            include_dashboard=False,
            log_to_driver=False,
            runtime_env=worker_runtime_env(),
        )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--judge-url", action="append", default=[], help="OpenAI-compatible base URL (repeatable)")
    ap.add_argument("--judge-latency-s", type=float, default=None,
                    help="start a local fixed-latency judge server with this per-call latency")  # fmt: skip
    ap.add_argument("--records", type=int, default=256, help="records (each an A/B pair of groups)")
    ap.add_argument("--rollouts-per-group", type=int, default=5, help="rollouts per group (GRPO n)")
    ap.add_argument("--concurrency", type=int, default=64, help="judge calls in flight (per judge client)")
    ap.add_argument("--timeout-s", type=float, default=30.0, help="deadline of one judge call")
    ap.add_argument("--max-retries", type=int, default=3, help="judge retries per request")
    ap.add_argument("--generation-s", type=float, default=5.0, help="groups arrive spread over this many seconds")
    ap.add_argument("--schedule", choices=["pipelined", "after", "both"], default="both")
    ap.add_argument("--workers", type=int, default=2, help="reward workers (0: in-process scorer)")
    ap.add_argument("--seed", type=int, default=0)
    rows = run_bench(ap.parse_args(argv))
    return 0 if all(r["rewards_missing"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
