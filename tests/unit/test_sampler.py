"""Tests of the pair-keeping batch sampler (ivgr_dist.data.sampler)."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ivgr_dist.data.sampler import PairSampler

PAIRED = list(range(0, 100, 2))  # 50 records
SINGLE = list(range(1, 40, 2))  # 20 records


def _check_batch(batch, batch_size, n_pairs):
    assert len(batch) == batch_size
    for k in range(n_pairs):
        (i, a), (j, b) = batch[2 * k], batch[2 * k + 1]
        assert (a, b) == ("grounded", "textual") and i == j
    assert all(s == "single" for _, s in batch[2 * n_pairs :])
    assert len({f"{i}:{s}" for i, s in batch}) == batch_size  # uids unique within a batch


@pytest.mark.parametrize(
    ("batch_size", "ratio", "n_pairs"),
    [(16, 0.9, 7), (16, 1.0, 8), (16, 0.0, 0), (10, 0.5, 3), (1, 0.9, 0), (3, 1.0, 1), (512, 0.9, 230)],
)
def test_batch_composition(batch_size, ratio, n_pairs):
    paired, single = list(range(1000)), list(range(1000, 1600))
    s = PairSampler(paired, single, batch_size, ratio, seed=0)
    assert (s.n_pairs, s.n_singles) == (n_pairs, batch_size - 2 * n_pairs)
    for _ in range(5):
        batch = s.next_batch()
        _check_batch(batch, batch_size, n_pairs)
        assert {i for i, st_ in batch if st_ != "single"} <= set(paired)
        assert {i for i, st_ in batch if st_ == "single"} <= set(single)


def test_empty_pool_is_filled_from_the_other():
    s = PairSampler(PAIRED, [], 16, 0.5, seed=0)
    assert (s.n_pairs, s.n_singles) == (8, 0)
    _check_batch(s.next_batch(), 16, 8)
    s = PairSampler([], SINGLE, 16, 0.9, seed=0)
    assert (s.n_pairs, s.n_singles) == (0, 16)
    _check_batch(s.next_batch(), 16, 0)
    with pytest.raises(ValueError, match=r"batch_size=15: must be even when there are no single records"):
        PairSampler(PAIRED, [], 15, 0.9, seed=0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"batch_size": 0}, "batch_size=0: must be an integer >= 1"),
        ({"paired_ratio": 1.5}, r"paired_ratio=1.5: must be in \[0, 1\]"),
        ({"seed": -1}, "seed=-1: must be an integer >= 0"),
        ({"paired_ids": [1, 1, 2]}, "paired_ids: has repeated records"),
        ({"paired_ids": [], "single_ids": []}, "both empty"),
        ({"paired_ids": [0, 2, 4]}, r"paired pool has 3 record\(s\) but each batch draws 7"),
    ],
)
def test_validation_quotes_value_and_rule(kwargs, match):
    args = {"paired_ids": PAIRED, "single_ids": SINGLE, "batch_size": 16, "paired_ratio": 0.9, "seed": 0}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        PairSampler(**args)


def test_each_epoch_visits_every_record_once_in_a_new_order():
    paired = list(range(35))  # 7 pairs per batch -> an epoch is exactly 5 batches
    s = PairSampler(paired, list(range(100, 110)), 16, 0.9, seed=3)
    epochs = []
    for _ in range(3):
        seen = [i for _ in range(5) for i, st_ in s.next_batch() if st_ == "grounded"]
        assert sorted(seen) == paired
        epochs.append(seen)
        assert s.metrics()["data/epoch/paired"] == len(epochs)
        assert s.metrics()["data/epoch_progress/paired"] == pytest.approx(len(epochs))
    assert epochs[0] != epochs[1] != epochs[2]
    assert s.metrics()["data/epoch_progress/paired"] == pytest.approx(3.0)
    s.next_batch()
    assert s.metrics()["data/epoch/paired"] == 3 and s.metrics()["data/batches"] == 16


def test_unshuffled_order_and_epoch_boundary_without_repeats():
    s = PairSampler(list(range(10)), list(range(10, 13)), 8, 1.0, seed=0, shuffle=False)
    assert [i for i, st_ in s.next_batch() if st_ == "grounded"] == [0, 1, 2, 3]
    assert [i for i, st_ in s.next_batch() if st_ == "grounded"] == [4, 5, 6, 7]
    # crosses into epoch 1: 8, 9 from epoch 0, then 0, 1 from epoch 1
    assert [i for i, st_ in s.next_batch() if st_ == "grounded"] == [8, 9, 0, 1]
    assert s.metrics()["data/epoch/paired"] == 1

    # shuffled: a batch crossing the boundary never repeats a record
    s = PairSampler(list(range(9)), [], 16, 1.0, seed=1)  # 8 pairs per batch from 9 records
    counts = Counter()
    for _ in range(40):
        batch = s.next_batch()
        _check_batch(batch, 16, 8)
        counts.update(i for i, st_ in batch if st_ == "grounded")
    assert set(counts) == set(range(9))
    assert s.metrics()["data/epoch/paired"] >= 30


def _run(s, n):
    return [s.next_batch() for _ in range(n)]


@pytest.mark.parametrize("k", [0, 1, 3, 4, 5, 7])  # 35 paired records, 7 per batch: k=5 sits on the boundary
def test_exact_resume(k):
    paired, single = list(range(35)), list(range(100, 103))

    def make():
        return PairSampler(paired, single, 16, 0.9, seed=11)

    a = make()
    _run(a, k)
    state = json.loads(json.dumps(a.state_dict()))
    expected = _run(a, 9)
    b = make()
    b.load_state_dict(state)
    assert _run(b, 9) == expected
    assert b.state_dict() == a.state_dict()


@settings(max_examples=40, deadline=None)
@given(
    n_paired=st.integers(0, 30),
    n_single=st.integers(0, 30),
    batch_size=st.integers(1, 12),
    ratio=st.floats(0, 1),
    k=st.integers(0, 12),
    m=st.integers(1, 8),
    shuffle=st.booleans(),
)
def test_exact_resume_property(n_paired, n_single, batch_size, ratio, k, m, shuffle):
    def make():
        return PairSampler(list(range(n_paired)), list(range(50, 50 + n_single)), batch_size, ratio, 5, shuffle)

    try:
        a = make()
    except ValueError:
        return
    _run(a, k)
    state = json.loads(json.dumps(a.state_dict()))
    expected = _run(a, m)
    b = make()
    b.load_state_dict(state)
    got = _run(b, m)
    assert got == expected
    for batch in got:
        _check_batch(batch, batch_size, b.n_pairs)


def test_state_from_another_sampler_is_rejected():
    a = PairSampler(PAIRED, SINGLE, 16, 0.9, seed=0)
    a.next_batch()
    state = a.state_dict()
    with pytest.raises(ValueError, match="seed=0: must equal this sampler's seed=1"):
        PairSampler(PAIRED, SINGLE, 16, 0.9, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="pool 'paired'"):
        PairSampler(PAIRED[:-1], SINGLE, 16, 0.9, seed=0).load_state_dict(state)
    with pytest.raises(ValueError, match="batch_size=16: must equal this sampler's batch_size=8"):
        PairSampler(PAIRED, SINGLE, 8, 0.9, seed=0).load_state_dict(state)


@pytest.mark.parametrize("streams", [["textual"], ["grounded"]])
def test_single_pair_stream_fills_the_batch_with_that_stream(streams):
    """Ablations: one stream per paired record, so a batch of 16 at ratio 0.9 draws 14 paired records."""
    s = PairSampler(list(range(40)), list(range(100, 110)), 16, 0.9, seed=0, pair_streams=streams)
    batch = s.next_batch()
    assert len(batch) == 16 and s.n_pairs == 14 and s.n_singles == 2
    assert [st for _, st in batch[:14]] == streams * 14 and len({i for i, _ in batch[:14]}) == 14
    state = s.state_dict()
    other = PairSampler(list(range(40)), list(range(100, 110)), 16, 0.9, seed=0)
    with pytest.raises(ValueError, match="pair_streams"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match="pair_streams"):
        PairSampler(list(range(40)), [], 16, 0.9, seed=0, pair_streams=["single"])


def test_excluded_records_are_never_drawn_again_and_the_exclusion_is_part_of_the_state():
    """A record found unusable after load (an image that fails to decode) is skipped by later draws; the pools'
    permutations and fingerprint stay the same, so a state from before the exclusion replays the same draws and
    one from after keeps the record out."""
    s = PairSampler(PAIRED, SINGLE, batch_size=8, paired_ratio=0.5, seed=7)
    before = json.loads(json.dumps(s.state_dict()))
    first = s.next_batch()
    victim = first[0][0]
    s.exclude(victim, "unreadable_image")
    after = json.loads(json.dumps(s.state_dict()))
    assert after["excluded"] == [[victim, "unreadable_image"]] and s.metrics()["data/excluded_records"] == 1
    later = [s.next_batch() for _ in range(40)]  # 80 paired draws: past an epoch of 50
    assert all(victim not in {i for i, _ in b} for b in later) and all(len(b) == 8 for b in later)
    assert s.metrics()["data/epoch/paired"] >= 1
    replay = PairSampler(PAIRED, SINGLE, batch_size=8, paired_ratio=0.5, seed=7)
    replay.load_state_dict(before)
    assert replay.next_batch() == first and replay.excluded == {}
    resumed = PairSampler(PAIRED, SINGLE, batch_size=8, paired_ratio=0.5, seed=7)
    resumed.load_state_dict(after)
    assert [resumed.next_batch() for _ in range(40)] == later
    with pytest.raises(ValueError, match="original_idx=999: not a record of this sampler"):
        s.exclude(999, "unreadable_image")
    small = PairSampler([0, 2, 4], [], batch_size=4, paired_ratio=1.0, seed=0)
    small.exclude(0, "unreadable_image")
    with pytest.raises(ValueError, match=r"paired pool: 2 of 3 records excluded .* 1 left, but each batch draws 2"):
        small.exclude(2, "unreadable_image")
