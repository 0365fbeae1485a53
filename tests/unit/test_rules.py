"""Tests of the iVGR rule rewards (ivgr_dist.reward.rules)."""

from __future__ import annotations

import concurrent.futures
import math
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ivgr_dist.reward import rules
from ivgr_dist.reward.rules import (
    MAX_ANSWER_CHARS,
    QUESTION_TYPES,
    SINGLE_ACCURACY_WEIGHT,
    box_iou_reward,
    box_valid_reward,
    choice_letter,
    choice_match,
    exact_match,
    extract_answer,
    format_reward,
    grounded_box_rewards,
    grounded_overall,
    iou,
    iou_matrix,
    math_match,
    normalize_response,
    parse_boxes,
    question_kind,
    rule_accuracy,
    single_overall,
    textual_overall,
    think_text,
    valid_boxes,
    validate_target_boxes,
)


def grounded(*boxes: str, answer: str = "B") -> str:
    body = " and ".join(f"<box>{b}</box>" for b in boxes)
    return f"<think>I see {body}.</think><answer>{answer}</answer>"


# ---------------------------------------------------------------------------------------------------------------------
# normalize_response
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("", ""),
        (None, ""),
        ("   plain text  ", "plain text"),
        ("< think > a b </ think >", "<think>a b</think>"),
        ("<answer>\n 42 \n</ answer >", "<answer>42</answer>"),
        ("< box >[1, 2, 3, 4]< / box >", "<box>[1, 2, 3, 4]</box>"),
        ("1 / 2 and x > 3", "1/2 and x>3"),
        ("\t<think>\u3000x\u3000</think>\n\n<answer>y</answer>  ", "<think>x</think><answer>y</answer>"),
        ("a  b", "a  b"),
    ],
)
def test_normalize_response(raw, expected):
    assert normalize_response(raw) == expected


@given(st.text())
def test_normalize_is_idempotent_and_leaves_no_space_around_delimiters(text):
    out = normalize_response(text)
    assert normalize_response(out) == out
    for i, c in enumerate(out):
        if c in "<>/":
            assert i == 0 or not out[i - 1].isspace()
            assert i == len(out) - 1 or not out[i + 1].isspace()


# ---------------------------------------------------------------------------------------------------------------------
# format_reward
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        ("<think>reason</think><answer>B</answer>", 1.0),
        ("<think> reason </think>\n\n<answer> B </answer>\n", 1.0),
        ("< think >reason</ think >< answer >B</ answer >", 1.0),
        ("<think>see <box>[1,2,3,4]</box></think><answer>cat</answer>", 1.0),
        ("<think></think><answer></answer>", 1.0),  # empty blocks are allowed (accuracy handles empty answers)
        ("", 0.0),
        (None, 0.0),
        ("just an answer", 0.0),
        ("<think>reason</think>", 0.0),
        ("<answer>B</answer>", 0.0),
        ("<think>reason</think>B", 0.0),
        ("Sure! <think>reason</think><answer>B</answer>", 0.0),  # text before
        ("<think>reason</think><answer>B</answer> done", 0.0),  # text after
        ("<think>reason</think> so <answer>B</answer>", 0.0),  # text between
        ("<answer>B</answer><think>reason</think>", 0.0),  # wrong order
        ("<think>a<think>b</think></think><answer>B</answer>", 0.0),  # nested think
        ("<think>a</think><answer>B<answer>C</answer></answer>", 0.0),  # nested answer
        ("<think>a</think><think>b</think><answer>B</answer>", 0.0),  # two thinks
        ("<think>a</think><answer>B</answer><answer>C</answer>", 0.0),  # two answers
        ("<think>a <answer>x</think><answer>B</answer>", 0.0),  # stray open tag in think
        ("<think>a</answer></think><answer>B</answer>", 0.0),  # stray close tag in think
        ("<Think>a</Think><Answer>B</Answer>", 0.0),  # tags are case-sensitive
        ("<think>a</think><answer>B", 0.0),  # unclosed answer
        ("<think>x < y and y > z</think><answer>B</answer>", 1.0),  # comparison signs are fine
    ],
)
def test_format_reward(response, expected):
    assert format_reward(response) == expected


def _format_oracle(text: str) -> float:
    s = normalize_response(text)
    counts_ok = all(s.count(t) == 1 for t in ("<think>", "</think>", "<answer>", "</answer>"))
    ok = counts_ok and s.startswith("<think>") and s.endswith("</answer>") and "</think><answer>" in s
    return 1.0 if ok else 0.0


_TAGGY = st.lists(
    st.sampled_from(["<think>", "</think>", "<answer>", "</answer>", "< think >", "</ answer >", "x", " ", "\n", "<"]),
    max_size=12,
).map("".join)


@given(_TAGGY)
def test_format_reward_matches_string_oracle(text):
    assert format_reward(text) == _format_oracle(text)


# ---------------------------------------------------------------------------------------------------------------------
# extract_answer / think_text
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        ("<think>r</think><answer> B </answer>", "B"),
        ("<think>r</think>< answer >\n cat \n</ answer >", "cat"),
        ("<answer>first</answer> then <answer>second</answer>", "second"),
        ("<answer>a<answer>inner</answer>", "inner"),
        ("<think>r</think><answer>unclosed", None),
        ("no tags", None),
        ("", None),
        (None, None),
        ("</answer><answer>", None),
        ("<answer></answer>", ""),
    ],
)
def test_extract_answer(response, expected):
    assert extract_answer(response) == expected


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        ("<think> look at <box>[1,2,3,4]</box> </think><answer>B</answer>", "look at<box>[1,2,3,4]</box>"),
        ("< think >a</ think >", "a"),
        ("<answer>B</answer>", ""),
        ("<think>unclosed", ""),
        ("", ""),
    ],
)
def test_think_text(response, expected):
    assert think_text(response) == expected


