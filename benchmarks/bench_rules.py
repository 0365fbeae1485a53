"""Time the iVGR rule rewards on synthetic responses and print ONE JSON line.

Usage: ``python benchmarks/bench_rules.py [--responses 20000] [--seed 0]``

The responses mix well-formed grounded answers, swapped/malformed/duplicate boxes, whitespace-mangled tags, missing
tags, long reasoning and random garbage. Timed per response: format, box_valid + box_iou (one parse, as a reward
worker would), extract_answer, rule_accuracy (multiple-choice / exact / free-form; math separately, since
math-verify dominates when it runs) and think_text.

Math groups, as the scorer runs them: math-verify of a group's answers in this process (what a reward worker did
before ``reward/rule_pool.py``) against the same group sent to a warm ``RulePool`` in one call; the difference is
the bounded pool's per-group overhead (IPC; non-math groups never use the pool). Also the pool's start (two
children importing SymPy).
"""

from __future__ import annotations

import argparse
import json
import random
import string
import time

from ivgr_dist.reward.rule_pool import RulePool
from ivgr_dist.reward.rules import (
    box_iou_reward,
    box_valid_reward,
    extract_answer,
    format_reward,
    grounded_box_rewards,
    math_match,
    rule_accuracy,
    think_text,
)

WORDS = "the a cat dog red car on left of near table person holding cup sign reads large small".split()


def _words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def _box(rng: random.Random, kind: str) -> str:
    x1, y1 = rng.randint(0, 900), rng.randint(0, 900)
    x2, y2 = x1 + rng.randint(1, 300), y1 + rng.randint(1, 300)
    if kind == "swapped":
        x1, x2 = x2, x1
    if kind == "three":
        return f"<box>[{x1},{y1},{x2}]</box>"
    if kind == "float":
        return f"< box >[{x1 + 0.5}, {y1}, {x2 + 0.25}, {y2}]</ box >"
    if kind == "huge":
        return f"<box>[{'9' * 400},{y1},{x2},{y2}]</box>"
    return f"<box>[{x1}, {y1}, {x2}, {y2}]</box>"


def make_response(rng: random.Random) -> str:
    kind = rng.random()
    if kind < 0.1:  # garbage
        return "".join(rng.choice(string.printable) for _ in range(rng.randint(0, 400)))
    if kind < 0.15:  # missing tags
        return _words(rng, 60) + " answer: B"
    n_boxes = rng.choice([0, 1, 2, 3, 4, 6])
    kinds = rng.choices(["ok", "swapped", "three", "float", "huge"], weights=[80, 8, 5, 5, 2], k=n_boxes)
    parts = []
    for k in kinds:
        parts.append(_words(rng, rng.randint(5, 40)))
        parts.append(_box(rng, k))
    if n_boxes >= 2 and rng.random() < 0.1:
        parts.append(parts[1])  # duplicate box
    parts.append(_words(rng, rng.randint(10, 120)))
    think = " ".join(parts)
    answer = rng.choice(["B", "(C)", "Option A", "a red car", "3", "3.0", "the answer is D", ""])
    sep = rng.choice(["", " ", "\n\n"])
    open_t, close_t = rng.choice([("<think>", "</think>"), ("< think >", "</ think >")])
    resp = f"{open_t}{think}{close_t}{sep}<answer> {answer} </answer>"
    if rng.random() < 0.05:
        resp = "Sure! " + resp
    return resp


def _time(fn, items) -> float:
    t0 = time.perf_counter()
    for it in items:
        fn(*it)
    return time.perf_counter() - t0


