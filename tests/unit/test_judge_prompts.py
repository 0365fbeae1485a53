"""Judge prompts and the parsers that read untrusted judge output."""

from __future__ import annotations

import pytest

from ivgr_dist.reward.judge import JudgeRequest
from ivgr_dist.reward.judge.prompts import (
    RUBRIC,
    build_messages,
    parse_consistency,
    parse_equivalence,
    parser_for,
)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("<score>0.7</score>", 0.7),
        ("<score>0.0</score>", 0.0),
        ("<score>0</score>", 0.0),
        ("<score>1</score>", 1.0),
        ("<score>1.00</score>", 1.0),
        ("<score>.3</score>", 0.3),
        ("<score>0.30</score>", 0.3),
        ("  < SCORE > 0.3 </ Score >  ", 0.3),
        ("<Score>\n1.0\n</Score>", 1.0),
        ("The reasoning adds a colour.\n<score>0.7</score>", 0.7),
        ("draft <score>0.3</score> on reflection <score>1.0</score>", 1.0),  # last tag wins
        ("<score>1.0</score> ... actually <score>0.5</score>", None),  # last tag invalid: no rescue
        ("Score: 0.7", 0.7),  # bare trailing rubric number without any tag
        ("so the grade is 0.3.", 0.3),
        ("1", 1.0),
        ("grade 1.", 1.0),
        ("0.7\n\n", 0.7),
        ("<score>0.7</score> but then <score>", 0.7),  # the last COMPLETE tag pair decides
    ],
)
def test_parse_consistency_accepts(text, expected):
    assert parse_consistency(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        None,
        "",
        "   ",
        "<score>0.5</score>",
        "<score>-0.3</score>",
        "<score>10</score>",
        "<score>0.7.1</score>",
        "<score>seven tenths</score>",
        "<score></score>",
        "<score>0.7",  # unclosed
        "<score>0.7</scor>",
        "score 0.7 is fine, I think",  # number not at the end
        "-0.3",
        "v10.7",
        "0.5",
        "2",
        "0.7 0.3 0.9",
        "inf",
        "nan",
        "1e0",
        "the image shows a red circle <|im_end|> <box>[1,2,3,4]</box>",
        "\x00\xff garbage \ufffd",
        "score>0.7</score",
        12,  # not even text
    ],
)
def test_parse_consistency_rejects(text):
    assert parse_consistency(text) is None


@pytest.mark.parametrize(
    "text, expected",
    [
        ("<verdict>yes</verdict>", 1.0),
        ("<verdict>no</verdict>", 0.0),
        ("< VERDICT > Yes. </verdict>", 1.0),
        ("They differ.\n<verdict>NO</verdict>", 0.0),
        ("<verdict>no</verdict> wait <verdict>yes</verdict>", 1.0),
        ("yes", 1.0),
        (" No! ", 0.0),
    ],
)
def test_parse_equivalence_accepts(text, expected):
    assert parse_equivalence(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        None,
        "",
        "<verdict>maybe</verdict>",
        "<verdict>yes</verdict> <verdict>probably</verdict>",
        "<verdict>yes",
        "yes, they are the same",  # only an exact bare yes/no is accepted
        "The answer is no",
        "<score>1.0</score>",
        "1",
        "true",
    ],
)
def test_parse_equivalence_rejects(text):
    assert parse_equivalence(text) is None


def test_every_rubric_value_round_trips():
    for v in RUBRIC:
        assert parse_consistency(f"<score>{v}</score>") == v
        assert parse_consistency(f"<score>{v:.2f}</score>") == v


def test_messages_carry_the_inputs_and_ask_for_the_tag():
    req = JudgeRequest("consistency", "What colour is the circle?", "It is red.", "The circle <box> is red.")
    msgs = build_messages(req)
    assert [m["role"] for m in msgs] == ["system", "user"]
    user = msgs[1]["content"]
    for part in ("What colour is the circle?", "It is red.", "The circle <box> is red.", "<score>", "0.3", "0.7"):
        assert part in user
    eq = build_messages(JudgeRequest("equivalence", "How many?", "three", "3"))[1]["content"]
    assert "three" in eq and "How many?" in eq and "<verdict>yes</verdict>" in eq
    with pytest.raises(ValueError, match="kind"):
        build_messages(JudgeRequest("bogus", "q", "c", "r"))
    with pytest.raises(ValueError, match="kind"):
        parser_for("bogus")
