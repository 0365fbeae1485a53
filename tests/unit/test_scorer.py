"""The in-process scorer: per-stream rewards, pair-aware ordering, references, metrics summary."""

from __future__ import annotations

import json

import pytest

from ivgr_dist.config import AlgorithmConfig
from ivgr_dist.reward.scorer import InProcessScorer, job_from_group
from ivgr_dist.reward.summary import reward_metrics
from ivgr_dist.types import Prompt, Rollout


def _prompt(idx: int, stream: str, answer="red", boxes=((10, 10, 50, 50),), qtype="exact") -> Prompt:
    return Prompt(
        original_idx=idx,
        stream=stream,
        prompt_text="",
        prompt_token_ids=[1],
        num_prompt_tokens=1,
        answer=answer,
        question_type=qtype,
        datasource="t",
        target_boxes=[list(b) for b in boxes] if stream != "single" else [],
    )


def _group(prompt: Prompt, texts: list[str]) -> list[Rollout]:
    return [Rollout(prompt, i, [1, 2], t, [-0.1, -0.2], 0) for i, t in enumerate(texts)]


GOOD_A = "<think>the red circle <box>[10,10,50,50]</box> is red</think><answer>red</answer>"
HALF_A = "<think>the circle <box>[30,10,70,50]</box></think><answer>red</answer>"
WRONG_A = "<think>hmm</think><answer>blue</answer>"


def test_grounded_rewards_and_reference_update():
    scorer = InProcessScorer(AlgorithmConfig())
    p = _prompt(7, "grounded")
    [scored] = list(scorer.score_stream([_group(p, [GOOD_A, HALF_A, WRONG_A, "garbage"])], [p], step=1))
    r = {x.sample_idx: x for x in scored}
    assert r[0].rewards == {"format": 1.0, "accuracy": 1.0, "box_valid": 1.0, "box_iou": 1.0}
    assert r[0].reward == 4.0
    # [30,10,70,50] vs [10,10,50,50]: intersection 20x40=800, union 2400 -> IoU 1/3 for recall and precision.
    assert abs(r[1].rewards["box_iou"] - 1 / 3) < 1e-9
    assert r[2].rewards["accuracy"] == 0.0 and r[2].rewards["box_valid"] == 0.0
    assert r[3].reward == 0.0
    ref = scorer.references.get(7)
    assert ref is not None and ref.box_iou == 1.0 and "red circle" in ref.think


def test_textual_waits_for_its_grounded_partner_in_the_same_batch():
    scorer = InProcessScorer(AlgorithmConfig())
    a, b, s = _prompt(1, "grounded"), _prompt(1, "textual"), _prompt(2, "single", answer="17", qtype="math")
    b_texts = ["<think>the red circle is red</think><answer>red</answer>", "<think>x</think><answer>blue</answer>"]
    groups = [_group(b, b_texts), _group(s, ["<think>10+7</think><answer>17</answer>"]), _group(a, [GOOD_A])]
    order = [g[0].prompt.stream for g in scorer.score_stream(groups, [a, b, s], step=3)]
    # B arrived first but is yielded only after A (its reference) was scored.
    assert order == ["single", "grounded", "textual"]
    textual = groups[0]
    assert textual[0].rewards["consistency"] > 0 and textual[0].rewards["accuracy"] == 1.0
    assert textual[1].rewards["accuracy"] == 0.0
    assert groups[1][0].reward == 1.0 + 1.5 * 1.0


def test_textual_without_reference_gets_zero_consistency_and_is_counted():
    scorer = InProcessScorer(AlgorithmConfig())
    a, b = _prompt(4, "grounded"), _prompt(4, "textual")
    groups = [_group(a, [WRONG_A]), _group(b, ["<think>red</think><answer>red</answer>"])]
    out = list(scorer.score_stream(groups, [a, b], step=1))
    assert out[1][0].rewards["consistency"] == 0.0
    metrics = scorer.metrics()
    assert metrics["reward/consistency_no_reference"] == 1 and metrics["refcache/size"] == 0


def test_lost_partner_still_scored_and_counted():
    scorer = InProcessScorer(AlgorithmConfig())
    a, b = _prompt(5, "grounded"), _prompt(5, "textual")
    out = list(scorer.score_stream([_group(b, ["<think>a</think><answer>red</answer>"])], [a, b], step=1))
    assert len(out) == 1 and out[0][0].rewards["accuracy"] == 1.0
    assert scorer.metrics()["reward/textual_without_partner"] == 1


def test_reference_state_round_trips_through_json():
    scorer = InProcessScorer(AlgorithmConfig())
    p = _prompt(9, "grounded")
    list(scorer.score_stream([_group(p, [GOOD_A])], [p], step=2))
    restored = InProcessScorer(AlgorithmConfig())
    restored.load_state_dict(json.loads(json.dumps(scorer.state_dict())))
    assert restored.references.get(9) == scorer.references.get(9)


def test_reward_metrics_per_stream():
    a, s = _prompt(1, "grounded"), _prompt(2, "single")
    ra = _group(a, [GOOD_A, WRONG_A])
    rs = _group(s, ["x"])
    list(InProcessScorer(AlgorithmConfig()).score_stream([ra], [a], 0))
    for r in rs:
        r.rewards, r.reward = {"format": 0.0, "accuracy": 1.0}, 1.5
    m = reward_metrics(ra + rs)
    assert m["reward/grounded/overall"] == (4.0 + 1.0) / 2  # WRONG_A: format 1 only
    assert m["reward/grounded/box_iou"] == 0.5
    assert m["reward/single/accuracy"] == 1.0 and m["rollout/single/count"] == 1.0
    assert "reward/textual/overall" not in m