# ---------------------------------------------------------------------------------------------------------------------
# parse_boxes
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "coords", "valid"),
    [
        ("[1,2,3,4]", (1.0, 2.0, 3.0, 4.0), True),
        ("[ 10 , 20 ,30, 40 ]", (10.0, 20.0, 30.0, 40.0), True),
        ("[1.5,2.25,3.,4.75]", (1.5, 2.25, 3.0, 4.75), True),
        ("[.5,1,2,3]", (0.5, 1.0, 2.0, 3.0), True),
        ("[-10,-20,-5,-1]", (-10.0, -20.0, -5.0, -1.0), True),  # negative but ordered: valid
        ("[30,40,10,20]", (30.0, 40.0, 10.0, 20.0), False),  # swapped: invalid, not repaired
        ("[10,40,30,20]", (10.0, 40.0, 30.0, 20.0), False),  # only y swapped
        ("[10,10,10,20]", (10.0, 10.0, 10.0, 20.0), False),  # zero width
        ("[1,2,3]", None, False),
        ("[1,2,3,4,5]", None, False),
        ("cat", None, False),
        ("", None, False),
        ("[a,b,c,d]", None, False),
        ("1,2,3,4", None, False),  # no brackets
        ("[1e3,2,3000,4000]", None, False),  # no exponent notation
        ("[+1,2,3,4]", None, False),  # no plus sign
        ("[1,2,3,4] cat", None, False),
        ("[" + "9" * 400 + ",0,1,1]", (math.inf, 0.0, 1.0, 1.0), False),  # overflows to inf
        ("[0,0," + "9" * 400 + ",1]", (0.0, 0.0, math.inf, 1.0), False),
        ("[-" + "9" * 400 + ",0,1,1]", (-math.inf, 0.0, 1.0, 1.0), False),
    ],
)
def test_parse_single_box(content, coords, valid):
    (entry,) = parse_boxes(f"<think><box>{content}</box></think>")
    assert entry.coords == coords
    assert entry.valid is valid


def test_parse_boxes_whole_response_and_whitespace_tags():
    r = "<think>a <box>[1,2,3,4]</box> b < box >[5,6,7,8]</ box ></think><answer><box>[0,0,1,1]</box></answer>"
    assert [e.coords for e in parse_boxes(r)] == [(1, 2, 3, 4), (5, 6, 7, 8), (0, 0, 1, 1)]
    assert valid_boxes(r) == [(1, 2, 3, 4), (5, 6, 7, 8), (0, 0, 1, 1)]


def test_parse_boxes_edge_structure():
    assert parse_boxes("") == []
    assert parse_boxes(None) == []
    assert parse_boxes("<box>[1,2,3,4]") == []  # unclosed: not an entry
    assert parse_boxes("[1,2,3,4]</box>") == []
    nested = parse_boxes("<box><box>[1,2,3,4]</box></box>")
    assert len(nested) == 1 and nested[0].coords is None  # non-greedy: one malformed entry
    assert len(parse_boxes("<box>[1,2,3,4]</box><box>[1,2,3,4]</box><box>x")) == 2


# ---------------------------------------------------------------------------------------------------------------------
# iou
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ([0, 0, 10, 10], [0, 0, 10, 10], 1.0),
        ([0, 0, 10, 10], [5, 0, 15, 10], 50 / 150),  # half overlap
        ([0, 0, 10, 10], [5, 5, 15, 15], 25 / 175),
        ([0, 0, 10, 10], [10, 0, 20, 10], 0.0),  # touching edges
        ([0, 0, 10, 10], [20, 20, 30, 30], 0.0),
        ([0, 0, 10, 10], [2, 2, 4, 4], 4 / 100),  # contained
        ([0, 0, 10, 10], [0, 0, 10, 9], 0.9),
        ([-10, -10, 0, 0], [-5, -10, 5, 0], 50 / 150),
        ([0.5, 0.5, 1.5, 1.5], [1.0, 0.5, 2.0, 1.5], 0.5 / 1.5),
        ([10, 10, 0, 0], [10, 10, 0, 0], 0.0),  # swapped (degenerate)
        ([0, 0, 0, 10], [0, 0, 0, 10], 0.0),  # zero area
        ([0, 0, math.nan, 10], [0, 0, 10, 10], 0.0),
        ([0, 0, math.inf, 10], [0, 0, 10, 10], 0.0),
        ([-math.inf, 0, math.inf, 10], [-math.inf, 0, math.inf, 10], 0.0),
    ],
)
def test_iou_hand_computed(a, b, expected):
    assert iou(a, b) == pytest.approx(expected, abs=1e-12)
    assert iou_matrix([a], [b])[0, 0] == pytest.approx(expected, abs=1e-12)


def test_iou_extreme_but_finite_coordinates():
    big = [0.0, 0.0, 1e200, 1e200]  # area overflows a float; the ratio fallback still gives 1
    assert iou(big, big) == 1.0
    half = [5e199, 0.0, 1.5e200, 1e200]
    assert iou(big, half) == pytest.approx(1 / 3)
    tiny = [0.0, 0.0, 1e-200, 1e-200]  # area underflows to 0
    assert iou(tiny, tiny) == 1.0
    assert iou_matrix([big, tiny], [big, tiny]).ravel().tolist() == pytest.approx([1.0, 0.0, 0.0, 1.0])


