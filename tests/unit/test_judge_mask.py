"""``reward.judge.on_failure``: a failed judge request scores its fallback (``zero``) or is left out (``mask``).

``mask`` (docs/algorithm.md, 3.3): a failed consistency removes consistency from every rollout of its textual
group; a failed judged accuracy excludes that rollout from its group's advantage (advantage 0, not in the
group's mean and std). The judge here is the rule judge, except for the requests chosen to fail.
"""

from __future__ import annotations

import pytest
import torch

from ivgr_dist.commands.evaluate import EvalScorer
from ivgr_dist.config import AlgorithmConfig, ConfigError, JudgeConfig, load_config
from ivgr_dist.driver.trainer import rollout_advantages
from ivgr_dist.learner.grpo import group_advantages
from ivgr_dist.reward.judge import JudgeResult
from ivgr_dist.reward.judge.rule import RuleJudge
from ivgr_dist.reward.scorer import InProcessScorer
from ivgr_dist.reward.summary import reward_metrics
from ivgr_dist.types import Prompt, Rollout

GOOD_A = "<think>the red circle <box>[10,10,50,50]</box> is red</think><answer>red</answer>"
# Textual reasoning against GOOD_A's, as the rule judge scores it: 1.0, 0.0, 0.7, 0.3.
B_THINKS = ["the red circle is red", "the circle is blue", "it is red", "the blue square"]
FALLBACK = 0.3


def _prompt(idx: int, stream: str, answer: str = "red", qtype: str = "exact") -> Prompt:
    return Prompt(
        original_idx=idx, stream=stream, prompt_text="", prompt_token_ids=[1], num_prompt_tokens=1, answer=answer,
        question_type=qtype, datasource="t", target_boxes=[[10, 10, 50, 50]] if stream != "single" else [],
        question="What color is the circle?",
    )  # fmt: skip


def _group(prompt: Prompt, texts: list[str]) -> list[Rollout]:
    return [Rollout(prompt, i, [1], t, [-0.1], 0) for i, t in enumerate(texts)]


class FailingJudge:
    """The rule judge, except that a request whose candidate contains one of ``fail_on`` fails as a backend
    reports it when every try failed (its fallback, ``failed=True``), and a batch holding one of ``raise_on``
    raises."""

    def __init__(self, fail_on=(), raise_on=()):
        self.inner, self.fail_on, self.raise_on = RuleJudge(), tuple(fail_on), tuple(raise_on)
        self.requests = []

    async def score(self, requests):
        self.requests.extend(requests)
        if any(s in q.candidate for q in requests for s in self.raise_on):
            raise RuntimeError("judge exploded")
        results = await self.inner.score(requests)
        return [
            JudgeResult(score=q.fallback, calls=1, failed=True) if any(s in q.candidate for s in self.fail_on) else res
            for q, res in zip(requests, results, strict=True)
        ]

    async def close(self):
        return None


def _score(on_failure: str, groups: list[list[Rollout]], judge: FailingJudge, step: int = 1):
    cfg = JudgeConfig(fallback_consistency=FALLBACK, on_failure=on_failure)
    scorer = InProcessScorer(AlgorithmConfig(), cfg, judge=judge)
    try:
        prompts = [g[0].prompt for g in groups]
        out = list(scorer.score_stream(groups, prompts, step))
        return {g[0].prompt.uid: g for g in out}, scorer.metrics(), scorer
    finally:
        scorer.close()


def _textual_batch(idx: int = 1) -> list[list[Rollout]]:
    a, b = _prompt(idx, "grounded"), _prompt(idx, "textual")
    return [_group(a, [GOOD_A]), _group(b, [f"<think>{t}</think><answer>red</answer>" for t in B_THINKS])]


def _advantages(group: list[Rollout]) -> list[float]:
    return rollout_advantages(group, eps=1e-6)


def test_zero_scores_the_fallback_and_trains_on_it():
    out, m, _ = _score("zero", _textual_batch(), FailingJudge(fail_on=["the circle is blue"]))
    textual = out["1:textual"]
    assert [r.rewards["consistency"] for r in textual] == [1.0, FALLBACK, 0.7, 0.3]
    assert [r.reward for r in textual] == [3.0, 2.0 + FALLBACK, 2.7, 2.3]
    assert not any(r.excluded for r in textual)
    assert m["judge/failures"] == 1
    assert (m["reward/judge_masked_rollouts"], m["reward/judge_masked_groups"]) == (0.0, 0.0)
    assert m["reward/judge_excluded_rollouts"] == 0.0
    expected = group_advantages(torch.tensor([3.0, 2.3, 2.7, 2.3], dtype=torch.float64), ["g"] * 4)
    assert _advantages(textual) == pytest.approx(expected.tolist())


