"""Templated SFT targets (ivgr_dist.data.targets): what the warm start teaches must score full marks."""

from __future__ import annotations

import pytest

from ivgr_dist.data.targets import infer_stream, templated_response
from ivgr_dist.reward import rules
from ivgr_dist.reward.judge.rule import consistency_score
from ivgr_dist.types import Prompt


def _prompt(stream, boxes=(), labels=(), answer="red", question="What color is the circle?"):
    return Prompt(
        original_idx=4,
        stream=stream,
        prompt_text="",
        prompt_token_ids=[],
        num_prompt_tokens=0,
        answer=answer,
        question_type="exact" if boxes else "math",
        datasource="synthetic_shapes",
        target_boxes=[list(b) for b in boxes],
        target_labels=list(labels),
        question=question,
    )


BOXES = [(10.4, 20.6, 50.0, 61.2), (70.0, 5.0, 99.5, 40.0)]
LABELS = ["red circle", "blue square"]


def test_grounded_response_scores_full_marks():
    text = templated_response(_prompt("grounded", BOXES, LABELS))
    assert text == (
        "<think>I look at the red circle <box>[10,21,50,61]</box>, the blue square <box>[70,5,100,40]</box>. "
        "The answer is red.</think> <answer>red</answer>"
    )
    norm = rules.normalize_response(text)
    assert rules.format_reward(norm) == 1.0
    assert rules.extract_answer(norm) == "red"
    assert rules.box_valid_reward(norm) == 1.0
    assert rules.box_iou_reward(norm, [list(b) for b in BOXES]) > 0.95  # only rounding separates them


def test_textual_response_names_the_same_objects_without_boxes():
    grounded = templated_response(_prompt("grounded", BOXES, LABELS))
    textual = templated_response(_prompt("textual", BOXES, LABELS))
    assert "<box>" not in textual and "[" not in textual
    assert (
        textual == "<think>I look at the red circle, the blue square. The answer is red.</think> <answer>red</answer>"
    )
    assert consistency_score(rules.think_text(textual), rules.think_text(grounded)) == 1.0


def test_missing_labels_and_single_stream():
    text = templated_response(_prompt("grounded", BOXES[:1], []))
    assert "the object <box>[10,21,50,61]</box>" in text
    single = templated_response(_prompt("single", answer="7", question="What is 3 + 4?"))
    assert single == "<think>What is 3 + 4? The result is 7.</think> <answer>7</answer>"
    assert rules.format_reward(rules.normalize_response(single)) == 1.0


@pytest.mark.parametrize(
    ("response", "paired", "column", "expected"),
    [
        ("<think>the cat <box>[1,2,3,4]</box></think><answer>A</answer>", True, None, "grounded"),
        ("<think>the cat < box >[1,2,3,4]</box></think><answer>A</answer>", True, None, "grounded"),
        ("<think>the cat</think><answer>A</answer>", True, None, "textual"),
        ("<think>2+2</think><answer>4</answer>", False, None, "single"),
        ("<think>the cat</think><answer>A</answer>", True, "grounded", "grounded"),
    ],
)
def test_infer_stream(response, paired, column, expected):
    assert infer_stream(response, paired, column) == expected


def test_infer_stream_rejects_unknown_stream_column():
    with pytest.raises(ValueError, match="stream='both'"):
        infer_stream("x", True, "both")