coord = st.integers(min_value=-100_000, max_value=100_000)
fcoord = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False)


@st.composite
def valid_box(draw, c=coord):
    x1, x2 = sorted(draw(st.lists(c, min_size=2, max_size=2, unique=True)))
    y1, y2 = sorted(draw(st.lists(c, min_size=2, max_size=2, unique=True)))
    return (x1, y1, x2, y2)


any_box = st.tuples(fcoord, fcoord, fcoord, fcoord)


@given(any_box, any_box)
def test_iou_symmetric_and_bounded(a, b):
    v = iou(a, b)
    assert 0.0 <= v <= 1.0
    assert v == iou(b, a)


@given(st.one_of(valid_box(), valid_box(fcoord)))
def test_iou_self_is_one(a):
    assert iou(a, a) == 1.0


@given(st.lists(any_box, min_size=1, max_size=6), st.lists(any_box, min_size=1, max_size=6))
def test_iou_matrix_agrees_with_scalar(a, b):
    m = iou_matrix(a, b)
    assert m.shape == (len(a), len(b))
    for i, ba in enumerate(a):
        for j, bb in enumerate(b):
            assert m[i, j] == pytest.approx(iou(ba, bb), abs=1e-9)


# ---------------------------------------------------------------------------------------------------------------------
# box_valid_reward
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        (grounded("[1,2,3,4]"), 1.0),
        (grounded("[1,2,3,4]", "[10,10,20,20]"), 1.0),
        (grounded("[1,2,3,4]", "[30,40,10,20]"), 0.5),  # one swapped
        (grounded("[1,2,3,4]", "[1,2,3]"), 0.5),  # one 3-number box
        (grounded("[1,2,3,4]", "[1,2,3]", "cat", "[5,5,6,6]"), 0.5),
        (grounded("[1.5,2,3.5,4]", "[-10,-10,-5,-5]"), 1.0),  # floats and negatives
        (grounded("[1,2,3]"), 0.0),  # only malformed
        (grounded("[30,40,10,20]"), 0.0),  # only swapped
        (grounded("[" + "9" * 400 + ",0,1,1]", "[0,0,1,1]"), 0.5),  # huge number -> inf -> invalid
        ("<think>no boxes</think><answer>B</answer>", 0.0),
        ("", 0.0),
        (None, 0.0),
        ("< box >[1,2,3,4]</ box >", 1.0),  # box outside a think block still counts
    ],
)
def test_box_valid_reward(response, expected):
    assert box_valid_reward(response) == pytest.approx(expected)


def test_box_valid_duplicates():
    # IoU 1 -> duplicate -> 0
    assert box_valid_reward(grounded("[0,0,10,10]", "[0,0,10,10]")) == 0.0
    # IoU 0.91 > 0.9 -> duplicate -> 0
    assert iou([0, 0, 100, 100], [0, 0, 100, 91]) == pytest.approx(0.91)
    assert box_valid_reward(grounded("[0,0,100,100]", "[0,0,100,91]")) == 0.0
    # IoU exactly 0.9 is NOT a duplicate
    assert iou([0, 0, 10, 10], [0, 0, 10, 9]) == 0.9
    assert box_valid_reward(grounded("[0,0,10,10]", "[0,0,10,9]")) == 1.0
    # duplicates among invalid entries do not count; the invalid entries still lower the share
    assert box_valid_reward(grounded("[10,10,0,0]", "[10,10,0,0]", "[0,0,5,5]")) == pytest.approx(1 / 3)
    # threshold is configurable
    assert box_valid_reward(grounded("[0,0,10,10]", "[0,0,10,9]"), dup_iou=0.5) == 0.0


def test_box_valid_dup_scope_first_half_vs_all():
    # 3 valid boxes; the recipe only compares box 0 (i < 3 // 2) with the others, so the duplicate pair (1, 2)
    # goes unnoticed with "first_half" and is caught with "all".
    r = grounded("[0,0,10,10]", "[50,50,60,60]", "[50,50,60,60]")
    assert box_valid_reward(r, dup_scope="first_half") == 1.0
    assert box_valid_reward(r, dup_scope="all") == 0.0
    assert box_valid_reward(r) == 0.0  # default is "all"
    # a duplicate involving a first-half box is caught by both
    r2 = grounded("[0,0,10,10]", "[50,50,60,60]", "[0,0,10,10]")
    assert box_valid_reward(r2, dup_scope="first_half") == 0.0
    assert box_valid_reward(r2, dup_scope="all") == 0.0
    with pytest.raises(ValueError, match="dup_scope"):
        box_valid_reward(r, dup_scope="some")


def _spread_boxes(n: int) -> list[str]:
    return [f"[{20 * i},{20 * i},{20 * i + 10},{20 * i + 10}]" for i in range(n)]


@pytest.mark.parametrize("scope", ["all", "first_half"])
def test_box_valid_many_boxes_uses_same_rule_on_numpy_path(scope):
    n = 40  # 40 * 40 pairs > the numpy threshold
    boxes = _spread_boxes(n)
    assert box_valid_reward(grounded(*boxes), dup_scope=scope) == 1.0
    with_dup = boxes + [boxes[-1]]  # duplicate of the last box: both indices are in the second half
    expected = 1.0 if scope == "first_half" else 0.0
    assert box_valid_reward(grounded(*with_dup), dup_scope=scope) == expected
    assert box_valid_reward(grounded(*([boxes[0]] + boxes)), dup_scope=scope) == 0.0
    # IoU exactly 0.9 with box 0 ([0,0,10,10]) is not a duplicate on the numpy path either
    assert box_valid_reward(grounded(*(["[0,0,10,9]"] + boxes)), dup_scope=scope) == 1.0
    assert box_valid_reward(grounded(*(["[0,0,10,9.5]"] + boxes)), dup_scope=scope) == 0.0


