"""The in-process scorer (reward.num_workers=0): rule rewards + judge, pair-aware, counted, never raising."""

from __future__ import annotations

import json

import pytest

from ivgr_dist.config import AlgorithmConfig, JudgeConfig, RewardConfig
from ivgr_dist.reward.judge import JudgeResult
from ivgr_dist.reward.judge.rule import RuleJudge
from ivgr_dist.reward.pool import make_scorer
from ivgr_dist.reward.scorer import InProcessScorer
from ivgr_dist.types import Prompt, Rollout

GOOD_A = "<think>the red circle <box>[10,10,50,50]</box> is red</think><answer>red</answer>"
WRONG_A = "<think>hmm</think><answer>blue</answer>"


def _prompt(idx, stream, answer="red", qtype="exact", objects=None) -> Prompt:
    return Prompt(
        original_idx=idx, stream=stream, prompt_text="", prompt_token_ids=[1], num_prompt_tokens=1, answer=answer,
        question_type=qtype, datasource="t", target_boxes=[[10, 10, 50, 50]] if stream != "single" else [],
        question="What color is the circle?", extra={"objects": objects} if objects else {},
    )  # fmt: skip


def _group(prompt: Prompt, texts: list[str]) -> list[Rollout]:
    return [Rollout(prompt, i, [1], t, [-0.1], 0) for i, t in enumerate(texts)]


class SpyJudge:
    """The rule judge, recording every request it sees."""

    def __init__(self, fail: bool = False):
        self.inner, self.requests, self.fail = RuleJudge(), [], fail

    async def score(self, requests):
        self.requests.extend(requests)
        if self.fail:
            raise RuntimeError("judge exploded")
        return await self.inner.score(requests)

    async def close(self):
        return None


@pytest.fixture
def spy():
    return SpyJudge()


@pytest.fixture
def scorer(spy):
    s = InProcessScorer(AlgorithmConfig(), JudgeConfig(), judge=spy)
    yield s
    s.close()


def test_consistency_comes_from_the_judge(scorer, spy):
    a, b = _prompt(1, "grounded"), _prompt(1, "textual")
    b_texts = [
        "<think>the red circle is red</think><answer>red</answer>",  # same facts: 1.0
        "<think>the circle is blue</think><answer>red</answer>",  # contradiction: 0.0
        "<think>it is red</think><answer>red</answer>",  # omits the circle: 0.7
    ]
    out = list(scorer.score_stream([_group(a, [GOOD_A]), _group(b, b_texts)], [a, b], step=1))
    textual = out[1]
    assert [r.rewards["consistency"] for r in textual] == [1.0, 0.0, 0.7]
    assert [r.reward for r in textual] == [3.0, 2.0, 2.7]
    kinds = [q.kind for q in spy.requests]
    assert kinds == ["consistency"] * 3 and spy.requests[0].reference.startswith("the red circle<box>[10,10,50,50]")
    m = scorer.metrics()
    assert m["judge/calls"] == 3 and m["judge/requests"] == 3 and m["judge/failures"] == 0
    assert m["refcache/size"] == 1 and m["reward/reference_updates"] == 1
    assert "judge/latency_p50_s" in m and "judge/latency_p99_s" in m


def test_no_reference_means_zero_and_no_judge_call(scorer, spy):
    a, b = _prompt(4, "grounded"), _prompt(4, "textual")
    out = list(scorer.score_stream([_group(a, [WRONG_A]), _group(b, ["<think>red</think><answer>red</answer>"])],
                                   [a, b], step=1))  # fmt: skip
    assert out[1][0].rewards == {"format": 1.0, "accuracy": 1.0, "consistency": 0.0}
    assert spy.requests == []
    m = scorer.metrics()
    assert m["reward/consistency_no_reference"] == 1 and m["judge/calls"] == 0 and m["refcache/size"] == 0


@pytest.mark.parametrize("weight", [0.0, 0.5])
def test_consistency_weight_scales_the_textual_reward_and_zero_asks_no_judge(spy, weight):
    scorer = InProcessScorer(AlgorithmConfig(consistency_weight=weight), JudgeConfig(), judge=spy)
    a, b = _prompt(1, "grounded"), _prompt(1, "textual")
    b_texts = [
        "<think>the red circle is red</think><answer>red</answer>",
        "<think>it is red</think><answer>red</answer>",
    ]
    try:
        [grounded, textual] = list(scorer.score_stream([_group(a, [GOOD_A]), _group(b, b_texts)], [a, b], step=1))
        m = scorer.metrics()
    finally:
        scorer.close()
    assert m["refcache/size"] == 1  # the grounded stream still provides references
    if weight == 0:  # no component, no judge call: textual reward = format + accuracy
        assert [r.rewards for r in textual] == [{"format": 1.0, "accuracy": 1.0}] * 2
        assert [r.reward for r in textual] == [2.0, 2.0]
        assert spy.requests == [] and m["reward/consistency_off"] == 2
    else:  # the judge's 1.0 and 0.7 (see test_consistency_comes_from_the_judge), scaled by 0.5
        assert [r.rewards["consistency"] for r in textual] == [1.0, 0.7]
        assert [r.reward for r in textual] == [2.5, 2.35]


