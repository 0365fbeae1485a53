"""RuleJudge: fact extraction, the consistency rubric, equivalence, and the async Judge contract."""

from __future__ import annotations

import asyncio
import json

import pytest

from ivgr_dist.config import JudgeConfig
from ivgr_dist.reward.judge import JudgeRequest, make_judge
from ivgr_dist.reward.judge.rule import RuleJudge, consistency_score, equivalence_score, extract_facts

COLOURS, SHAPES = {"red", "green", "blue", "yellow"}, {"circle", "square", "triangle"}


def test_extract_facts_pairs_copula_and_counts():
    assert extract_facts("the red circle <box>[1,2,3,4]</box> is red", COLOURS, SHAPES) == {("pair", "circle", "red")}
    assert extract_facts("The circle is a blue one.", COLOURS, SHAPES) == {("pair", "circle", "blue")}
    facts = extract_facts("There are 3 blue objects and two red squares", COLOURS, SHAPES)
    assert facts == {("count", "blue", "object", 3), ("count", "red", "square", 2), ("pair", "square", "red")}
    assert extract_facts("a red circle", COLOURS, SHAPES) == {("pair", "circle", "red")}  # "a" is no count
    assert extract_facts("nothing to see", COLOURS, SHAPES) == set()


@pytest.mark.parametrize(
    ("candidate", "reference", "expected"),
    [
        ("I see a red circle.", "The red circle <box>[1,1,9,9]</box> is red.", 1.0),  # identical facts
        ("The circle is blue.", "The red circle <box>[1,1,9,9]</box>.", 0.0),  # same shape, other colour
        ("There are 2 red objects.", "There are 3 red objects.", 0.0),  # different counts
        ("A red circle and a green square.", "A red circle.", 0.7),  # extra only
        ("A red circle.", "A red circle and a green square.", 0.7),  # missing only
        ("A red circle and a blue triangle.", "A red circle and a green square.", 0.3),  # extra and missing
        ("It is red.", "The red circle <box>[1,1,9,9]</box>.", 0.7),  # no candidate facts = missing only
        ("Hmm.", "Let me look.", 1.0),  # neither has facts
    ],
)
def test_consistency_rubric(candidate, reference, expected):
    assert consistency_score(candidate, reference) == expected


def test_scene_objects_turn_a_colour_clash_into_extra_and_extend_the_vocabulary():
    objects = [{"color": "red", "shape": "circle", "bbox": [0, 0, 5, 5]}, {"color": "blue", "shape": "circle"}]
    # Two circles in the scene: naming the other one is not a contradiction, just a different fact.
    assert consistency_score("the blue circle", "the red circle", {"objects": objects}) == 0.3
    assert consistency_score("the blue circle", "the red circle") == 0.0
    # Unknown words become vocabulary when the scene has them (JSON text, as in the parquet column).
    scene = json.dumps([{"color": "magenta", "shape": "hexagon", "bbox": [0, 0, 1, 1]}])
    assert consistency_score("a teal hexagon", "a magenta hexagon", {"objects": scene}) == 0.7
    assert consistency_score("the hexagon is magenta", "a magenta hexagon", {"objects": scene}) == 1.0


def test_equivalence_exact_and_numeric():
    assert equivalence_score("Red.", "red") == 1.0
    assert equivalence_score("The answer is 17.", "17") == 1.0
    assert equivalence_score("3.0", "3") == 1.0
    assert equivalence_score("between 3 and 17", "17") == 0.0
    assert equivalence_score("a red thing", "red") == 0.0


def test_async_protocol_counters_and_unknown_kind():
    judge = make_judge(JudgeConfig(backend="rule"))
    assert isinstance(judge, RuleJudge)
    reqs = [
        JudgeRequest("consistency", "q", "the red circle", "the blue circle", fallback=0.3),
        JudgeRequest("equivalence", "q", "17", "17"),
        JudgeRequest("nonsense", "q", "a", "b", fallback=0.7),
    ]
    results = asyncio.run(judge.score(reqs))
    assert [r.score for r in results] == [0.0, 1.0, 0.7]
    assert [r.calls for r in results] == [1, 1, 1]
    assert [r.failed for r in results] == [False, False, True]
    assert all(r.retries == 0 and r.timeouts == 0 for r in results)
    asyncio.run(judge.close())