# ---------------------------------------------------------------------------------------------------------------------
# recipe_exact: the public recipe's box rules
# ---------------------------------------------------------------------------------------------------------------------


def test_recipe_exact_unordered_box_in_the_first_half_takes_the_place_of_a_duplicate():
    # Entries: U = [50,50,0,0] (unordered; the same region as A, corners swapped), A = [0,0,50,50], A' = [0,0,50,50].
    # recipe: total = 3, total // 2 = 1; the parsed list is [U, A, A'], so only U (row 0) is compared with A and A'.
    #   U has an empty intersection with every box (largest x1 = 50 > smallest x2 = 0): IoU 0, no duplicate.
    #   box_valid = valid / total = 2 / 3.
    # default ("all"): valid boxes [A, A'], IoU(A, A') = 1 > 0.9 -> 0.
    # "first_half": valid boxes [A, A'], row 0 = A, IoU(A, A') = 1 -> 0.
    r = grounded("[50,50,0,0]", "[0,0,50,50]", "[0,0,50,50]")
    assert iou([50, 50, 0, 0], [0, 0, 50, 50]) == 0.0
    assert box_valid_reward(r, recipe_exact=True) == pytest.approx(2 / 3)
    assert box_valid_reward(r) == 0.0
    assert box_valid_reward(r, dup_scope="first_half") == 0.0


def test_recipe_exact_unordered_box_duplicating_a_later_box_is_not_a_duplicate():
    # Entries: U = [100,100,0,0] (unordered), A = [0,0,100,100] (U's region, ordered), B = [200,200,300,300],
    # B2 = [200,200,300,310].
    # IoU(B, B2) = 100*100 / (100*110) = 0.90909 > 0.9; IoU(U, anything) = 0 (empty intersection).
    # recipe: total = 4, rows = parsed[:2] = [U, A]; U vs A, B, B2: 0; A vs U, B, B2: 0 -> no duplicate;
    #   box_valid = 3 valid / 4 entries = 0.75 (B ~ B2 are both in the second half).
    # default ("all"): valid [A, B, B2], B ~ B2 -> 0.
    r = grounded("[100,100,0,0]", "[0,0,100,100]", "[200,200,300,300]", "[200,200,300,310]")
    assert iou([200, 200, 300, 300], [200, 200, 300, 310]) == pytest.approx(10000 / 11000)
    assert box_valid_reward(r, recipe_exact=True) == 0.75
    assert box_valid_reward(r) == 0.0


def test_recipe_exact_first_half_of_all_parsed_entries_vs_of_valid_boxes():
    # Entries: U1 = [10,10,0,0], U2 = [30,30,20,20] (both unordered), A = [0,0,10,10], A' = [0,0,10,10].
    # First half of the VALID boxes: [A]; first total // 2 = 2 of ALL parsed entries: [U1, U2].
    # recipe: U1, U2 have IoU 0 with everything -> no duplicate; box_valid = 2 valid / 4 entries = 0.5.
    # default ("all") and "first_half" (A vs A'): IoU 1 > 0.9 -> 0.
    r = grounded("[10,10,0,0]", "[30,30,20,20]", "[0,0,10,10]", "[0,0,10,10]")
    assert box_valid_reward(r, recipe_exact=True) == 0.5
    assert box_valid_reward(r) == 0.0
    assert box_valid_reward(r, dup_scope="first_half") == 0.0
    # The other way round: two 3-number entries, then A = [0,0,10,10], B = [50,50,60,60], B' = [50,50,60,60].
    # recipe: total = 5, total // 2 = 2, parsed = [A, B, B'], rows [A, B]; IoU(B, B') = 1 -> 0.
    # "first_half": valid [A, B, B'], 3 // 2 = 1 row (A), A vs B, B': IoU 0 -> 3 valid / 5 entries = 0.6.
    # default ("all"): B ~ B' -> 0.
    r2 = grounded("[1,2,3]", "[1,2,3]", "[0,0,10,10]", "[50,50,60,60]", "[50,50,60,60]")
    assert box_valid_reward(r2, recipe_exact=True) == 0.0
    assert box_valid_reward(r2, dup_scope="first_half") == 0.6
    assert box_valid_reward(r2) == 0.0


@pytest.mark.parametrize(
    ("boxes", "expected"),
    [
        # A = [0,0,10,10], B = [20,20,30,30], "[1,2,3]" malformed. recipe: total 3, rows = parsed[:1] = [A]; A vs B:
        # IoU 0 -> 2 valid / 3 entries. default: A vs B: 0 -> 2 / 3.
        (("[0,0,10,10]", "[1,2,3]", "[20,20,30,30]"), 2 / 3),
        # A, B, A: recipe rows = [A], IoU(A, A) = 1 -> 0; default: A ~ A -> 0.
        (("[0,0,10,10]", "[20,20,30,30]", "[0,0,10,10]"), 0.0),
        # A, B: IoU 0, 2 / 2 = 1 in both. A and A' = [0,0,10,9]: IoU exactly 0.9 is not above 0.9 -> 1 in both.
        (("[0,0,10,10]", "[20,20,30,30]"), 1.0),
        (("[0,0,10,10]", "[0,0,10,9]"), 1.0),
        # negative integers parse in both grammars: [-10,-10,-5,-5] and A, IoU 0 -> 1.
        (("[-10,-10,-5,-5]", "[0,0,10,10]"), 1.0),
        # one swapped box, alone: 0 valid -> 0 in both.
        (("[30,40,10,20]",), 0.0),
    ],
)
def test_recipe_exact_and_default_agree(boxes, expected):
    r = grounded(*boxes)
    assert box_valid_reward(r, recipe_exact=True) == pytest.approx(expected)
    assert box_valid_reward(r) == pytest.approx(expected)