def test_consistency_weight_is_validated():
    from ivgr_dist.config import ConfigError

    with pytest.raises(ConfigError, match=r"algorithm.consistency_weight.*-1.*\[0, 10\]"):
        AlgorithmConfig(consistency_weight=-1)


def test_free_form_answer_goes_to_equivalence(scorer, spy):
    s = _prompt(2, "single", answer="17", qtype="free_form")
    texts = ["<think>10+7</think><answer>The answer is 17</answer>", "<think>x</think><answer>18</answer>",
             "<think>x</think><answer>17</answer>"]  # fmt: skip
    [group] = list(scorer.score_stream([_group(s, texts)], [s], step=1))
    assert [r.rewards["accuracy"] for r in group] == [1.0, 0.0, 1.0]
    assert [r.reward for r in group] == [2.5, 1.0, 2.5]
    # The exact match needs no judge; the two others do.
    assert [(q.kind, q.candidate, q.reference, q.fallback) for q in spy.requests] == [
        ("equivalence", "The answer is 17", "17", 0.0),
        ("equivalence", "18", "17", 0.0),
    ]


def test_textual_waits_for_its_grounded_partner(scorer):
    a, b, s = _prompt(1, "grounded"), _prompt(1, "textual"), _prompt(2, "single", answer="17", qtype="math")
    groups = [_group(b, ["<think>the red circle</think><answer>red</answer>"]),
              _group(s, ["<think>10+7</think><answer>17</answer>"]), _group(a, [GOOD_A])]  # fmt: skip
    order = [g[0].prompt.stream for g in scorer.score_stream(groups, [a, b, s], step=3)]
    assert order.index("grounded") < order.index("textual") and sorted(order) == ["grounded", "single", "textual"]
    assert groups[0][0].rewards["consistency"] == 1.0  # judged against THIS step's reference
    assert scorer.references.get(1).step == 3


def test_lost_partner_still_scored_and_counted(scorer):
    a, b = _prompt(5, "grounded"), _prompt(5, "textual")
    out = list(scorer.score_stream([_group(b, ["<think>a</think><answer>red</answer>"])], [a, b], step=1))
    assert len(out) == 1 and out[0][0].rewards["accuracy"] == 1.0
    assert scorer.metrics()["reward/textual_without_partner"] == 1


def test_a_raising_judge_falls_back_and_counts():
    cfg = JudgeConfig(fallback_consistency=0.3, on_failure="zero")
    scorer = InProcessScorer(AlgorithmConfig(), cfg, judge=SpyJudge(fail=True))
    try:
        a, b = _prompt(1, "grounded"), _prompt(1, "textual")
        out = list(scorer.score_stream([_group(a, [GOOD_A]), _group(b, ["<think>x</think><answer>red</answer>"])],
                                       [a, b], step=1))  # fmt: skip
        assert out[1][0].rewards["consistency"] == 0.3
        assert scorer.metrics()["judge/failures"] == 1
    finally:
        scorer.close()


def test_state_round_trips_through_json_and_factory_picks_in_process(scorer):
    a = _prompt(9, "grounded")
    list(scorer.score_stream([_group(a, [GOOD_A])], [a], step=2))
    restored = make_scorer(RewardConfig(num_workers=0), AlgorithmConfig())
    try:
        assert isinstance(restored, InProcessScorer) and isinstance(restored.judge, RuleJudge)
        restored.load_state_dict(json.loads(json.dumps(scorer.state_dict())))
        assert restored.references.get(9) == scorer.references.get(9)
    finally:
        restored.close()


def test_judge_result_counters_are_summed():
    class Costly(SpyJudge):
        async def score(self, requests):
            return [JudgeResult(score=1.0, calls=3, retries=2, timeouts=1, latency_s=0.5) for _ in requests]

    scorer = InProcessScorer(AlgorithmConfig(), JudgeConfig(), judge=Costly())
    try:
        s = _prompt(3, "single", answer="17", qtype="free_form")
        list(scorer.score_stream([_group(s, ["<answer>x</answer>", "<answer>y</answer>"])], [s], step=1))
        m = scorer.metrics()
        assert (m["judge/calls"], m["judge/retries"], m["judge/timeouts"]) == (6, 4, 2)
        assert m["judge/latency_p50_s"] == 0.5 and m["judge/latency_p99_s"] == 0.5
    finally:
        scorer.close()


def test_factory_passes_reward_recipe_exact_to_the_scorer():
    # Entries [60,60,50,50] (unordered), A, A with A = [10,10,50,50]: the recipe compares only the first
    # 3 // 2 = 1 parsed entry (the unordered one, IoU 0 with everything) -> box_valid 2/3; by default A ~ A -> 0.
    text = (
        "<think><box>[60,60,50,50]</box> <box>[10,10,50,50]</box> <box>[10,10,50,50]</box></think><answer>red</answer>"
    )
    for recipe_exact, expected in ((True, 2 / 3), (False, 0.0)):
        scorer = make_scorer(RewardConfig(num_workers=0, recipe_exact=recipe_exact), AlgorithmConfig())
        try:
            assert scorer.recipe_exact is recipe_exact
            a = _prompt(3, "grounded")
            [scored] = list(scorer.score_stream([_group(a, [text])], [a], step=1))
            assert scored[0].rewards["box_valid"] == pytest.approx(expected)
        finally:
            scorer.close()
