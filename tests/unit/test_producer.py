"""The batch producer without Ray or engines: inline (max_staleness 0) and ahead in a thread (k >= 1),
admission, the staleness re-check that drops whole records, the resume state that loses nothing, the next
batch's prompts prepared while a step trains, and records whose image fails to decode at prompt time."""

from __future__ import annotations

import logging
import shutil
import threading
import time
from types import SimpleNamespace

import pytest

from ivgr_dist.config import DataConfig, SyntheticConfig
from ivgr_dist.data.dataset import RecordTable
from ivgr_dist.data.prompts import PromptBuilder
from ivgr_dist.data.sampler import PairSampler
from ivgr_dist.data.synthetic import make_synthetic
from ivgr_dist.driver.producer import BatchProducer, ProducerError, stale_records
from ivgr_dist.types import Prompt, Rollout
from support.images import cut_jpeg


class Records:
    dropped: dict[int, str] = {}

    def prompts(self, items):
        return [Prompt(i, s, "", [1], 1, "a", "exact", "t") for i, s in items]

    def metrics(self):
        return {}


class Data:
    def __init__(self, batch_size=4):
        self.records = Records()
        self.sampler = PairSampler(list(range(40)), [], batch_size=batch_size, paired_ratio=1.0, seed=3)


class Pool:
    """Generates each group at the current engine version; ``lag`` makes groups look older."""

    class cfg:
        group_timeout_s = 5.0

    def __init__(self):
        self.version = 0
        self.lag: dict[int, int] = {}  # original_idx -> versions older than the engine
        self.calls: list[int] = []  # batch sizes asked for
        self.gate = threading.Event()
        self.gate.set()
        self.fail = False

    def sampling_seed(self, step):
        return None

    def generate(self, prompts, stats=None, seed=None, trace=None, on_idle=None):
        self.gate.wait(5)
        if self.fail:
            raise RuntimeError("engine exploded")
        self.calls.append(len(prompts))
        for p in prompts:
            v = self.version - self.lag.get(p.original_idx, 0)
            yield [Rollout(p, k, [1, 2], "", [-0.1, -0.1], v, weight_version_last=self.version) for k in range(2)]


class Scorer:
    def score_stream(self, groups, prompts, step, trace=None):
        yield from groups

    def metrics(self):
        return {}


def _reference_states(batch_size: int, steps: int) -> list[dict]:
    """The sampler state after each number of draws, from a sampler nobody else touches."""
    s = Data(batch_size).sampler
    states = [s.state_dict()]
    for _ in range(steps):
        s.next_batch()
        states.append(s.state_dict())
    return states


def _wait_for(cond, timeout=5.0):
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.01)


def test_synchronous_batches_are_produced_when_asked_and_keep_pairs_in_order():
    data, pool = Data(), Pool()
    prod = BatchProducer(data, pool, Scorer(), max_staleness=0)
    prod.start(1, 3, version=0)
    assert pool.calls == []  # nothing ahead
    batch = prod.get(1)
    assert pool.calls == [4] and [p.uid for p in batch.prompts] == [g[0].prompt.uid for g in batch.groups]
    assert [p.stream for p in batch.prompts] == ["grounded", "textual"] * 2  # A/B adjacent, same batch
    assert batch.metrics["rollout/dropped_stale"] == 0.0 and "time/generate_s" in batch.metrics
    assert prod.resume_state(1)["sampler"] == _reference_states(4, 1)[1]
    prod.close()


