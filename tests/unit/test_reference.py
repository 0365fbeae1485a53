"""Tests of reference selection and the reference cache (ivgr_dist.reward.reference)."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ivgr_dist.reward.reference import (
    MIN_REFERENCE_IOU,
    Reference,
    ReferenceTable,
    select_candidate,
    should_replace,
)


@dataclass
class Rollout:
    think_text: str
    accuracy: float
    box_iou: float
    rollout_id: str | None = None


def ref(acc: float = 1.0, box_iou: float = 0.5, step: int = 0, think: str = "t", rid: str | None = None) -> Reference:
    return Reference(think=think, accuracy=acc, box_iou=box_iou, step=step, rollout_id=rid)


# ---------------------------------------------------------------------------------------------------------------------
# select_candidate
# ---------------------------------------------------------------------------------------------------------------------


def test_select_candidate_picks_highest_qualifying_iou():
    rollouts = [
        ("wrong answer, great boxes", 0.0, 0.95, "r0"),
        ("right, weak boxes", 1.0, 0.29, "r1"),
        ("right, good boxes", 1.0, 0.6, "r2"),
        ("right, best boxes", 1.0, 0.8, "r3"),
        ("right, ok boxes", 1.0, 0.3, "r4"),
    ]
    c = select_candidate(rollouts, step=7)
    assert c == Reference(think="right, best boxes", accuracy=1.0, box_iou=0.8, step=7, rollout_id="r3")


def test_select_candidate_threshold_is_inclusive():
    assert MIN_REFERENCE_IOU == 0.3
    c = select_candidate([("a", 1.0, 0.3, "x")])
    assert c is not None and c.box_iou == 0.3
    assert select_candidate([("a", 1.0, 0.2999, "x")]) is None
    assert select_candidate([("a", 1.0, 0.5, "x")], min_iou=0.6) is None


def test_select_candidate_tie_goes_to_earliest():
    rollouts = [("first", 1.0, 0.7, "a"), ("second", 1.0, 0.7, "b"), ("low", 1.0, 0.4, "c")]
    c = select_candidate(rollouts)
    assert c is not None and (c.think, c.rollout_id) == ("first", "a")


def test_select_candidate_none_when_nothing_qualifies():
    assert select_candidate([]) is None
    assert select_candidate([("a", 0.0, 0.9, "x"), ("b", 0.5, 0.9, "y"), ("c", 1.0, 0.1, "z")]) is None
    assert select_candidate([("a", 1.0, float("nan"), "x")]) is None


def test_select_candidate_skips_blank_think_by_default():
    rollouts = [("   ", 1.0, 0.9, "blank"), ("real", 1.0, 0.5, "real")]
    c = select_candidate(rollouts)
    assert c is not None and c.rollout_id == "real"
    c2 = select_candidate(rollouts, require_think=False)
    assert c2 is not None and c2.rollout_id == "blank"


def test_select_candidate_accepts_tuples_mappings_and_objects():
    three = select_candidate([("t", 1, 0.5)])
    assert three == Reference("t", 1.0, 0.5, 0, None)
    mapping = select_candidate([{"think": "m", "accuracy": 1.0, "box_iou": 0.4, "rollout_id": 3}])
    assert mapping == Reference("m", 1.0, 0.4, 0, "3")
    obj = select_candidate([Rollout("o", 1.0, 0.45, "id")], step=2)
    assert obj == Reference("o", 1.0, 0.45, 2, "id")
    with pytest.raises(ValueError, match="rollout tuple"):
        select_candidate([("t", 1.0)])


# ---------------------------------------------------------------------------------------------------------------------
# should_replace
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cached", "candidate", "expected"),
    [
        (None, ref(), True),
        (None, None, False),
        (ref(), None, False),
        (ref(acc=0.5, box_iou=0.9), ref(acc=1.0, box_iou=0.3), True),  # higher accuracy wins despite lower iou
        (ref(acc=1.0, box_iou=0.3), ref(acc=0.5, box_iou=0.9), False),  # lower accuracy never replaces
        (ref(acc=1.0, box_iou=0.5), ref(acc=1.0, box_iou=0.6), True),  # equal accuracy, higher iou
        (ref(acc=1.0, box_iou=0.5), ref(acc=1.0, box_iou=0.5), False),  # equal: keep the cached (older) one
        (ref(acc=1.0, box_iou=0.6), ref(acc=1.0, box_iou=0.5), False),
    ],
)
def test_should_replace(cached, candidate, expected):
    assert should_replace(cached, candidate) is expected


# ---------------------------------------------------------------------------------------------------------------------
# ReferenceTable
# ---------------------------------------------------------------------------------------------------------------------


def test_table_update_get_len_and_stats():
    t = ReferenceTable()
    assert len(t) == 0 and t.get("a") is None
    assert t.stats() == {"size": 0, "mean_box_iou": 0.0, "mean_accuracy": 0.0}
    assert t.update("a", ref(box_iou=0.4, step=1)) is True
    assert t.update("a", ref(box_iou=0.3, step=2)) is False  # worse: kept step 1
    assert t.get("a").step == 1
    assert t.update("a", ref(box_iou=0.8, step=3)) is True
    assert t.get("a").step == 3
    assert t.update(5, ref(box_iou=0.4)) is True
    assert t.update(5, None) is False
    assert len(t) == 2 and "a" in t and 5 in t and "5" not in t
    stats = t.stats()
    assert stats["size"] == 2
    assert stats["mean_box_iou"] == pytest.approx(0.6)
    assert stats["mean_accuracy"] == 1.0


def test_table_rejects_bad_keys_and_references():
    t = ReferenceTable()
    with pytest.raises(ValueError, match="record key"):
        t.update(1.5, ref())
    with pytest.raises(ValueError, match="record key"):
        t.update(True, ref())
    with pytest.raises(ValueError, match="box_iou"):
        t.update("a", ref(box_iou=float("nan")))
    with pytest.raises(ValueError, match="think"):
        t.update("a", Reference(think=None, accuracy=1.0, box_iou=0.5, step=0, rollout_id=None))
    assert len(t) == 0


def _filled_table() -> ReferenceTable:
    t = ReferenceTable()
    t.update("rec-1", ref(think="the cat <box>[1,2,3,4]</box> sits", box_iou=0.123456789012345, step=3, rid="u1"))
    t.update(42, ref(acc=1, box_iou=0.75, step=10, rid=None))
    t.update("42", ref(think="unicode: 猫 ✓", box_iou=1 / 3, step=0, rid="u3"))
    return t


def test_state_round_trip_through_json():
    t = _filled_table()
    state = t.state_dict()
    restored = ReferenceTable()
    restored.load_state_dict(json.loads(json.dumps(state)))
    assert len(restored) == 3
    assert list(restored.items()) == list(t.items())
    assert restored.get(42) == t.get(42) and restored.get("42") == t.get("42")  # int and str keys stay distinct
    assert restored.get("rec-1").box_iou == 0.123456789012345
    assert restored.state_dict() == state
    assert json.dumps(restored.state_dict(), sort_keys=True) == json.dumps(state, sort_keys=True)


def test_state_dict_is_plain_json_data():
    def check(x):
        if isinstance(x, dict):
            assert all(isinstance(k, str) for k in x)
            for v in x.values():
                check(v)
        elif isinstance(x, list):
            for v in x:
                check(v)
        else:
            assert x is None or type(x) in (str, int, float)

    check(_filled_table().state_dict())


def test_load_replaces_contents():
    t = _filled_table()
    t.load_state_dict(ReferenceTable().state_dict())
    assert len(t) == 0


def _state_with(entry) -> dict:
    return {"version": 1, "entries": [entry]}


GOOD = {"think": "t", "accuracy": 1.0, "box_iou": 0.5, "step": 1, "rollout_id": "r"}


@pytest.mark.parametrize(
    ("state", "match"),
    [
        (None, "must be a dict"),
        ([], "must be a dict"),
        ({"entries": []}, "version"),
        ({"version": 2, "entries": []}, "version"),
        ({"version": 1}, "'entries' must be a list"),
        ({"version": 1, "entries": {"a": GOOD}}, "'entries' must be a list"),
        (_state_with(["a"]), "pair"),
        (_state_with(["a", GOOD, 1]), "pair"),
        (_state_with([1.5, GOOD]), "key of entry 0"),
        (_state_with([None, GOOD]), "key of entry 0"),
        (_state_with(["a", "not a dict"]), "expected a dict"),
        (_state_with(["a", {k: v for k, v in GOOD.items() if k != "step"}]), "missing keys \\['step'\\]"),
        (_state_with(["a", {**GOOD, "extra": 1}]), "unexpected keys \\['extra'\\]"),
        (_state_with(["a", {**GOOD, "think": 3}]), "think must be a str"),
        (_state_with(["a", {**GOOD, "accuracy": "1"}]), "accuracy"),
        (_state_with(["a", {**GOOD, "box_iou": None}]), "box_iou"),
        (_state_with(["a", {**GOOD, "step": 1.0}]), "step must be an int"),
        (_state_with(["a", {**GOOD, "step": True}]), "step must be an int"),
        (_state_with(["a", {**GOOD, "rollout_id": 7}]), "rollout_id"),
        ({"version": 1, "entries": [["a", GOOD], ["a", GOOD]]}, "duplicate key 'a'"),
    ],
)
def test_load_state_dict_rejects_malformed_state(state, match):
    t = _filled_table()
    before = t.state_dict()
    with pytest.raises(ValueError, match=match):
        t.load_state_dict(state)
    assert t.state_dict() == before  # a failed load leaves the table unchanged


@given(
    st.dictionaries(
        st.one_of(st.text(max_size=8), st.integers(min_value=-(2**40), max_value=2**40)),
        st.builds(
            Reference,
            think=st.text(max_size=40),
            accuracy=st.sampled_from([0.0, 0.5, 1.0, 1]),
            box_iou=st.floats(min_value=0.0, max_value=1.0),
            step=st.integers(min_value=0, max_value=10**6),
            rollout_id=st.one_of(st.none(), st.text(max_size=8)),
        ),
        max_size=8,
    )
)
def test_state_round_trip_property(refs):
    t = ReferenceTable()
    for k, r in refs.items():
        assert t.update(k, r)
    restored = ReferenceTable()
    restored.load_state_dict(json.loads(json.dumps(t.state_dict())))
    assert dict(restored.items()) == refs
    for k, r in refs.items():
        assert type(restored.get(k).accuracy) is type(r.accuracy)


def test_reference_flow_across_steps():
    """Selection per step feeds the cache; a worse later candidate does not replace an earlier reference."""
    table = ReferenceTable()
    step1 = [("s1 weak", 1.0, 0.35, "a"), ("s1 wrong", 0.0, 0.9, "b")]
    assert table.update("rec", select_candidate(step1, step=1))
    step2 = [("s2 none", 0.0, 0.9, "c")]
    assert not table.update("rec", select_candidate(step2, step=2))  # no candidate: cache keeps step 1
    step3 = [("s3 better", 1.0, 0.7, "d"), ("s3 ok", 1.0, 0.5, "e")]
    assert table.update("rec", select_candidate(step3, step=3))
    step4 = [("s4 lower", 1.0, 0.6, "f")]
    assert not table.update("rec", select_candidate(step4, step=4))
    cached = table.get("rec")
    assert (cached.think, cached.step, cached.rollout_id) == ("s3 better", 3, "d")