def test_mask_drops_a_failed_consistency_for_the_whole_group():
    out, m, _ = _score("mask", _textual_batch(), FailingJudge(fail_on=["the circle is blue"]))
    textual = out["1:textual"]
    # No rollout keeps consistency (the judged ones neither): the group is compared on format + accuracy.
    assert [r.rewards for r in textual] == [{"format": 1.0, "accuracy": 1.0}] * 4
    assert [r.reward for r in textual] == [2.0] * 4 and not any(r.excluded for r in textual)
    assert _advantages(textual) == [0.0] * 4  # equal rewards: no signal rather than a biased one
    assert out["1:grounded"][0].rewards == {"format": 1.0, "accuracy": 1.0, "box_valid": 1.0, "box_iou": 1.0}
    assert m["judge/failures"] == 1 and m["judge/requests"] == 4
    assert (m["reward/judge_masked_rollouts"], m["reward/judge_masked_groups"]) == (1.0, 1.0)
    assert m["reward/judge_excluded_rollouts"] == 0.0
    summary = reward_metrics(textual)
    assert "reward/textual/consistency" not in summary and summary["reward/textual/overall"] == 2.0


def test_mask_keeps_consistency_of_groups_whose_judge_answered():
    groups = _textual_batch(1) + _textual_batch(2)
    groups[1][1].response_text = "<think>the circle is blue!</think><answer>red</answer>"  # fails, record 1 only
    out, m, _ = _score("mask", groups, FailingJudge(fail_on=["blue!"]))
    assert all("consistency" not in r.rewards for r in out["1:textual"])
    assert [r.rewards["consistency"] for r in out["2:textual"]] == [1.0, 0.0, 0.7, 0.3]
    assert (m["reward/judge_masked_rollouts"], m["reward/judge_masked_groups"]) == (1.0, 1.0)
    summary = reward_metrics(out["1:textual"] + out["2:textual"])
    assert summary["reward/textual/consistency"] == pytest.approx(0.5)  # over the 4 rollouts that have it


def _free_form_group(stream: str = "single", idx: int = 3) -> list[list[Rollout]]:
    p = _prompt(idx, stream, answer="17", qtype="free_form")
    texts = ["<think>a</think><answer>17</answer>", "<think>b</think><answer>The answer is 17</answer>",
             "<think>c</think><answer>18 or so</answer>", "<think>d</think><answer>19</answer>"]  # fmt: skip
    return [_group(p, texts)]


def test_zero_scores_a_failed_equivalence_as_wrong():
    out, m, _ = _score("zero", _free_form_group(), FailingJudge(fail_on=["18 or so"]))
    group = out["3:single"]
    assert [r.rewards["accuracy"] for r in group] == [1.0, 1.0, 0.0, 0.0]
    assert [r.reward for r in group] == [2.5, 2.5, 1.0, 1.0] and not any(r.excluded for r in group)
    expected = group_advantages(torch.tensor([2.5, 2.5, 1.0, 1.0], dtype=torch.float64), ["g"] * 4)
    assert _advantages(group) == pytest.approx(expected.tolist())
    assert m["judge/failures"] == 1 and m["reward/judge_masked_rollouts"] == 0.0


def test_mask_excludes_a_rollout_whose_judged_accuracy_failed():
    out, m, _ = _score("mask", _free_form_group(), FailingJudge(fail_on=["18 or so"]))
    group = out["3:single"]
    assert [r.excluded for r in group] == [False, False, True, False]
    assert group[2].rewards == {"format": 1.0}  # the unknown accuracy is absent, not 0
    assert [r.rewards["accuracy"] for r in (group[0], group[1], group[3])] == [1.0, 1.0, 0.0]
    adv = _advantages(group)
    # Excluded: advantage 0 and not part of the others' mean and std.
    expected = group_advantages(torch.tensor([2.5, 2.5, 1.0], dtype=torch.float64), ["g"] * 3).tolist()
    assert adv[2] == 0.0 and [adv[0], adv[1], adv[3]] == pytest.approx(expected)
    assert (m["reward/judge_masked_rollouts"], m["reward/judge_masked_groups"]) == (1.0, 1.0)
    assert m["reward/judge_excluded_rollouts"] == 1.0 and m["judge/failures"] == 1
    summary = reward_metrics(group)
    assert summary["reward/single/overall"] == pytest.approx(6.0 / 3)  # over the rollouts GRPO compared
    assert summary["reward/single/accuracy"] == pytest.approx(2.0 / 3)


