"""In-process stand-ins for the trainer's roles (no Ray, no vLLM, no torch.distributed), so that ``Trainer.train()``
runs in a unit test in milliseconds. Each records what the trainer asked of it; the real ``BatchProducer``,
``PairSampler``, ``MetricsLogger`` and checkpoint code run around them.

- :class:`FakeData`: the train pipeline's two parts the producer uses (a real ``PairSampler`` and a record table).
- :class:`FakePool`: engines that answer each prompt with a group at the version they hold, call ``on_idle``
  while "waiting", and heal like ``RolloutPool.heal`` (lost engines replaced by new ids, pushed to before they
  serve).
- :class:`FakeSync`: pushes set the engines' version; a script makes a push lose engines (``SyncError``).
- :class:`FakeLearners`: ``load_batch`` / ``compute_logprobs`` / ``train_step`` with realistic shapes, and a
  checkpoint that is one shard file holding its update count.
- :class:`FakeScorer`: rewards every rollout by rule, keeps a counter as its state.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from ivgr_dist.config import load_config
from ivgr_dist.data.sampler import PairSampler
from ivgr_dist.driver.trainer import Trainer
from ivgr_dist.rollout.pool import RolloutError
from ivgr_dist.sync.fanout import SyncError
from ivgr_dist.types import Prompt, Rollout


class FakeRecords:
    dropped: dict[int, str] = {}

    def prompts(self, items):
        return [Prompt(i, s, f"q{i}", [1, 2, 3], 3, "a", "exact", "t") for i, s in items]

    def drop(self, i, why, restored=False):
        self.dropped[i] = why

    def metrics(self):
        return {}


class FakeData:
    """``records`` and a real ``sampler`` (records 0-39, both streams of every record paired; ``batch_size``
    prompts a batch)."""

    def __init__(self, batch_size: int = 4, seed: int = 3):
        self.records = FakeRecords()
        self.sampler = PairSampler(list(range(40)), [], batch_size=batch_size, paired_ratio=1.0, seed=seed)


class FakePool:
    """``engines`` engines holding version 0. ``generate`` answers every prompt with ``n`` rollouts stamped with
    the version the engines hold, calling ``on_idle`` before each group (as ``RolloutPool.generate`` does while it
    waits); ``heal`` records whether the learner was busy when it ran."""

    def __init__(self, engines: int = 2, n: int = 2, learners=None):
        self.n, self.learners = n, learners
        self.version = 0
        self.target = self.max_engines = engines
        self.alive = list(range(engines))
        self.serving = list(range(engines))
        self.next_id = engines
        self.restarts = 0
        self.replaceable = True
        self.dropped: list[tuple[int, str]] = []
        self.generated: list[tuple[int, int]] = []  # (batch number, engines' version when it started)
        self.finished = 0  # generations that handed out every group
        self.gates: dict[int, threading.Event] = {}  # batch number -> its generation starts once this is set
        self.heals: list[dict] = []  # what each heal saw
        self.generated_event = threading.Condition()
        self.shut = False
        self.cfg = SimpleNamespace(group_timeout_s=5.0)

    def sampling_seed(self, step: int = 0):
        return None

    def generate(self, prompts, stats=None, seed=None, trace=None, on_idle=None):
        batch = len(self.generated) + 1
        if batch in self.gates:
            assert self.gates[batch].wait(5), f"batch {batch}: its gate never opened"
        with self.generated_event:
            self.generated.append((batch, self.version))
            self.generated_event.notify_all()
        for p in prompts:
            if on_idle is not None:
                on_idle()
            v = self.version
            if stats is not None:
                stats.groups += 1
                stats.tokens += 2 * self.n
            yield [
                Rollout(p, k, [5, 6 + k], f"r{k}", [-0.5, -0.25], v, weight_version_last=self.version)
                for k in range(self.n)
            ]
        with self.generated_event:
            self.finished += 1
            self.generated_event.notify_all()

    def wait_generated(self, batches: int, timeout: float = 5.0) -> bool:
        """Wait until ``batches`` generations have finished (every group handed out)."""
        with self.generated_event:
            return self.generated_event.wait_for(lambda: self.finished >= batches, timeout)

    def drop(self, engine: int, reason: str) -> None:
        if engine in self.alive:
            self.alive.remove(engine)
            self.serving.remove(engine)
            self.dropped.append((engine, reason))

    def heal(self, push=None) -> dict:
        busy = self.learners is not None and self.learners.busy
        self.heals.append({"thread": threading.current_thread().name, "learner_busy": busy})
        joining = []
        while len(self.alive) < self.target and self.replaceable:
            joining.append(self.next_id)
            self.alive.append(self.next_id)
            self.next_id += 1
            self.restarts += 1
        if joining and push is not None:
            push(joining)
        self.serving += joining
        if not self.serving:
            raise RolloutError("only 0 rollout engine(s) live, below rollout.min_engines=1: no replacement possible")
        return {}

    def set_target(self, n: int) -> None:
        self.target = n

    def start_health_checks(self) -> None:
        pass

    def fleet_metrics(self) -> dict[str, float]:
        return {
            "rollout/engines_live": float(len(self.serving)),
            "rollout/engines_target": float(self.target),
            "rollout/engine_restarts": float(self.restarts),
        }

    def shutdown(self) -> None:
        self.shut = True


class FakeSync:
    """Each push makes the engines take ``version``; ``fail[version]``: the engine ids the first push of that
    version loses (a ``SyncError`` naming them). ``pushes``: (version, engines asked, engines alive)."""

    def __init__(self, fail: dict[int, list[int]] | None = None):
        self.fail = dict(fail or {})
        self.pushes: list[tuple[int, list[int] | None, list[int]]] = []
        self.closed = False

    def setup(self, learners, rollouts) -> None:
        pass

    def push(self, learners, rollouts, version, engines=None) -> dict[str, float]:
        assert not learners.busy, "a push while the learner group works"
        self.pushes.append((version, engines, list(rollouts.alive)))
        lost = self.fail.pop(version, None)
        if lost:
            raise SyncError(f"engines {lost} died", version, lost, {e: "EngineDeadError: gone" for e in lost})
        rollouts.version = version
        return {"time/sync_s": 0.01}

    def close(self) -> None:
        self.closed = True


class FakeLearners:
    """One 'rank'; each pass returns what the real group returns for the loaded batch."""

    def __init__(self, on_train_step=None):
        self.actors = [object()]
        self.updates = 0
        self.busy = False
        self.loaded = None
        self.exported: list[Path] = []
        self.loaded_from: str | None = None
        self.on_train_step = on_train_step
        self.shut = False

    def load_batch(self, batch, mini_batches=None) -> dict[str, float]:
        self.loaded = batch
        return {"learner/input_bytes": float(batch.nbytes()), "learner/encode_s_max": 0.0, "time/learner_load_s": 0.0}

    def compute_logprobs(self, which: str = "policy", temperature: float = 1.0) -> list[np.ndarray]:
        return [self.loaded.behaviour(i).astype(np.float64) for i in range(len(self.loaded))]

    def train_step(self, mini_batch: int = 0, temperature: float = 1.0, objective: str = "grpo") -> dict[str, float]:
        self.busy = True
        try:
            if self.on_train_step is not None:
                self.on_train_step(self)
            self.updates += 1
            return {"learner/loss": 0.1, "learner/grad_norm": 1.0, "learner/lr": 1e-6}
        finally:
            self.busy = False

    def save_checkpoint(self, path: str) -> list[dict]:
        Path(path).mkdir(parents=True, exist_ok=True)
        data = json.dumps({"updates": self.updates}).encode()
        (Path(path) / ".metadata").write_bytes(data)
        return [{"rank": 0, "node": "local-node", "files": {".metadata": len(data)}}]

    def load_checkpoint(self, path: str) -> None:
        self.loaded_from = path
        self.updates = json.loads((Path(path) / ".metadata").read_text())["updates"]

    def export_hf(self, path, dtype=None) -> Path:
        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / "config.json").write_text("{}")
        self.exported.append(Path(path))
        return Path(path)

    def shutdown(self) -> None:
        self.shut = True


class FakeScorer:
    """Format 1 for every rollout, accuracy 1 for sample 0 of each group (so groups have a nonzero advantage)."""

    last_judge_error: str | None = None

    def __init__(self):
        self.scored = 0
        self.closed = False

    def score_stream(self, groups, prompts, step, trace=None):
        for group in groups:
            for r in group:
                r.rewards = {"format": 1.0, "accuracy": float(r.sample_idx == 0)}
                r.reward = sum(r.rewards.values())
            self.scored += 1
            yield group

    def metrics(self) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict:
        return {"scored": self.scored}

    def load_state_dict(self, state: dict) -> None:
        self.scored = state["scored"]

    def close(self) -> None:
        self.closed = True


def fake_config(out, **overrides):
    """The default config, small: 2 records (4 prompts) a step, 2 samples each, one update a step, jsonl only,
    no weight check (it scores a probe on the engines), no samples log."""
    base = {
        "trainer.output_dir": out,
        "trainer.loggers": "[jsonl]",
        "trainer.max_steps": 3,
        "trainer.save_every": 0,
        "trainer.log_samples_every": 0,
        "rollout.n": 2,
        "data.rollout_batch_size": 2,
        "learner.global_batch_size": 2,
        "sync.verify_every": 0,
    }
    base.update(overrides)
    return load_config(None, [f"{k}={v}" for k, v in base.items()])


def fake_trainer(cfg, *, engines: int = 2, fail: dict[int, list[int]] | None = None, on_train_step=None, **kwargs):
    """A Trainer over fresh fakes; returns it (its fakes are its roles: ``trainer.rollouts`` etc.)."""
    learners = FakeLearners(on_train_step)
    pool = FakePool(engines, cfg.rollout.n, learners)
    return Trainer(cfg, FakeData(), pool, learners, FakeScorer(), FakeSync(fail), **kwargs)
