"""The test-mode queued communicator (sync/completion.py) and the completion polling of the collective push
(sync/collective.py), on a fake gloo group: no processes, no vLLM."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from ivgr_dist.sync.buckets import TensorMeta, pack, plan_buckets
from ivgr_dist.sync.collective import receive_buckets, send_buckets
from ivgr_dist.sync.completion import CollectiveTimeout, QueuedGloo, QueuedWork, await_completion


class _Op:
    def __init__(self, run):
        self.run = run

    def wait(self):
        self.run()


class FakeGloo:
    """Each broadcast takes ``op_s``; the ``hang_at``-th blocks until released; receivers get ``payloads``."""

    def __init__(self, op_s: float = 0.0, hang_at: int | None = None, fail_at: int | None = None, payloads=None):
        self.op_s, self.hang_at, self.fail_at, self.payloads = op_s, hang_at, fail_at, list(payloads or [])
        self.calls, self.done, self.aborted = 0, [], False
        self.release = threading.Event()

    def broadcast(self, tensors, opts):
        k = self.calls
        self.calls += 1

        def run():
            time.sleep(self.op_s)
            if k == self.hang_at:
                self.release.wait(10)
                raise RuntimeError("timed out (gloo's own timeout)")
            if k == self.fail_at:
                raise RuntimeError("connection reset by peer")
            if self.payloads:
                tensors[0].copy_(self.payloads[k])
            self.done.append(k)

        return _Op(run)

    def abort(self):
        self.aborted = True


def _queued(fake, timeout_s: float = 30.0, fired: list | None = None) -> QueuedGloo:
    """Never the default watchdog here: it would end pytest (a failed operation of a group not aborted)."""
    return QueuedGloo(fake, timeout_s, on_watchdog=(fired if fired is not None else []).append)


def test_a_queued_broadcast_returns_at_once_and_completes_later_in_issue_order():
    fake = FakeGloo(op_s=0.1)
    group = _queued(fake)
    t0 = time.monotonic()
    works = [group.broadcast([torch.zeros(1)], None) for _ in range(3)]
    assert all(w.wait() for w in works) and time.monotonic() - t0 < 0.05  # wait() does not wait, as NCCL's
    assert not works[0].event().query()
    works[2].event().synchronize()
    assert fake.done == [0, 1, 2] and all(w.query() for w in works)
    group.close()


def test_a_failed_queued_broadcast_is_seen_only_through_its_event_and_abort_fails_the_queue():
    fake = FakeGloo(fail_at=0, hang_at=1)
    group = _queued(fake)
    failed, running, queued = (group.broadcast([torch.zeros(1)], None) for _ in range(3))
    with pytest.raises(RuntimeError, match="connection reset by peer"):
        failed.event().synchronize()
    while fake.calls < 2:  # the second operation has started
        time.sleep(0.01)
    group.abort()
    assert fake.aborted
    with pytest.raises(RuntimeError, match="aborted"):
        queued.event().synchronize()
    assert not running.query()  # gloo's abort does not end a running operation: its own timeout does
    fake.release.set()
    with pytest.raises(RuntimeError, match="gloo's own timeout"):
        running.synchronize()
    late = group.broadcast([torch.zeros(1)], None)
    assert late.query() and fake.calls == 2  # nothing runs after an abort


def test_the_watchdog_ends_a_group_whose_late_operation_was_not_aborted_and_stands_down_after_an_abort():
    fired: list[QueuedWork] = []
    fake = FakeGloo(hang_at=0)
    group = _queued(fake, timeout_s=0.3, fired=fired)
    work = group.broadcast([torch.zeros(1)], None)
    time.sleep(0.6)
    assert fired == [work]  # as torch's NCCL watchdog: the process would end here
    fake.release.set()

    fired2: list[QueuedWork] = []
    fake2 = FakeGloo(hang_at=0)
    group2 = _queued(fake2, timeout_s=0.3, fired=fired2)
    group2.broadcast([torch.zeros(1)], None)
    group2.abort()
    time.sleep(0.6)
    assert fired2 == []
    fake2.release.set()


def test_await_completion_keeps_its_deadline_and_raises_a_failure():
    fake = FakeGloo(hang_at=0, fail_at=1)
    group = _queued(fake)
    hung, failed = (group.broadcast([torch.zeros(1)], None) for _ in range(2))
    t0 = time.monotonic()
    with pytest.raises(CollectiveTimeout, match="bucket 7: not completed by its deadline"):
        await_completion(hung, time.monotonic() + 0.3, "bucket 7")
    assert 0.3 <= time.monotonic() - t0 < 0.5
    fake.release.set()
    with pytest.raises(RuntimeError, match="connection reset"):
        await_completion(failed, time.monotonic() + 5, "bucket 8")
    group.close()


SIZES = [1000, 3000, 500, 7000, 20]


def _metas() -> list[TensorMeta]:
    return [TensorMeta(f"t{i}", "float32", (n,)) for i, n in enumerate(SIZES)]


def _pairs(drained: list[str]):
    g = torch.Generator().manual_seed(0)
    for m in _metas():
        drained.append(m.name)
        yield m.name, torch.randn(m.shape, generator=g)


def test_a_push_measures_completion_not_queueing():
    fake = FakeGloo(op_s=0.1)
    out = send_buckets(_queued(fake), "cpu", _pairs([]), _metas(), 4000)
    assert out["buckets"] == 4 and fake.done == [0, 1, 2, 3]
    assert out["send_s"] >= 0.4  # four operations of 0.1 s each, all completed


def test_a_hung_peer_fails_the_push_by_its_deadline_aborts_the_group_and_drains_the_source():
    fired: list = []
    fake = FakeGloo(hang_at=1)
    group = _queued(fake, timeout_s=2 * 0.5, fired=fired)  # the backstop: twice the push's deadline
    drained: list[str] = []
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match=r"broadcast failed after 4000 of 46080 bytes: .*not completed by its"):
        send_buckets(group, "cpu", _pairs(drained), _metas(), 4000, timeout_s=0.5)
    assert 0.5 <= time.monotonic() - t0 < 1.0
    assert fake.aborted and group.aborted and drained == [m.name for m in _metas()]
    time.sleep(1.2)
    assert fired == []  # aborted in time: the watchdog stood down
    fake.release.set()


def test_the_receiver_hands_over_a_bucket_only_once_its_bytes_arrived():
    metas = _metas()
    g = torch.Generator().manual_seed(1)
    state = [torch.randn(m.shape, generator=g) for m in metas]
    plan = plan_buckets(metas, 16_000)
    payloads = [pack([state[i] for i in b], [metas[i] for i in b], "cpu") for b in plan]
    group = _queued(FakeGloo(op_s=0.05, payloads=payloads))
    got = {n: t.clone() for bucket in receive_buckets(group, "cpu", metas, 16_000, 5.0) for n, t in bucket}
    assert all(torch.equal(got[m.name], t) for m, t in zip(metas, state, strict=True))
    group.close()


def _hanging_receiver(rank: int, world: int, port: int, hang: bool) -> None:
    from ivgr_dist.sync.collective import open_group

    group = open_group("127.0.0.1", port, rank, world, "gloo_queued", timeout_s=30.0)
    group.on_watchdog = lambda work: None  # this one is killed by the test
    big = [TensorMeta(f"t{i}", "float32", (1 << 20,)) for i in range(8)]
    for k, _ in enumerate(receive_buckets(group, "cpu", big, 4 << 20, timeout_s=30.0)):
        if hang and k == 0:
            time.sleep(60)  # a stopped peer: holds its connections, receives nothing more


def test_a_real_queued_gloo_push_to_a_hung_peer_fails_by_its_deadline_and_aborts():
    import multiprocessing as mp
    import socket

    from ivgr_dist.sync.collective import open_group

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_hanging_receiver, args=(r, 3, port, r == 2)) for r in (1, 2)]
    for p in procs:
        p.start()
    try:
        group = open_group("127.0.0.1", port, 0, 3, "gloo_queued", timeout_s=30.0)  # (the spawns' imports)
        fired: list = []
        group.on_watchdog = fired.append
        big = [TensorMeta(f"t{i}", "float32", (1 << 20,)) for i in range(8)]  # 4 MiB buckets: beyond socket buffers
        pairs = ((m.name, torch.zeros(m.shape)) for m in big)
        t0 = time.monotonic()
        with pytest.raises(RuntimeError, match="not completed by its deadline"):
            send_buckets(group, "cpu", pairs, big, 4 << 20, timeout_s=2.0)
        assert time.monotonic() - t0 < 3.0 and group.aborted and fired == []
    finally:
        for p in procs:
            p.kill()
            p.join(timeout=10)
