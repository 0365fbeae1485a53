"""The sample log: which rollouts ``sample_records`` picks and what a record holds; the consistency reference
the scorer keeps on textual rollouts."""

from __future__ import annotations

import json

from ivgr_dist.config import AlgorithmConfig
from ivgr_dist.driver.samples import sample_records
from ivgr_dist.reward.scorer import InProcessScorer
from ivgr_dist.types import Prompt, Rollout


def _prompt(idx: int, stream: str, answer: str = "red") -> Prompt:
    return Prompt(
        original_idx=idx,
        stream=stream,
        prompt_text=f"<|im_start|>user <|image_pad|>what colour? ({stream})<|im_end|>",
        prompt_token_ids=[1, 2],
        num_prompt_tokens=2,
        answer=answer,
        question_type="exact",
        datasource="synthetic",
        target_boxes=[[10.0, 10.0, 50.0, 50.0]] if stream == "grounded" else [],
        question="what colour?",
    )


def _group(prompt: Prompt, rewards: list[float], version: int = 3) -> list[Rollout]:
    group = []
    for i, reward in enumerate(rewards):
        r = Rollout(prompt, i, [5] * (i + 1), f"<think>t{i}</think><answer>c{i}</answer>", [-0.1] * (i + 1), version)
        r.rewards = {"format": 1.0, "accuracy": reward - 1.0}
        r.reward, r.advantage, r.weight_version_last = reward, reward - sum(rewards) / len(rewards), version + 1
        group.append(r)
    return group


def test_best_and_worst_of_the_first_groups_in_batch_order():
    g1 = _group(_prompt(4, "grounded"), [1.0, 3.0, 3.0, 0.0, 0.0])  # best: first 3.0 (1); worst: last 0.0 (4)
    g2 = _group(_prompt(9, "grounded"), [2.0, 2.0, 2.0])  # all tied: first and last
    g3 = _group(_prompt(4, "textual"), [0.5, 1.5])
    rollouts = g1 + g3 + g2
    picks = [(s["uid"], s["sample_idx"], s["pick"]) for s in sample_records(rollouts, 7, 2)]
    assert picks == [("4:grounded", 1, "best"), ("4:grounded", 4, "worst"), ("4:textual", 1, "best"),
                     ("4:textual", 0, "worst")]  # fmt: skip
    picks = [(s["uid"], s["sample_idx"], s["pick"]) for s in sample_records(rollouts, 7, 3)]
    assert picks[:3] == [("4:grounded", 1, "best"), ("4:grounded", 4, "worst"), ("9:grounded", 0, "best")]
    assert [(s["uid"], s["sample_idx"]) for s in sample_records(rollouts, 7, 4)][3] == ("9:grounded", 2)
    assert sample_records(rollouts, 7, 2) == sample_records(list(rollouts), 7, 2)  # nothing random


def test_groups_whose_rewards_differ_come_first():
    tied = _group(_prompt(1, "grounded"), [0.0, 0.0, 0.0])
    spread = _group(_prompt(2, "grounded"), [0.0, 1.0, 0.0])
    picks = [(s["uid"], s["sample_idx"], s["pick"]) for s in sample_records(tied + spread, 3, 3)]
    assert picks == [("2:grounded", 1, "best"), ("2:grounded", 2, "worst"), ("1:grounded", 0, "best")]


def test_streams_in_fixed_order_and_absent_streams_skipped():
    single = _group(_prompt(2, "single", answer="17"), [1.0])
    textual = _group(_prompt(1, "textual"), [0.0, 1.0])
    grounded = _group(_prompt(1, "grounded"), [2.0, 4.0])
    out = sample_records(single + textual + grounded, 1, 2)
    assert [s["stream"] for s in out] == ["grounded", "grounded", "textual", "textual", "single"]
    assert [s["pick"] for s in out if s["stream"] == "single"] == ["best"]  # a group of one: no worst
    assert [s["stream"] for s in sample_records(single, 1, 2)] == ["single"]
    assert sample_records([], 1, 2) == []


def test_a_record_holds_the_whole_rollout():
    grounded = _group(_prompt(4, "grounded"), [1.0, 3.0])
    textual = _group(_prompt(4, "textual"), [0.5, 1.5])
    for r in textual:
        r.consistency_reference = "the red circle <box>[10,10,50,50]</box> is red"
    out = sample_records(grounded + textual, 12, 1)
    g, t = out
    assert g == {
        "step": 12,
        "stream": "grounded",
        "uid": "4:grounded",
        "original_idx": 4,
        "sample_idx": 1,
        "pick": "best",
        "datasource": "synthetic",
        "question_type": "exact",
        "question": "what colour?",
        "prompt": "<|im_start|>user <|image_pad|>what colour? (grounded)<|im_end|>",
        "response": "<think>t1</think><answer>c1</answer>",
        "finish_reason": "stop",
        "response_tokens": 2,
        "answer": "c1",
        "ground_truth": "red",
        "rewards": {"format": 1.0, "accuracy": 2.0},
        "reward": 3.0,
        "group_reward_mean": 2.0,
        "advantage": 1.0,
        "excluded": False,
        "weight_version": 3,
        "weight_version_last": 4,
        "target_boxes": [[10.0, 10.0, 50.0, 50.0]],
    }
    assert "consistency_reference" not in g and "target_boxes" not in t
    assert t["consistency_reference"] == "the red circle <box>[10,10,50,50]</box> is red"
    assert t["advantage"] == 0.5 and t["answer"] == "c1"
    json.dumps(out, allow_nan=False)  # a JSON line as it is


GOOD_A = "<think>the red circle <box>[10,10,50,50]</box> is red</think><answer>red</answer>"


def test_scorer_keeps_the_reference_each_textual_rollout_was_judged_against():
    scorer = InProcessScorer(AlgorithmConfig())
    try:
        a, b = _prompt(1, "grounded"), _prompt(1, "textual")
        c = _prompt(2, "textual")  # no grounded partner: no reference, consistency 0
        groups = [_group(b, [0.0, 0.0]), _group(a, [0.0]), _group(c, [0.0])]
        for r in groups[0] + groups[2]:
            r.response_text = "<think>the red circle is red</think><answer>red</answer>"
        groups[1][0].response_text = GOOD_A
        scored = {g[0].prompt.uid: g for g in scorer.score_stream(groups, [a, b, c], step=1)}
        reference = scorer.references.get(1).think  # the grounded rollout's reasoning, normalised
        assert "red circle" in reference and "<box>" in reference
        assert [r.consistency_reference for r in scored["1:textual"]] == [reference, reference]
        assert scored["1:textual"][0].rewards["consistency"] > 0
        assert scored["1:grounded"][0].consistency_reference is None
        assert all(r.consistency_reference is None for r in scored["2:textual"])
        assert [s["consistency_reference"] for s in sample_records(scored["2:textual"], 1, 1)] == [None]
    finally:
        scorer.close()
