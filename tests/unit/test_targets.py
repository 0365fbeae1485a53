"""Templated SFT targets (ivgr_dist.data.targets): what the warm start teaches must score full marks."""

from __future__ import annotations

import pytest

from ivgr_dist.data.targets import infer_stream, region_words, templated_response
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
    with pytest.raises(ValueError) as err:  # a 10 MB cell is quoted cut short
        infer_stream("x", True, "g" * (10 << 20))
    assert len(str(err.value)) < 400 and "(10485760 chars)" in str(err.value)


# ------------------------------------------------------------------------------------------ search task


def _search_prompt(stream, box, label, answer, question, size=(168, 168)):
    from PIL import Image

    p = _prompt(stream, [box], [label], answer=answer, question=question)
    p.datasource = "synthetic_search"
    p.images = [Image.new("RGB", size, (255, 255, 255))]
    return p


STAR = (20.0, 30.4, 41.6, 50.0)  # centre (30.8, 40.2) of a 168 x 168 image: top left


def test_search_grounded_response_finds_then_reads_the_target():
    text = templated_response(_search_prompt("grounded", STAR, "red star", "red", "What color is the star?"))
    assert text == (
        "<think>I look for the star. It is at <box>[20,30,42,50]</box>: the red star. The answer is red.</think> "
        "<answer>red</answer>"
    )
    norm = rules.normalize_response(text)
    assert rules.format_reward(norm) == 1.0 and rules.extract_answer(norm) == "red"
    assert rules.box_valid_reward(norm) == 1.0
    assert rules.box_iou_reward(norm, [list(STAR)]) > 0.95


def test_search_textual_response_locates_the_target_in_words_and_agrees_with_grounded():
    question = "What shape is the red object?"
    grounded = templated_response(_search_prompt("grounded", STAR, "red star", "star", question))
    textual = templated_response(_search_prompt("textual", STAR, "red star", "star", question))
    assert textual == (
        "<think>I look for the red object. It is at the top left of the image: the red star. The answer is star."
        "</think> <answer>star</answer>"
    )
    assert "<box>" not in textual and "[" not in textual
    assert rules.extract_answer(rules.normalize_response(textual)) == "star"
    objects = [{"color": "red", "shape": "star", "bbox": [20, 30, 42, 50]}, {"color": "blue", "shape": "circle"}]
    context = {"objects": objects}
    assert consistency_score(rules.think_text(textual), rules.think_text(grounded), context) == 1.0
    # a textual stream that names another colour for the star contradicts the grounded one
    wrong = textual.replace("the red star", "the blue star")
    assert consistency_score(rules.think_text(wrong), rules.think_text(grounded), context) == 0.0


def test_search_words_follow_the_box_space():
    """Pixels: the box within the (resized) image; relative_1000 (Qwen3-VL): within 0..1000, whatever the image."""
    far = (120.0, 130.0, 160.0, 160.0)
    prompt = _search_prompt("textual", far, "green circle", "green", "What color is the circle?", size=(168, 336))
    assert "at the middle right of the image" in templated_response(prompt)
    assert "at the top left of the image" in templated_response(prompt, box_coords="relative_1000")
    prompt.images = []
    with pytest.raises(ValueError, match="no image"):
        templated_response(prompt)


@pytest.mark.parametrize(
    ("box", "words"),
    [
        ((0, 0, 10, 10), "top left"),
        ((50, 0, 70, 10), "top middle"),
        ((110, 0, 120, 10), "top right"),
        ((0, 50, 10, 70), "middle left"),
        ((50, 50, 70, 70), "centre"),
        ((110, 50, 120, 70), "middle right"),
        ((0, 110, 10, 120), "bottom left"),
        ((50, 110, 70, 120), "bottom middle"),
        ((110, 110, 120, 120), "bottom right"),
        ((30, 30, 50, 50), "centre"),  # a centre on the 1/3 line belongs to the cell after it
        ((0, 0, 120, 120), "centre"),
    ],
)
def test_region_words(box, words):
    assert region_words(list(box), 120, 120) == words


def test_search_prompt_without_a_colour_shape_label_is_an_error():
    prompt = _search_prompt("grounded", STAR, "object", "red", "What color is the star?")
    with pytest.raises(ValueError, match="one target labelled"):
        templated_response(prompt)