def test_recipe_exact_grammar_is_four_integers():
    # A = [0,0,10,10] and S = [1.5,2,3.5,4] (decimals). Target T = [0,0,10,10].
    # recipe: S does not parse -> invalid, not a prediction. box_valid = 1 / 2 = 0.5; box_iou: preds [A], recall 1,
    #   precision 1 -> 1.0.
    # default: both valid, IoU(A, S) = 4 / 100 = 0.04 (no duplicate) -> box_valid 1.0; box_iou: recall = 1,
    #   precision = (1 + 0.04) / 2 = 0.52 -> 0.5 * (1 + 0.52) = 0.76.
    r = grounded("[0,0,10,10]", "[1.5,2,3.5,4]")
    targets = [[0, 0, 10, 10]]
    assert grounded_box_rewards(r, targets, recipe_exact=True) == pytest.approx((0.5, 1.0))
    assert grounded_box_rewards(r, targets) == pytest.approx((1.0, 0.76))
    assert box_iou_reward(r, targets, recipe_exact=True) == pytest.approx(1.0)
    assert valid_boxes(r, recipe_exact=True) == [(0.0, 0.0, 10.0, 10.0)]
    [a, s] = parse_boxes(r, recipe_exact=True)
    assert a.valid and s.coords is None and not s.valid
    # A decimal copy of A: a duplicate by default (IoU 1 -> 0); in the recipe's grammar it does not parse, so it is
    # neither compared nor valid: 1 / 2 = 0.5.
    r2 = grounded("[0,0,10,10]", "[0.0,0,10,10]")
    assert box_valid_reward(r2) == 0.0
    assert box_valid_reward(r2, recipe_exact=True) == 0.5
    # boxes in the answer count in both modes: 1 valid entry -> 1.0
    assert box_valid_reward("<think>x</think><answer><box>[0,0,10,10]</box></answer>", recipe_exact=True) == 1.0


def test_recipe_exact_fixes_its_dup_scope():
    r = grounded("[0,0,10,10]")
    assert box_valid_reward(r, dup_scope="recipe", recipe_exact=True) == 1.0
    with pytest.raises(ValueError, match="recipe_exact"):
        box_valid_reward(r, dup_scope="first_half", recipe_exact=True)
    with pytest.raises(ValueError, match="recipe_exact"):
        grounded_box_rewards(r, [[0, 0, 1, 1]], dup_scope="all", recipe_exact=True)


def test_recipe_exact_many_boxes_uses_same_rule_on_numpy_path():
    boxes = _spread_boxes(40)  # [20i, 20i, 20i+10, 20i+10]: disjoint, IoU 0 with each other
    # 41 entries, the duplicate pair (39, 40) lies beyond the first 41 // 2 = 20 rows: not noticed -> 1.0.
    assert box_valid_reward(grounded(*boxes, boxes[-1]), recipe_exact=True) == 1.0
    # a duplicate of box 0 at the end: row 0 sees it -> 0.
    assert box_valid_reward(grounded(*boxes, boxes[0]), recipe_exact=True) == 0.0
    # 40 unordered boxes, then A, A: total 42, rows = the 21 first parsed entries, all unordered -> no duplicate;
    # box_valid = 2 / 42.
    unordered = [f"[{20 * i + 10},{20 * i + 10},{20 * i},{20 * i}]" for i in range(40)]
    r = grounded(*unordered, "[0,0,10,10]", "[0,0,10,10]")
    assert box_valid_reward(r, recipe_exact=True) == pytest.approx(2 / 42)
    assert box_valid_reward(r) == 0.0