# reward.recipe_exact ------------------------------------------------------------------------------------------------

# Target [10,10,50,50], answer "red" (exact): each of these answers is right (accuracy 1).
# Entries U = [60,60,50,50] (unordered), A, A with A = the target.
UNORDERED_DUP_A = (
    "<think>left <box>[60,60,50,50]</box>, then <box>[10,10,50,50]</box> and <box>[10,10,50,50]</box></think>"
    "<answer>red</answer>"
)
DECIMAL_A = "<think>the circle <box>[10.0,10,50,50]</box></think><answer>red</answer>"
BLANK_THINK_A = "<box>[10,10,50,50]</box><think></think><answer>red</answer>"  # format 0: a box before <think>


@pytest.mark.parametrize("recipe_exact", [False, True])
def test_recipe_exact_box_rules_reach_the_rewards(recipe_exact):
    # UNORDERED_DUP_A: format 1, accuracy 1, box_iou 1.0 (predictions A, A against target A) in both modes.
    #   recipe: total 3, rows = [U], IoU 0 with everything -> box_valid 2/3; reward 1 + 2/3 + 1 + 1 = 3.6667.
    #   default: A ~ A (IoU 1 > 0.9) -> box_valid 0; reward 3.0.
    # DECIMAL_A: recipe: "[10.0,10,50,50]" is not four integers -> box_valid 0, box_iou 0; reward 2.0.
    #   default: valid, equal to the target -> box_valid 1, box_iou 1; reward 4.0.
    scorer = InProcessScorer(AlgorithmConfig(), recipe_exact=recipe_exact)
    p = _prompt(11, "grounded")
    [scored] = list(scorer.score_stream([_group(p, [UNORDERED_DUP_A, DECIMAL_A])], [p], step=1))
    dup, dec = scored
    if recipe_exact:
        assert dup.rewards == pytest.approx({"format": 1.0, "accuracy": 1.0, "box_valid": 2 / 3, "box_iou": 1.0})
        assert dup.reward == pytest.approx(3 + 2 / 3)
        assert (dec.rewards["box_valid"], dec.rewards["box_iou"], dec.reward) == (0.0, 0.0, 2.0)
    else:
        assert dup.rewards == {"format": 1.0, "accuracy": 1.0, "box_valid": 0.0, "box_iou": 1.0}
        assert dup.reward == 3.0
        assert (dec.rewards["box_valid"], dec.rewards["box_iou"], dec.reward) == (1.0, 1.0, 4.0)
    # the rules-only fallback (judge failures, deadlines) applies the same rules
    fallback = scorer._fallback(job_from_group(_group(p, [UNORDERED_DUP_A]), 1))
    assert fallback.rewards[0]["box_valid"] == pytest.approx(2 / 3 if recipe_exact else 0.0)


@pytest.mark.parametrize("recipe_exact", [False, True])
def test_recipe_exact_reference_may_have_a_blank_think(recipe_exact):
    # BLANK_THINK_A: accuracy 1, box_iou 1.0 >= 0.3, think text "". The recipe's rule (accuracy 1 and box_iou >= 0.3)
    # makes it the reference; by default a blank think does not qualify and the record has no reference.
    scorer = InProcessScorer(AlgorithmConfig(), recipe_exact=recipe_exact)
    p = _prompt(12, "grounded")
    [scored] = list(scorer.score_stream([_group(p, [BLANK_THINK_A])], [p], step=1))
    assert scored[0].rewards == {"format": 0.0, "accuracy": 1.0, "box_valid": 1.0, "box_iou": 1.0}
    ref = scorer.references.get(12)
    if recipe_exact:
        assert ref is not None and ref.think == "" and ref.box_iou == 1.0
    else:
        assert ref is None


@pytest.mark.parametrize("limit", [10, 1000, 2000])
def test_the_answer_length_bound_is_the_config_key_both_ways(limit):
    """``algorithm.max_answer_chars`` is THE bound (it was min(key, 1000): raising it did nothing): an exact
    answer of ``limit`` characters scores 1, one character more scores 0 without a judge (math included)."""
    scorer = InProcessScorer(AlgorithmConfig(max_answer_chars=limit))
    ok, long = "7" * limit, "7" * (limit + 1)
    for answer in (ok, long):
        for qtype in ("exact", "math"):
            p = _prompt(1, "single", answer=answer, qtype=qtype)
            [scored] = list(scorer.score_stream([_group(p, [f"<think>x</think><answer>{answer}</answer>"])], [p], 1))
            # the ground truth is the answer itself: only the length decides
            want = 1.0 if answer is ok else 0.0
            assert scored[0].rewards["accuracy"] == want, (limit, qtype, len(answer))
    # the length counts after stripping, as in the rules
    p = _prompt(1, "single", answer=ok, qtype="exact")
    [scored] = list(scorer.score_stream([_group(p, [f"<think>x</think><answer>  {ok}  </answer>"])], [p], 1))
    assert scored[0].rewards["accuracy"] == 1.0
