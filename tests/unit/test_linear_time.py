"""Every rule regex / rule function over model text and both judge parsers run in linear time.

Each case is an adversarial input that hurt a former version (quadratic backtracking or copying: long digit and
whitespace runs, thousands of unclosed tags, ``answer answer ...``, ``a.".".``). It is timed at 1 K and 100 K
characters (CPU time of the test's thread, so other processes on a shared machine do not count; best of 5
alternating rounds); the ratio must stay under 300: linear is ~100 (measured 50-106 at a load average of 35 on the
2-core development machine), quadratic ~10 000. A ratio, not an absolute time. A quadratic case would take minutes
at 100 K, hence the timeout.
"""

from __future__ import annotations

import gc
import time

import pytest

from ivgr_dist.reward import rules
from ivgr_dist.reward.judge.prompts import parse_consistency, parse_equivalence

pytestmark = pytest.mark.timeout(60)

BIG = 10**7  # max_chars for the rules, so that the length caps do not hide the scan


def _fill(unit: str, n: int, head: str = "", tail: str = "") -> str:
    """``head`` + ``unit`` repeated to ``n`` characters in all + ``tail``."""
    reps = max(1, (n - len(head) - len(tail)) // len(unit))
    return head + unit * reps + tail


CASES = {
    # judge parsers
    "consistency/openers": (parse_consistency, lambda n: _fill("<score>", n)),
    "consistency/open-close-openers": (parse_consistency, lambda n: _fill("<score>", n, tail="</score>")),
    "consistency/digits": (parse_consistency, lambda n: _fill("1", n, tail="x")),
    "consistency/digits-in-tag": (parse_consistency, lambda n: _fill("1", n, "<score>", ".x</score>")),
    "consistency/space-run": (parse_consistency, lambda n: _fill(" ", n, "0.7", "x")),
    "consistency/lt-space-runs": (parse_consistency, lambda n: _fill("<" + " " * 50, n)),
    "equivalence/openers": (parse_equivalence, lambda n: _fill("<verdict>", n)),
    "equivalence/space-tag": (parse_equivalence, lambda n: _fill(" ", n, "<", "verdict")),
    # rule functions over the response
    "format/unclosed-lt": (rules.format_reward, lambda n: _fill("<", n, "<think>")),
    "format/think-openers": (rules.format_reward, lambda n: _fill("<think>", n)),
    "normalize/space-delims": (rules.normalize_response, lambda n: _fill(" / ", n)),
    "extract_answer/openers": (rules.extract_answer, lambda n: _fill("<answer>", n, tail="</answer>")),
    "think_text/openers": (rules.think_text, lambda n: _fill("<think>", n)),
    "boxes/unclosed": (lambda t: rules.grounded_box_rewards(t, [[0, 0, 1, 1]]), lambda n: _fill("<box>", n)),
    "boxes/long-content": (lambda t: rules.parse_boxes(t), lambda n: _fill("1", n, "<box>[", "x</box>")),
    "boxes/recipe-spaces": (lambda t: rules.parse_boxes(t, True), lambda n: _fill(" ", n, "<box>[1", "x</box>")),
    # rule functions over the answer (and the ground truth, which can be as long)
    "choice/keyword-space-run": (rules.choice_letter, lambda n: _fill(" ", n, "answer", ".")),
    "choice/answer-answer": (rules.choice_letter, lambda n: _fill("answer ", n)),
    "choice/keyword-stars": (rules.choice_letter, lambda n: _fill("*", n, "Answer: ", ".")),
    "choice/parens": (rules.choice_letter, lambda n: _fill("(B) (C", n)),
    "exact/peel-layers": (lambda t: rules.exact_match(t, "a"), lambda n: _fill('."', n, "a")),
    "exact/digits": (lambda t: rules.exact_match(t, t + "1"), lambda n: _fill("1", n, tail="x")),
    "exact/thousands": (lambda t: rules.exact_match(t, "1"), lambda n: _fill(",111", n, "1", ",11")),
    "accuracy/choice-gt": (
        lambda t: rules.rule_accuracy("B", t, "multiple_choice", max_chars=BIG),
        lambda n: _fill(" ", n, "the answer", "."),
    ),
    "accuracy/math-no-verify": (
        lambda t: rules.rule_accuracy(t, "2", "math", max_chars=BIG, math_verify=False),
        lambda n: _fill("1", n, tail=" "),
    ),
    # the math-verify screen
    "risky/digit-run": (rules._math_risky, lambda n: _fill("1", n)),
    "risky/binom-space-run": (rules._math_risky, lambda n: _fill(" ", n, "\\binom", "x")),
    "risky/carets": (rules._math_risky, lambda n: _fill("^", n)),
    "risky/caret-words": (rules._math_risky, lambda n: _fill("^" + "a" * 30, n)),
    "risky/paren-space-run": (rules._math_risky, lambda n: _fill(" ", n, ")", "x")),
    "risky/open-groups": (rules._math_risky, lambda n: _fill("^{a", n)),
    "risky/unclosed-group": (rules._math_risky, lambda n: _fill("a", n, "^{")),
}


def _per_call(fn, text: str, calls: int) -> float:
    """CPU time of this thread per call of ``fn(text)`` over ``calls`` calls (other processes on the shared
    machine do not count, as they would in wall time)."""
    gc.disable()
    try:
        t0 = time.thread_time()
        for _ in range(calls):
            fn(text)
        return (time.thread_time() - t0) / calls
    finally:
        gc.enable()


def _ratio(fn, small: str, large: str, rounds: int = 5) -> float:
    """Best per-call time on ``large`` over best on ``small``, the two measured in alternation."""
    calls = 1  # enough calls on the small input for ~10 ms, so the clock's resolution does not matter
    while _per_call(fn, small, calls) * calls < 0.01 and calls < 1 << 20:
        calls *= 4
    best_small = best_large = float("inf")
    for _ in range(rounds):
        best_small = min(best_small, _per_call(fn, small, calls))
        best_large = min(best_large, _per_call(fn, large, 1))
    return best_large / best_small


@pytest.mark.parametrize("name", sorted(CASES))
def test_scales_linearly(name):
    fn, make = CASES[name]
    small, large = make(1_000), make(100_000)
    assert 900 <= len(small) <= 1_100 and 99_000 <= len(large) <= 100_100
    ratio = _ratio(fn, small, large)
    assert ratio < 300, f"{name}: 100x the input took {ratio:.0f}x the time (linear ~100, quadratic ~10000)"