def _recipe_box_valid_oracle(contents: list[str], dup_iou: float = 0.9) -> float:
    """The recipe's rule written out directly from its statement, for comparison."""
    import re

    total = len(contents)
    parsed = []
    for c in contents:
        m = re.fullmatch(r"\s*\[\s*(-?\d+)\s*,\s*(-?\d+)\s*,\s*(-?\d+)\s*,\s*(-?\d+)\s*\]\s*", c)
        if m:
            parsed.append(tuple(float(g) for g in m.groups()))
    for i in range(min(total // 2, len(parsed))):
        for j in range(len(parsed)):
            if i != j and iou(parsed[i], parsed[j]) > dup_iou:
                return 0.0
    valid = sum(1 for b in parsed if b[0] < b[2] and b[1] < b[3])
    return valid / total if total else 0.0


_SMALL_COORD = st.integers(0, 6).map(lambda v: 10 * v)
_BOX_CONTENT = st.one_of(
    st.tuples(_SMALL_COORD, _SMALL_COORD, _SMALL_COORD, _SMALL_COORD).map(lambda t: "[{},{},{},{}]".format(*t)),
    st.sampled_from(["[1,2,3]", "cat", "[0.5,0,10,10]", "[0,0,10,10]", "[10,10,0,0]"]),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_BOX_CONTENT, max_size=40))
def test_recipe_exact_matches_the_rule_as_stated(contents):
    r = grounded(*contents) if contents else "<think>no boxes</think><answer>B</answer>"
    assert box_valid_reward(r, recipe_exact=True) == pytest.approx(_recipe_box_valid_oracle(contents))


# ---------------------------------------------------------------------------------------------------------------------
# box_iou_reward
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("boxes", "targets", "expected"),
    [
        (["[0,0,10,10]"], [[0, 0, 10, 10]], 1.0),
        (["[0,0,10,10]"], [[5, 0, 15, 10]], 1 / 3),  # half-overlap: recall = precision = 50/150
        # one perfect, one spurious prediction: recall 1, precision (1 + 0)/2
        (["[0,0,10,10]", "[20,20,30,30]"], [[0, 0, 10, 10]], 0.75),
        # one of two targets found: recall (1 + 0)/2, precision 1
        (["[0,0,10,10]"], [[0, 0, 10, 10], [50, 50, 60, 60]], 0.75),
        # recall: t0 best 1/3, t1 best 0 -> 1/6; precision: p0 1/3 -> mean 1/3; -> (1/6 + 1/3)/2 = 0.25
        (["[0,0,10,10]"], [[5, 0, 15, 10], [50, 50, 60, 60]], 0.25),
        # invalid predictions are ignored (not counted in precision)
        (["[0,0,10,10]", "[30,30,20,20]", "[1,2,3]"], [[0, 0, 10, 10]], 1.0),
        (["[30,30,20,20]"], [[0, 0, 10, 10]], 0.0),  # no valid prediction
        ([], [[0, 0, 10, 10]], 0.0),
        (["[0,0,10,10]"], [], 0.0),  # no targets
        (["[0.0,0,10.0,10]"], [(0.0, 0.0, 10.0, 10.0)], 1.0),
        (["[-10,-10,0,0]"], [[-10, -10, 0, 0]], 1.0),
    ],
)
def test_box_iou_reward_hand_computed(boxes, targets, expected):
    assert box_iou_reward(grounded(*boxes), targets) == pytest.approx(expected)


def test_box_iou_reward_duplicates_are_not_removed():
    # two identical perfect predictions: precision (1 + 1)/2 -> 1 (box_valid punishes the duplicate instead)
    r = grounded("[0,0,10,10]", "[0,0,10,10]")
    assert box_iou_reward(r, [[0, 0, 10, 10]]) == 1.0
    assert grounded_box_rewards(r, [[0, 0, 10, 10]]) == (0.0, 1.0)


@pytest.mark.parametrize(
    "bad",
    [
        [10, 10, 0, 0],  # swapped
        [0, 0, 0, 10],  # zero width
        [0, 0, 10],  # 3 numbers
        [0, 0, 10, 10, 5],
        [0, 0, math.nan, 10],
        [0, 0, math.inf, 10],
        ["0", "0", "1", "1"],
        [True, 0, 1, 1],
        "0,0,1,1",
        None,
    ],
)
def test_box_iou_reward_rejects_bad_targets(bad):
    with pytest.raises(ValueError, match="target box 1"):
        box_iou_reward(grounded("[0,0,10,10]"), [[0, 0, 10, 10], bad])
    with pytest.raises(ValueError):
        validate_target_boxes([bad])
    # bad data is reported even when the response has no valid box
    with pytest.raises(ValueError):
        box_iou_reward("no boxes", [bad])


def test_box_iou_numpy_path_matches_pure_python():
    preds = [(20 * i, 0, 20 * i + 10, 10) for i in range(30)]
    targets = [(20 * i + 5, 0, 20 * i + 15, 10) for i in range(12)]  # half-overlap with preds 0..11
    r = grounded(*(f"[{a},{b},{c},{d}]" for a, b, c, d in preds))
    # recall: each target 1/3; precision: 12 preds at 1/3, 18 at 0 -> 12/90
    expected = 0.5 * (1 / 3 + 12 / 90)
    assert box_iou_reward(r, targets) == pytest.approx(expected)
    assert rules.box_iou_from_boxes(preds[:5], targets[:5]) == pytest.approx(0.5 * (1 / 3 + 1 / 3))  # pure Python path


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(valid_box(), min_size=1, max_size=12))
def test_box_iou_is_one_when_predictions_equal_targets(boxes):
    r = grounded(*(f"[{a},{b},{c},{d}]" for a, b, c, d in boxes))
    assert box_iou_reward(r, boxes) == pytest.approx(1.0)


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(valid_box(), any_box), max_size=10), st.lists(valid_box(), max_size=5))
def test_box_rewards_bounded(preds, targets):
    r = grounded(*(f"[{a},{b},{c},{d}]" for a, b, c, d in preds))
    bi = box_iou_reward(r, targets)
    bv = box_valid_reward(r)
    assert 0.0 <= bi <= 1.0
    assert 0.0 <= bv <= 1.0
    assert (bv, bi) == grounded_box_rewards(r, targets)


_BOXY = st.lists(
    st.sampled_from(
        ["<box>", "</box>", "< box >", "[", "]", ",", "1", "-", ".", "9" * 30, "9" * 400, " ", "x", "<", "/"]
    ),
    max_size=30,
).map("".join)