def test_ahead_of_the_learner_by_at_most_k_plus_one_batches_and_resume_loses_nothing():
    data, pool = Data(), Pool()
    ref = _reference_states(4, 6)
    prod = BatchProducer(data, pool, Scorer(), max_staleness=1)
    prod.start(1, 6, version=0)
    _wait_for(lambda: len(pool.calls) == 2)  # batches 1 and 2 (k + 1 = 2 ahead of version 0)
    time.sleep(0.2)
    assert len(pool.calls) == 2  # admission holds batch 3 until version 1
    b1 = prod.get(1)
    # trained nothing yet: a checkpoint now must resume at batch 2, although batch 2 is already drawn
    assert prod.resume_state(0)["sampler"] == ref[0] and prod.resume_state(1)["sampler"] == ref[1]
    pool.version = 1
    prod.trained(1, 1, b1)
    _wait_for(lambda: len(pool.calls) == 3)
    b2 = prod.get(2)
    assert {g[0].weight_version for g in b2.groups} == {0}  # generated before the push: staleness 1 at step 2
    pool.version = 2
    prod.trained(2, 2, b2)
    _wait_for(lambda: len(pool.calls) == 4)
    assert prod.resume_state(2)["sampler"] == ref[2]  # batches 3 and 4 drawn, not trained: produced again
    prod.close()


def test_stale_records_count_from_the_oldest_version_of_a_group():
    p = Prompt(3, "grounded", "", [1], 1, "a", "exact", "t")
    group = [Rollout(p, 0, [1], "", [0.0], 4, weight_version_last=6), Rollout(p, 1, [1], "", [0.0], 5)]
    assert stale_records([group], version=5, max_staleness=1) == set()
    assert stale_records([group], version=6, max_staleness=1) == {3}  # oldest token 2 versions behind
    assert stale_records([group], version=6, max_staleness=2) == set()


def test_a_record_with_a_stale_group_is_dropped_whole_and_requeued_into_the_next_batch():
    data, pool = Data(), Pool()
    pool.version = 4
    victim = Data().sampler.next_batch()[0][0]  # the first record the producer will draw
    pool.lag = {victim: 3}  # its groups come back 3 versions old (an engine that missed pushes)
    prod = BatchProducer(data, pool, Scorer(), max_staleness=1)
    prod.start(1, 3, version=4)
    b1 = prod.get(1)
    assert b1.metrics["rollout/dropped_stale"] == 1.0
    assert victim not in {g[0].prompt.original_idx for g in b1.groups}  # both of its streams went
    assert len(b1.groups) == 2  # a batch is 4 prompts: 2 records x 2 streams
    state = prod.resume_state(1)
    assert [victim, "grounded"] in state["requeue"] and [victim, "textual"] in state["requeue"]
    pool.lag = {}
    pool.version = 5  # the engines took the push
    prod.trained(1, 5, b1)
    b2 = prod.get(2)  # drawn before the drop was found (k + 1 = 2 batches ahead): the next one takes it
    assert b2.requeued == [] and len(b2.prompts) == 4
    pool.version = 6
    prod.trained(2, 6, b2)
    assert [victim, "grounded"] in prod.resume_state(2)["requeue"]  # not trained on yet
    b3 = prod.get(3)
    assert b3.requeued == [(victim, "grounded"), (victim, "textual")]
    assert [p.original_idx for p in b3.prompts[:2]] == [victim, victim] and len(b3.prompts) == 6
    prod.trained(3, 7, b3)
    assert prod.resume_state(3)["requeue"] == []
    prod.close()


def test_a_failing_producer_thread_raises_in_the_trainer_with_the_cause():
    data, pool = Data(), Pool()
    pool.fail = True
    prod = BatchProducer(data, pool, Scorer(), max_staleness=1)
    prod.start(1, 2, version=0)
    with pytest.raises(ProducerError, match="engine exploded"):
        prod.get(1)
    prod.close()


def test_resume_state_round_trips_through_load_state():
    data, pool = Data(), Pool()
    prod = BatchProducer(data, pool, Scorer(), max_staleness=0)
    prod.start(1, 5, version=0)
    prod.trained(1, 1, prod.get(1))
    state = prod.resume_state(1)
    again = BatchProducer(Data(), Pool(), Scorer(), max_staleness=2)
    again.load_state({**state, "requeue": [[7, "grounded"], [7, "textual"]]})
    again.start(2, 5, version=1)
    b2 = again.get(2)
    assert [(p.original_idx, p.stream) for p in b2.prompts[:2]] == [(7, "grounded"), (7, "textual")]
    assert [p.original_idx for p in b2.prompts[2:]] == [p.original_idx for p in prod.get(2).prompts]
    again.close()
    prod.close()