def test_mask_textual_rollout_with_both_components_failed_is_excluded_and_consistency_stays():
    a, b = _prompt(5, "grounded", answer="17", qtype="free_form"), _prompt(5, "textual", answer="17", qtype="free_form")
    grounded = _group(a, ["<think>the red circle <box>[10,10,50,50]</box> is red</think><answer>17</answer>"])
    thinks = ["the red circle is red", "the circle is blue", "it is red"]
    answers = ["17", "maybe 18", "The answer is 17"]
    textual = _group(b, [f"<think>{t}</think><answer>{x}</answer>" for t, x in zip(thinks, answers, strict=True)])
    out, m, _ = _score("mask", [grounded, textual], FailingJudge(fail_on=["circle is blue", "maybe 18"]))
    t = out["5:textual"]
    assert [r.excluded for r in t] == [False, True, False]
    assert t[0].rewards == {"format": 1.0, "accuracy": 1.0, "consistency": 1.0}
    assert t[1].rewards == {"format": 1.0}
    # The only failed consistency belongs to the excluded rollout: the others still compare on all three.
    assert t[2].rewards == {"format": 1.0, "accuracy": 1.0, "consistency": 0.7}
    assert [r.reward for r in t] == [3.0, 1.0, 2.7]
    assert _advantages(t)[1] == 0.0 and _advantages(t)[0] > 0 > _advantages(t)[2]
    assert (m["reward/judge_masked_rollouts"], m["reward/judge_masked_groups"]) == (1.0, 1.0)
    assert m["reward/judge_excluded_rollouts"] == 1.0 and m["judge/failures"] == 2


def test_mask_excluded_grounded_rollout_never_becomes_the_reference():
    a = _prompt(6, "grounded", answer="17", qtype="free_form")
    best = "<think>best boxes <box>[10,10,50,50]</box></think><answer>It is 17</answer>"  # judged; fails
    worse = "<think>worse boxes <box>[12,10,50,50]</box></think><answer>17</answer>"  # exact
    out, m, scorer = _score("mask", [_group(a, [best, worse])], FailingJudge(fail_on=["It is 17"]))
    assert [r.excluded for r in out["6:grounded"]] == [True, False]
    assert scorer.references.get(6).think.startswith("worse boxes")
    out, _, scorer = _score("mask", [_group(a, [best, worse])], FailingJudge())
    assert scorer.references.get(6).think.startswith("best boxes")  # with its accuracy known, the best IoU wins


def test_mask_a_raising_judge_masks_every_judged_component():
    groups = _textual_batch() + _free_form_group()
    out, m, _ = _score("mask", groups, FailingJudge(raise_on=["circle is blue", "18 or so"]))
    assert all("consistency" not in r.rewards for r in out["1:textual"])
    assert [r.excluded for r in out["3:single"]] == [False, True, True, True]  # every judged accuracy
    assert m["judge/failures"] == 4 + 3
    assert (m["reward/judge_masked_rollouts"], m["reward/judge_masked_groups"]) == (4 + 3, 2)
    assert m["reward/judge_excluded_rollouts"] == 3.0
    assert _advantages(out["3:single"]) == [0.0] * 4  # one rollout left: no baseline, no signal


def test_rollout_advantages_leave_excluded_rollouts_out():
    p, q = _prompt(1, "single"), _prompt(2, "single")
    rollouts = _group(p, ["a", "b", "c", "d"]) + _group(q, ["e", "f"])
    for r, reward in zip(rollouts, [1.0, 0.0, 5.0, 2.0, 1.0, 0.0], strict=True):
        r.reward = reward
    rollouts[2].excluded = True  # its 5.0 must not move the group's mean or std
    rollouts[4].excluded = True  # group 2 keeps one rollout: no baseline
    adv = rollout_advantages(rollouts, eps=1e-6)
    expected = group_advantages(torch.tensor([1.0, 0.0, 2.0], dtype=torch.float64), ["g"] * 3).tolist()
    assert [adv[0], adv[1], adv[3]] == pytest.approx(expected)
    assert adv[2] == 0.0 and adv[4:] == [0.0, 0.0]
    for r in rollouts:
        r.excluded = False
    everything = group_advantages(torch.tensor([1.0, 0.0, 5.0, 2.0, 1.0, 0.0], dtype=torch.float64), [1] * 4 + [2] * 2)
    assert rollout_advantages(rollouts, eps=1e-6) == pytest.approx(everything.tolist())


def test_on_failure_is_validated_and_defaults_to_mask():
    assert load_config(None).reward.judge.on_failure == "mask"
    assert load_config(None, ["reward.judge.on_failure=zero"]).reward.judge.on_failure == "zero"
    with pytest.raises(ConfigError) as err:
        load_config(None, ["reward.judge.on_failure=drop"])
    assert "reward.judge.on_failure='drop': must be one of ['zero', 'mask']" in str(err.value)


def test_evaluation_scores_failures_as_zero_whatever_the_training_setting():
    scorer = EvalScorer(AlgorithmConfig(), JudgeConfig(on_failure="mask"), judge=FailingJudge(fail_on=["18 or so"]))
    try:
        assert scorer.judge_cfg.on_failure == "zero"
        [group] = list(scorer.score_stream(_free_form_group(), [_free_form_group()[0][0].prompt], step=0))
        assert [r.rewards["accuracy"] for r in group] == [1.0, 1.0, 0.0, 0.0] and not any(r.excluded for r in group)
    finally:
        scorer.close()