@given(st.one_of(st.text(), _BOXY, _TAGGY))
def test_rules_never_raise_on_arbitrary_text(text):
    assert format_reward(text) in (0.0, 1.0)
    entries = parse_boxes(text)
    for e in entries:
        ok = (
            e.coords is not None
            and all(math.isfinite(v) for v in e.coords)
            and e.coords[0] < e.coords[2]
            and e.coords[1] < e.coords[3]
        )
        assert e.valid == ok
    assert 0.0 <= box_valid_reward(text) <= 1.0
    assert 0.0 <= box_valid_reward(text, dup_scope="first_half") <= 1.0
    assert 0.0 <= box_valid_reward(text, recipe_exact=True) <= 1.0
    assert 0.0 <= box_iou_reward(text, [[0, 0, 10, 10]], recipe_exact=True) <= 1.0
    assert 0.0 <= box_iou_reward(text, [[0, 0, 10, 10], [1, 1, 2, 2]]) <= 1.0
    ans = extract_answer(text)
    assert ans is None or isinstance(ans, str)
    assert isinstance(think_text(text), str)
    choice_letter(text)
    assert exact_match(text, "cat") in (0.0, 1.0)


@pytest.mark.parametrize(
    "text",
    [
        " " * 300_000 + "x",
        "<box>" * 60_000,
        "<box>[" + "1," * 100_000,
        "<think>" + "<" * 200_000,
        "<think>" + " / " * 100_000 + "</think><answer>x</answer>",
        "<box>[" + "9" * 200_000 + ",0,1,1]</box>",
    ],
)
def test_degenerate_inputs_run_in_linear_time(text):
    t0 = time.perf_counter()
    format_reward(text)
    box_valid_reward(text)
    box_valid_reward(text, recipe_exact=True)
    box_iou_reward(text, [[0, 0, 1, 1]])
    extract_answer(text)
    think_text(text)
    assert time.perf_counter() - t0 < 2.0  # quadratic scanning would take minutes here


# ---------------------------------------------------------------------------------------------------------------------
# accuracy helpers
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pred", "gt", "expected"),
    [
        ("Paris", "paris", 1.0),
        ("Paris.", "Paris", 1.0),
        ('"Paris"', "Paris", 1.0),
        ("'Paris'!", "paris", 1.0),
        ("  New   York ", "new york", 1.0),
        ("$3$", "3", 1.0),
        ("**yes**", "Yes", 1.0),
        ("3", "3.0", 1.0),
        ("3.0", "3", 1.0),
        ("-0.50", "-.5", 1.0),
        ("1,000", "1000", 1.0),
        ("3", "3.01", 0.0),
        ("1,2", "12", 0.0),
        ("red car", "car", 0.0),
        ("", "", 0.0),
        (None, "a", 0.0),
        ("...", "...", 0.0),
        ("no", "yes", 0.0),
    ],
)
def test_exact_match(pred, gt, expected):
    assert exact_match(pred, gt) == expected


@pytest.mark.parametrize(
    ("pred", "letter"),
    [
        ("B", "B"),
        ("b", "B"),
        ("(B)", "B"),
        ("[B]", "B"),
        ("B.", "B"),
        ("B:", "B"),
        ("B) cat", "B"),
        ("(B) cat", "B"),
        ("B. a black cat", "B"),
        ("Option B", "B"),
        ("option (C)", "C"),
        ("The answer is B", "B"),
        ("the answer is (D).", "D"),
        ("Answer: **C**", "C"),
        ("I think the correct choice is A", "A"),
        ("Looking at it, (D) fits best", "D"),
        ("A cat", None),  # article, not an option
        ("cat", None),
        ("", None),
        (None, None),
        ("(A) or (B)", "A"),  # starts with an option label
        ("either (A) or (B)", None),  # two distinct letters, no keyword
    ],
)
def test_choice_letter(pred, letter):
    assert choice_letter(pred) == letter


@pytest.mark.parametrize(
    ("pred", "gt", "expected"),
    [
        ("B", "B", 1.0),
        ("(B)", "B", 1.0),
        ("B.", "(B)", 1.0),
        ("B) cat", "(B)", 1.0),
        ("Option B", "B", 1.0),
        ("the answer is B", "B", 1.0),
        ("C", "B", 0.0),
        ("the answer is C", "(B)", 0.0),
        ("cat", "B", 0.0),
        ("", "B", 0.0),
        ("B", "cat", 0.0),  # gt names no letter
    ],
)
def test_choice_match(pred, gt, expected):
    assert choice_match(pred, gt) == expected


@pytest.mark.parametrize(
    ("pred", "gt", "expected"),
    [
        ("\\frac{1}{2}", "0.5", 1.0),
        ("0.5", "\\frac{1}{2}", 1.0),
        ("1/2", "0.5", 1.0),
        ("$\\frac{1}{2}$", "0.5", 1.0),
        ("x+1", "1+x", 1.0),
        ("3.0", "3", 1.0),
        ("\\sqrt{2}", "\\sqrt{2}", 1.0),
        ("7", "0.5", 0.0),
        ("1+x", "1", 0.0),  # must not be read as the lone number 1
        ("", "1", 0.0),
        (None, "1", 0.0),
        ("1", "", 0.0),
        ("1" * (MAX_ANSWER_CHARS + 1), "1", 0.0),
        ("10^{10^{10}}", "5", 0.0),  # screened out instead of keeping SymPy busy
        ("(10^{10})!", "5", 0.0),
    ],
)
def test_math_match(pred, gt, expected):
    assert math_match(pred, gt) == expected