def test_a_requeued_record_the_sampler_draws_again_is_generated_once():
    """After a resume (or an epoch boundary) the sampler can draw a record that is also waiting in the requeue:
    one copy is generated (two would share a uid and group seed and train the same rollouts twice), and
    training that batch clears it from the resume state. A record requeued twice is generated once too."""
    data, pool = Data(), Pool()
    first = Data().sampler.next_batch()  # what the producer's sampler draws first
    again = first[0]
    other = (39, "grounded") if first[0][0] != 39 else (38, "grounded")
    prod = BatchProducer(data, pool, Scorer(), max_staleness=0)
    prod.load_state({"sampler": data.sampler.state_dict(), "requeue": [list(again), list(other), list(other)]})
    prod.start(1, 2, version=0)
    b1 = prod.get(1)
    uids = [p.uid for p in b1.prompts]
    assert len(uids) == len(set(uids)) == len(first) + 1, uids
    assert uids.count(f"{again[0]}:{again[1]}") == 1 and uids[0] == f"{other[0]}:{other[1]}"
    assert b1.metrics["rollout/requeued_drawn_again"] == 1.0
    prod.trained(1, 1, b1)
    assert prod.resume_state(1)["requeue"] == []
    prod.close()


def test_the_next_batch_is_prepared_while_a_step_trains_and_the_resume_state_stays_exact():
    """k = 0: once step 1's batch is handed over, the prefetch thread draws batch 2 and builds its prompts (off the
    step's critical path); a checkpoint after step 1 still resumes before batch 2, and the resumed producer makes
    the same batch 2."""

    class Logged(Records):
        def __init__(self):
            self.built = []  # (thread, records) per prompts() call

        def prompts(self, items):
            self.built.append((threading.current_thread().name, sorted({i for i, _ in items})))
            return super().prompts(items)

    data, pool = Data(), Pool()
    data.records = Logged()
    ref = _reference_states(4, 3)
    prod = BatchProducer(data, pool, Scorer(), max_staleness=0)
    prod.start(1, 3, version=0)
    b1 = prod.get(1)
    _wait_for(lambda: len(data.records.built) == 2)  # batch 2's prompts, before the trainer asks for step 2
    assert data.records.built[1][0].startswith("prompt-prefetch") and pool.calls == [4]
    assert data.sampler.state_dict() == ref[2]  # batch 2 is drawn ...
    assert prod.resume_state(1)["sampler"] == ref[1]  # ... but a checkpoint after step 1 resumes before it
    prod.trained(1, 1, b1)
    state = prod.resume_state(1)
    assert state["sampler"] == ref[1]
    b2 = prod.get(2)
    assert sorted({p.original_idx for p in b2.prompts}) == data.records.built[1][1]  # the prefetched batch
    assert len(data.records.built) <= 3  # batch 2 was not built again (3: batch 3 prefetched)
    prod.close()
    again = BatchProducer(Data(), Pool(), Scorer(), max_staleness=0)
    again.load_state(state)
    again.start(2, 3, version=1)
    assert [p.uid for p in again.get(2).prompts] == [p.uid for p in b2.prompts]
    again.close()


@pytest.fixture(scope="module")
def shapes(tmp_path_factory, tiny_model_dir):
    """A small synthetic set (30 train records, paired and single) and the tiny model's tokenizer."""
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("shapes")
    syn = SyntheticConfig(num_records=40, val_fraction=0.25, text_only_fraction=0.2)
    make_synthetic(out, syn, seed=5)
    return out, AutoTokenizer.from_pretrained(tiny_model_dir)