def math_groups(rng: random.Random, groups: int, size: int, rounds: int = 3) -> dict:
    """Per-group time of math-verify in this process vs in a warm RulePool (one call per group): best wall time of
    ``rounds`` alternating rounds each, and the CPU time the calling thread spends per pool call (the IPC)."""
    answers = ["\\frac{1}{2}", "0.5", "1/3", "2", "x+1", "\\sqrt{2}/2", "0.50"]
    batches = [[(rng.choice(answers), "0.5") for _ in range(size)] for _ in range(groups)]
    pool = RulePool(10.0)
    try:
        t0 = time.perf_counter()
        pool.math_match([("1", "1")])  # starts both children, waits for the first
        t_start = time.perf_counter() - t0
        for batch in batches[:20]:  # warm: both children (they take turns) and this process see every answer
            pool.math_match(batch)
            [math_match(p, g) for p, g in batch]
        t_local = t_pool = cpu_pool = float("inf")
        for _ in range(rounds):
            t0 = time.perf_counter()
            local = [[math_match(p, g) for p, g in batch] for batch in batches]
            t_local = min(t_local, time.perf_counter() - t0)
            t0, c0 = time.perf_counter(), time.thread_time()
            remote = [pool.math_match(batch) for batch in batches]
            t_pool, cpu_pool = min(t_pool, time.perf_counter() - t0), min(cpu_pool, time.thread_time() - c0)
    finally:
        pool.close()
    assert remote == local, "the pool must give the in-process verdicts"
    return {
        "math_groups": groups,
        "math_group_size": size,
        "us_math_group_in_process": round(t_local * 1e6 / groups, 1),
        "us_math_group_pool": round(t_pool * 1e6 / groups, 1),
        "us_math_pool_overhead_per_group": round((t_pool - t_local) * 1e6 / groups, 1),
        "us_math_pool_caller_cpu_per_group": round(cpu_pool * 1e6 / groups, 1),
        "s_math_pool_start": round(t_start, 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--responses", type=int, default=20_000)
    ap.add_argument("--math", type=int, default=500, help="responses for the separate math-verify timing")
    ap.add_argument("--math-groups", type=int, default=200, help="groups for the RulePool overhead timing")
    ap.add_argument("--group-size", type=int, default=5, help="answers per math group (rollout.n)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    rng = random.Random(args.seed)
    responses = [make_response(rng) for _ in range(args.responses)]
    targets = [[[rng.randint(0, 500), rng.randint(0, 500), 600 + rng.randint(0, 300), 600 + rng.randint(0, 300)]]]
    qtypes = ["multiple_choice", "exact", "free_form"]
    gts = ["B", "3", "a red car"]

    n = len(responses)
    t_format = _time(format_reward, [(r,) for r in responses])
    t_valid = _time(box_valid_reward, [(r,) for r in responses])
    t_iou = _time(box_iou_reward, [(r, targets[0]) for r in responses])
    t_boxes = _time(grounded_box_rewards, [(r, targets[0]) for r in responses])
    t_answer = _time(extract_answer, [(r,) for r in responses])
    t_think = _time(think_text, [(r,) for r in responses])
    answers = [extract_answer(r) for r in responses]
    t_acc = _time(rule_accuracy, [(a, gts[i % 3], qtypes[i % 3]) for i, a in enumerate(answers)])

    math_items = [(rng.choice(["\\frac{1}{2}", "0.5", "1/3", "2", "x+1"]), "0.5", "math") for _ in range(args.math)]
    rule_accuracy(*math_items[0])  # warm up math-verify imports/caches
    t_math = _time(rule_accuracy, math_items)
    pool_timing = math_groups(rng, args.math_groups, args.group_size)

    total = t_format + t_boxes + t_answer + t_acc + t_think  # what scoring one grounded rollout costs
    us = 1e6 / n
    print(
        json.dumps(
            {
                "bench": "rules",
                "responses": n,
                "mean_chars": round(sum(map(len, responses)) / n, 1),
                "us_per_response": round(total * us, 2),
                "us_format": round(t_format * us, 2),
                "us_box_valid": round(t_valid * us, 2),
                "us_box_iou": round(t_iou * us, 2),
                "us_box_valid_and_iou_one_parse": round(t_boxes * us, 2),
                "us_extract_answer": round(t_answer * us, 2),
                "us_think_text": round(t_think * us, 2),
                "us_rule_accuracy_non_math": round(t_acc * us, 2),
                "us_rule_accuracy_math": round(t_math * 1e6 / max(1, len(math_items)), 2),
                "math_responses": len(math_items),
                **pool_timing,
            }
        )
    )


if __name__ == "__main__":
    main()