def test_math_match_risky_inputs_return_fast():
    t0 = time.perf_counter()
    for p in ["10^{10^{10}}", "9^9^9", "2**3**4**5", "(10^{10})!", "1234567!", "\\binom{1000000}{500000}"]:
        assert math_match(p, "5") == 0.0
        assert rules._math_risky(p)
    assert time.perf_counter() - t0 < 1.0
    for safe in ["2^{10}", "x^2+y^2", "5!", "\\frac{1}{2}"]:
        assert not rules._math_risky(safe)


def test_math_match_works_in_worker_threads():
    # math-verify's signal timeouts raise outside the main thread unless switched off; math_match must handle it
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        futs = [pool.submit(math_match, "\\frac{1}{2}", "0.5") for _ in range(4)]
        futs += [pool.submit(math_match, "3", "0.5")]
        futs += [pool.submit(rule_accuracy, "\\frac{1}{2}", "0.5", "math")]
        results = [f.result() for f in futs]
    assert results == [1.0, 1.0, 1.0, 1.0, 0.0, 1.0]


def test_question_types_mapping():
    assert QUESTION_TYPES == {
        "multiple_choice": "multiple_choice",
        "choice": "multiple_choice",
        "mc": "multiple_choice",
        "math": "math",
        "numeric": "math",
        "exact": "exact",
        "free_form": "free_form",
    }
    assert question_kind("MC ") == "multiple_choice"
    assert question_kind("counting") == "free_form"
    assert question_kind(None) == "free_form"


@pytest.mark.parametrize(
    ("pred", "gt", "qtype", "expected"),
    [
        # multiple choice: never the judge
        ("B", "B", "multiple_choice", 1.0),
        ("(B) cat", "B", "choice", 1.0),
        ("Option C", "(B)", "mc", 0.0),
        ("a cat", "B", "multiple_choice", 0.0),
        # multiple choice whose gt is not a letter -> free-form rules
        ("cat", "cat", "multiple_choice", 1.0),
        ("a dog", "cat", "multiple_choice", None),
        # exact: never the judge
        ("3.0", "3", "exact", 1.0),
        ("4", "3", "exact", 0.0),
        # math: exact, then math-verify, then judge
        ("0.5", "0.5", "math", 1.0),
        ("\\frac{1}{2}", "0.5", "math", 1.0),
        ("\\frac{1}{2}", "0.5", "numeric", 1.0),
        ("7", "0.5", "math", None),
        ("\\frac{1}{2}", "0.5", "free_form", None),  # free-form answers are not sent to math-verify
        # free form: exact, else judge
        ("Paris.", "paris", "free_form", 1.0),
        ("the capital of France", "Paris", "free_form", None),
        ("the capital of France", "Paris", "some_new_type", None),
        ("Paris", "Paris", None, 1.0),
        # empty / None / too long
        ("", "B", "multiple_choice", 0.0),
        ("   ", "Paris", "free_form", 0.0),
        (None, "0.5", "math", 0.0),
        ("a" * (MAX_ANSWER_CHARS + 1), "a" * (MAX_ANSWER_CHARS + 1), "free_form", 0.0),
        ("x" * (MAX_ANSWER_CHARS + 1), "B", "multiple_choice", 0.0),
        ("a" * MAX_ANSWER_CHARS, "a" * MAX_ANSWER_CHARS, "free_form", 1.0),  # exactly 1000 chars is allowed
        ("  " + "a" * MAX_ANSWER_CHARS + "  ", "a" * MAX_ANSWER_CHARS, "exact", 1.0),  # length after stripping
        # non-string ground truth from a data frame
        ("3", 3, "exact", 1.0),
    ],
)
def test_rule_accuracy(pred, gt, qtype, expected):
    assert rule_accuracy(pred, gt, qtype) == expected


@pytest.mark.parametrize("gt", [None, "", "   "])
def test_rule_accuracy_rejects_empty_ground_truth(gt):
    with pytest.raises(ValueError, match="ground-truth"):
        rule_accuracy("B", gt, "multiple_choice")


# ---------------------------------------------------------------------------------------------------------------------
# per-stream sums
# ---------------------------------------------------------------------------------------------------------------------


def test_overall_sums():
    assert grounded_overall(1.0, 0.5, 0.25, 1.0) == 2.75
    assert grounded_overall(format=0.0, box_valid=0.0, box_iou=0.0, accuracy=0.0) == 0.0
    assert textual_overall(1.0, 1.0, 0.7) == pytest.approx(2.7)
    assert textual_overall(format=0.0, accuracy=1.0, consistency=0.3) == pytest.approx(1.3)
    assert SINGLE_ACCURACY_WEIGHT == 1.5
    assert single_overall(1.0, 1.0) == 2.5
    assert single_overall(0.0, 1.0) == 1.5
    assert single_overall(1.0, 0.0) == 1.0
    assert single_overall(1.0, 1.0, accuracy_weight=2.0) == 3.0


def test_end_to_end_grounded_rollout():
    resp = (
        "< think >The cat is at <box>[0, 0, 10, 10]</box> and a dog at < box >[5,0,15,10]</ box >.</ think >\n"
        "< answer > (B) </ answer >"
    )
    fmt = format_reward(resp)
    bv, bi = grounded_box_rewards(resp, [[0, 0, 10, 10]])
    acc = rule_accuracy(extract_answer(resp), "B", "multiple_choice")
    assert (fmt, bv, acc) == (1.0, 1.0, 1.0)
    # recall 1; precision (1 + 1/3)/2
    assert bi == pytest.approx(0.5 * (1 + 2 / 3))
    assert grounded_overall(fmt, bv, bi, acc) == pytest.approx(3 + 0.5 * (1 + 2 / 3))