def test_an_image_that_fails_to_decode_drops_its_record_and_a_resume_does_not_die_on_it(shapes, tmp_path, caplog):
    src, tok = shapes
    shutil.copytree(src, tmp_path / "set")
    train = tmp_path / "set" / "train.parquet"
    cfg = DataConfig(rollout_batch_size=8, paired_ratio=0.75)

    def pipeline():
        table = RecordTable([train], cfg, PromptBuilder(tok, cfg))
        return SimpleNamespace(records=table, sampler=PairSampler(table.paired_ids, table.single_ids, 8, 0.75, 0))

    victim = pipeline().sampler.next_batch()[0][0]  # a paired record of the first batch
    image = tmp_path / "set" / pipeline().records.record(victim)["images"][0]
    cut_jpeg(image)
    data = pipeline()
    assert victim in data.records.paired_ids and data.records.metrics()["data/bad_rows/total"] == 0  # passes load
    prod = BatchProducer(data, Pool(), Scorer(), max_staleness=0)
    before = prod.resume_state(0)
    prod.start(1, 3, version=0)
    with caplog.at_level(logging.WARNING, logger="ivgr_dist.data.dataset"):
        b1 = prod.get(1)
    uids = [p.uid for p in b1.prompts]
    assert f"{victim}:grounded" not in uids and f"{victim}:textual" not in uids  # both streams went together
    assert len(uids) == 8 - 2 and len(b1.groups) == 6  # the batch went on without it
    assert b1.metrics["data/bad_rows/unreadable_image"] == 1 and b1.metrics["data/dropped_records"] == 1
    file, row = data.records.location(victim)
    assert f"{file} row {row} (original_idx {victim}): unreadable_image" in caplog.text
    assert image.name in caplog.text and "image file is truncated" in caplog.text
    prod.trained(1, 1, b1)
    after = prod.resume_state(1)
    prod.close()

    # resumed from before that batch: drawn again, dropped again, the same batch
    again = BatchProducer(pipeline(), Pool(), Scorer(), max_staleness=0)
    again.load_state(before)
    again.start(1, 1, version=0)
    assert [p.uid for p in again.get(1).prompts] == uids
    again.close()
    # resumed from after it: counted, and never drawn again (the loop runs the paired pool past an epoch)
    later_data, engines = pipeline(), Pool()
    later = BatchProducer(later_data, engines, Scorer(), max_staleness=0)
    later.load_state(after)
    assert later_data.records.metrics()["data/bad_rows/unreadable_image"] == 1
    engines.version = 1
    later.start(2, 10, version=1)
    for step in range(2, 11):
        b = later.get(step)
        assert victim not in {p.original_idx for p in b.prompts} and len(b.prompts) == 8
        engines.version = step  # the push after the step
        later.trained(step, step, b)
    assert later_data.sampler.metrics()["data/epoch/paired"] >= 1
    later.close()


def test_a_batch_that_loses_every_record_is_drawn_again(shapes, tmp_path):
    src, tok = shapes
    shutil.copytree(src, tmp_path / "set")
    train = tmp_path / "set" / "train.parquet"
    cfg = DataConfig(max_bad_row_fraction=0.1)
    table = RecordTable([train], cfg, PromptBuilder(tok, cfg))
    data = SimpleNamespace(records=table, sampler=PairSampler(table.paired_ids, [], 4, 1.0, 0))
    reference = PairSampler(table.paired_ids, [], 4, 1.0, 0)
    lost, second = reference.next_batch(), reference.next_batch()
    for i in {i for i, _ in lost}:
        cut_jpeg(tmp_path / "set" / table.record(i)["images"][0])
    prod = BatchProducer(data, Pool(), Scorer(), max_staleness=0, prefetch=False)
    prod.start(1, 1, version=0)
    b1 = prod.get(1)
    assert [(p.original_idx, p.stream) for p in b1.prompts] == second
    assert b1.metrics["data/dropped_records"] == 2 and set(data.sampler.excluded) == {i for i, _ in lost}
    prod.close()
