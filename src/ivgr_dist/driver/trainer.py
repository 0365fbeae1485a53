"""The driver: iVGR's RL step on one screen.

    sample records -> generate both streams (groups stream back as they finish)
      -> score each finished group (pair-aware, overlapping generation)
      -> GRPO advantages per (record, stream) group -> old/ref log-probs -> update
      -> push weights (version v+1) into every engine -> log -> checkpoint

Everything heavy lives in the roles (``RolloutPool``, ``LearnerGroup``, the scorer, the weight
sync); this file only wires them in the order of the algorithm. The batches come from a
``BatchProducer`` (sampling, generation and scoring): with ``trainer.max_staleness=0`` it produces a
step's batch when the step asks for it (generation and learning alternate, on-policy like the recipe);
with ``k >= 1`` it produces up to ``k + 1`` batches ahead in a thread while the learner trains, and the
weight push lands in running generations. The loop below is the same for both.

Roles are injected: ``Trainer(cfg, data, rollouts, learners, scorer, sync, ...)`` starts nothing and calls
no Ray API itself, so the loop runs over in-process fakes (tests/unit/test_trainer_loop.py);
:meth:`Trainer.from_config` builds and starts the real roles (and shuts them down again when a later
start-up step fails).

Healing the rollout fleet (replacing lost engines, starting joining ones and pushing them the current
weights) must not overlap the learner's work or another push. The trainer holds a lock (``_busy``) from a
step's learner passes through its push, step-boundary healing and weight check; the one idle hook it hands the
producer (``_on_idle``, called by generation while it waits on the engines) heals only when it gets that lock
without waiting. Synchronous: generation runs in the trainer's thread and the lock is free, so it heals there;
asynchronous: the producer's thread heals while the trainer waits for a batch, and skips while it trains.

Off-policy correction: the learner's log-probs at the start of a step are the PROXIMAL policy (the PPO
ratio's denominator); each token is weighted by min(proximal / behaviour, ``algorithm.tis_cap``), the
behaviour being the engine's sampled log-probs (``ivgr_dist.learner.grpo.truncated_is_weights``).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import sys
import threading
from pathlib import Path

import numpy as np
import torch

from ivgr_dist.config import Config, to_yaml
from ivgr_dist.driver import checkpoints, control
from ivgr_dist.driver.producer import BatchProducer
from ivgr_dist.driver.samples import sample_records
from ivgr_dist.learner.grpo import group_advantages
from ivgr_dist.learner.step_data import StepBatch
from ivgr_dist.reward.judge.monitor import JudgeFailureMonitor
from ivgr_dist.reward.summary import reward_metrics
from ivgr_dist.runtime.interrupts import Interrupted, graceful, signal_name
from ivgr_dist.runtime.metrics import MetricsLogger, Timer, Tracer, require_loggers, truncate_jsonl, wandb_options
from ivgr_dist.runtime.startup import cluster_has_gpus
from ivgr_dist.runtime.storage import StorageProbe
from ivgr_dist.sync.verify import WeightVerifier
from ivgr_dist.types import Rollout

log = logging.getLogger(__name__)


class Trainer:
    """The RL loop over its roles. The constructor starts nothing: it takes roles already built and started
    (:meth:`from_config` builds the real ones on Ray; the unit tests pass in-process fakes) and, with
    ``trainer.resume``, continues from the newest checkpoint (the engines are given its weights)."""

    def __init__(
        self,
        cfg: Config,
        data,
        rollouts,
        learners,
        scorer,
        sync,
        *,
        tracer: Tracer | None = None,
        control=None,
        judge_monitor: JudgeFailureMonitor | None = None,
        verifier=None,
        cluster: str = "in-process roles",
        weight_sync: str | None = None,
    ):
        """``data``: the train ``DataPipeline``; ``rollouts``: a ``RolloutPool``; ``learners``: a ``LearnerGroup``;
        ``scorer``: a ``StreamScorer``; ``sync``: a ``WeightSync`` already set up between the two. The trainer
        owns them from here (:meth:`close`). ``tracer``: a ``metrics.Tracer`` (``trainer.trace``) or None;
        ``control``: the run's ``control.Mailbox`` (``ivgr-dist scale`` / ``stop``) or None;
        ``judge_monitor``, ``verifier``: built from ``cfg`` when None; ``cluster``, ``weight_sync``: the
        start-up summary's cluster line and weight-sync backend name."""
        self.cfg = cfg
        self.data, self.rollouts, self.learners, self.scorer, self.sync = data, rollouts, learners, scorer, sync
        self.out = Path(cfg.trainer.output_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.tracer, self.control = tracer, control
        self.cluster, self.weight_sync = cluster, weight_sync or cfg.sync.backend
        self.judge_monitor = judge_monitor or JudgeFailureMonitor(
            cfg.reward.judge.max_failure_rate, cfg.reward.judge.failure_window
        )
        self.judge_stop: str | None = None
        """Why the judge's failure rate stopped :meth:`train` (after the step's checkpoint), or None."""
        self.verifier = verifier or WeightVerifier(cfg.sync.verify_tolerance)
        self._step_in_progress = 0
        self._stop_requested = False
        self.stop_signal: int | None = None
        """SIGINT or SIGTERM received during :meth:`train`: it stops after the current step, with a checkpoint."""
        self.last_checkpoint: Path | None = None
        self._busy = threading.Lock()
        """Held while the learner group works or weights are pushed: the fleet heals only when it is free."""
        # max_staleness 0: each batch is produced when its step asks for it; k >= 1: ahead, in a thread. Either
        # way generation calls on_idle while it waits on the engines.
        self.producer = BatchProducer(data, rollouts, scorer, cfg.trainer.max_staleness, tracer, on_idle=self._on_idle)
        self.step, self.version = 0, 0
        if cfg.trainer.resume:
            self.maybe_resume()
            truncate_jsonl(self.out / "trained.jsonl", self.step)
        # after the resume step is known: the logs continue from it (later records, about to be redone, dropped)
        self.metrics = MetricsLogger(
            self.out,
            cfg.trainer.loggers,
            resume_step=self.step if cfg.trainer.resume else None,
            wandb=wandb_options(cfg),
        )
        log.info("%s", self.startup_summary())

    @classmethod
    def from_config(cls, cfg: Config, scorer=None) -> Trainer:
        """Build and start the roles on Ray: the scorer, the data pipeline, the weight sync, the learner group,
        the rollout pool (in that order), then the trainer over them. ``scorer``: one ``make_scorer`` already
        built and checked (``ivgr-dist train`` builds it before the warm start); owned from here. None: built
        here, first. A failure at any point shuts down what was started (the scorer included), then raises."""
        from ivgr_dist.data.pipeline import build_pipeline
        from ivgr_dist.learner.group import LearnerGroup
        from ivgr_dist.reward.pool import make_scorer
        from ivgr_dist.rollout.pool import RolloutPool
        from ivgr_dist.sync import make_weight_sync, resolve_backend

        try:
            require_loggers(cfg.trainer.loggers)  # a missing wandb fails before the roles start
            out = Path(cfg.trainer.output_dir)
            out.mkdir(parents=True, exist_ok=True)
            (out / "config.yaml").write_text(to_yaml(cfg))
        except BaseException:
            if scorer is not None:
                scorer.close()
            raise
        with contextlib.ExitStack() as started:  # what is started, shut down in reverse order on a failure
            # The scorer first: it is cheap, and its judge check (make_scorer) stops a run whose judge cannot work
            # before the engines and the learner start. reward.num_workers=0: in the driver.
            if scorer is None:
                scorer = make_scorer(cfg.reward, cfg.algorithm, output_dir=out)
            started.callback(scorer.close)
            use_gpus = cluster_has_gpus()
            data = build_pipeline(cfg.model, cfg.data, "train", max_images=cfg.rollout.engine.max_images_per_prompt)
            sync = make_weight_sync(
                cfg.sync.backend, use_gpus, cfg.sync.bucket_mb << 20, cfg.model.dtype, cfg.sync.timeout_s
            )
            started.callback(sync.close)
            storage = StorageProbe(out, cfg.model.path)  # every engine's and rank's node must see both
            try:
                # the learners' group first: reserved before any engine's, its PACK bundles land on as few nodes
                # as can hold them (engines reserved first could leave each node a few devices, and the ranks
                # would then straddle nodes: every all-gather over the slower inter-node link)
                learners = LearnerGroup(cfg.model, cfg.learner, cfg.algorithm, total_updates(cfg), storage=storage)
                started.callback(learners.shutdown)
                rollouts = RolloutPool(
                    cfg.model,
                    cfg.rollout,
                    sync.engine_backend,
                    use_gpus,
                    storage=storage,
                    inflight_updates=cfg.trainer.max_staleness > 0,
                    storage_check=functools.partial(_check_storage, out, cfg.model.path),
                )
                started.callback(rollouts.shutdown)
            finally:
                storage.close()
            _write_nodes(out / "nodes.json", storage.checked)
            sync.setup(learners, rollouts)
            rollouts.start_health_checks()
            try:
                mailbox = control.Mailbox(control.create(out, rollouts.max_engines))
                started.callback(mailbox.close)
            except RuntimeError as exc:
                log.warning("%s; `ivgr-dist scale` cannot reach this run", exc)
                mailbox = None
            trainer = cls(
                cfg,
                data,
                rollouts,
                learners,
                scorer,
                sync,
                tracer=Tracer(out / "trace.json") if cfg.trainer.trace else None,
                control=mailbox,
                cluster=_cluster_line(),
                weight_sync=resolve_backend(cfg.sync.backend, use_gpus),
            )
            started.pop_all()  # the trainer owns them now (close)
        return trainer

    def startup_summary(self) -> str:
        """What the run holds and where its outputs go (the console's start-up lines)."""
        cfg = self.cfg
        judge = cfg.reward.judge.backend
        lines = [
            self.cluster,
            f"rollout: {len(self.rollouts.serving)} of {self.rollouts.target} engine(s) serving, tensor_parallel_size "
            f"{cfg.rollout.tensor_parallel_size}, {cfg.rollout.n} samples per prompt; weight sync {self.weight_sync}",
            f"learner: {len(self.learners.actors)} FSDP2 rank(s); reward: {cfg.reward.num_workers} worker(s), judge "
            f"{judge}",
            f"steps {self.step + 1}-{cfg.trainer.max_steps}"
            + (f" (resumed at step {self.step})" if self.step else "")
            + f"; outputs in {self.out}: metrics.jsonl, checkpoints/, logs/ (engines, learners, Ray, vLLM)"
            + (f"; tensorboard --logdir {self.out / 'tensorboard'}" if "tensorboard" in cfg.trainer.loggers else "")
            + ("; W&B: project " + cfg.trainer.wandb_project if "wandb" in cfg.trainer.loggers else ""),
        ]
        return "\n  ".join(["run:", *lines])

    # ---------------------------------------------------------------------------------- the loop

    def train(self) -> list[dict]:
        """Run the RL steps left. SIGINT/SIGTERM (:mod:`ivgr_dist.runtime.interrupts`), ``ivgr-dist stop`` and a judge
        failure rate above ``reward.judge.max_failure_rate`` (:attr:`judge_stop`) end it after the current step,
        with its checkpoint; after a signal or a judge stop the policy is not exported (a preempted job's grace
        period goes to the checkpoint) and :attr:`stop_signal` says which signal came."""
        from tqdm import tqdm

        records = []
        bar = tqdm(range(self.step + 1, self.cfg.trainer.max_steps + 1), desc="rl steps", unit="step")
        self.producer.start(self.step + 1, self.cfg.trainer.max_steps, self.version)
        try:
            with graceful(self._on_signal):
                for step in bar:
                    record = self.rl_step(step)
                    records.append(record)
                    bar.set_postfix(
                        reward_A=f"{record.get('reward/grounded/overall', float('nan')):.2f}",
                        reward_B=f"{record.get('reward/textual/overall', float('nan')):.2f}",
                        step_s=f"{record['time/step_s']:.1f}",
                    )
                    last_error = getattr(self.scorer, "last_judge_error", None)
                    self.judge_stop = self.judge_monitor.observe(step, record, last_error)
                    stopping = self._stop_requested or self.stop_signal is not None or self.judge_stop is not None
                    if self._should_save(step) or stopping:
                        self.save(step)
                    if self.judge_stop is not None:
                        log.error("stopped after step %d (checkpoint written): %s", step, self.judge_stop)
                        break
                    if stopping:
                        why = "`ivgr-dist stop`" if self.stop_signal is None else signal_name(self.stop_signal)
                        log.info("stopped after step %d at the request of %s (checkpoint written)", step, why)
                        break
        finally:
            bar.close()
            self.producer.close()
        if records and self.stop_signal is None and self.judge_stop is None:
            self.export_model()
        return records

    def _on_signal(self, signum: int) -> None:
        """First SIGINT/SIGTERM: finish the current step, checkpoint it, stop. Second: stop now."""

        if self.stop_signal is not None:
            raise Interrupted(signum)
        self.stop_signal = signum
        step = self._step_in_progress or self.step + 1
        from tqdm import tqdm

        tqdm.write(
            f"ivgr-dist: {signal_name(signum)} received: stopping after step {step} with its checkpoint "
            f"(again to stop now, without it)",
            file=sys.stderr,
        )

    @property
    def model_dir(self) -> Path:
        """Hugging Face export of the latest policy (``ivgr-dist eval --model`` takes it)."""
        return self.out / "model"

    def export_model(self) -> Path:
        """Write the current policy as a Hugging Face model directory (swapped in whole: ``checkpoints.replace_dir``)."""
        self.learners.export_hf(self.model_dir, dtype=self.cfg.model.dtype)
        log.info("policy exported to %s", self.model_dir)
        return self.model_dir

    def rl_step(self, step: int) -> dict:
        cfg, timer, span = self.cfg, Timer(), self._span
        with timer("step"), span("trainer", f"step {step}"):
            self._step_in_progress = step
            with timer("wait"), span("trainer", "wait for batch"):  # synchronous: generation and rewards now
                batch = self.producer.get(step)  # generation heals the fleet while it waits (_on_idle)
            rollouts = batch.rollouts
            self._assign_advantages(rollouts)
            sample_every, per_stream = cfg.trainer.log_samples_every, cfg.trainer.log_samples_per_stream
            samples = sample_records(rollouts, step, per_stream) if sample_every and step % sample_every == 0 else []
            with self._busy:  # learner passes, weight pushes, step-boundary healing: no idle healing meanwhile
                with timer("learner"):
                    placed, old, train = self._learn(rollouts, timer)
                versions = _version_metrics(rollouts, self.version)  # against the policy just updated
                mismatch = _mismatch(rollouts, old, self.version)
                with timer("sync"), span("sync", f"push version {self.version + 1}"):
                    self.version += 1
                    sync = self.push_weights(step)
                self.producer.trained(step, self.version, batch)
                with timer("fleet"), span("trainer", "fleet"):  # step boundary: scale requests, replacements
                    fleet = self._fleet_step()
                verify = self._verify(step, rollouts)
        gen = batch.metrics["time/generate_s"]
        metrics = {
            "weight_version": self.version,
            **timer.metrics(),
            **batch.metrics,
            **reward_metrics(rollouts),
            **train,
            **sync,
            **verify,
            **versions,
            "learner/input_bytes": placed["learner/input_bytes"],
            "learner/encode_s_max": placed["learner/encode_s_max"],
            **_overhead(timer.seconds, gen),
            **mismatch,
            **fleet,
        }
        record = self.metrics.log(step, metrics)
        self.metrics.log_samples(step, samples)
        _log_trained(self.out / "trained.jsonl", step, rollouts)
        if self.tracer is not None:
            self.tracer.write()
        if verify and (error := self.verifier.error()) is not None:
            raise error  # logged first, so metrics.jsonl shows sync/verified = 0 at this step
        return record

    def _verify(self, step: int, rollouts: list[Rollout]) -> dict[str, float]:
        """Every ``sync.verify_every`` steps: do the engines compute with the learner's weights (``sync.verify``)?"""
        self.verifier.choose_probe(rollouts)
        every = self.cfg.sync.verify_every
        return self.verifier.check(self.learners, self.rollouts, self.version) if every and step % every == 0 else {}

    def _learn(self, rollouts: list[Rollout], timer: Timer) -> tuple[dict, list, dict[str, float]]:
        """The learner's part of a step: place the batch, the old (proximal) and reference log-probs, the updates.
        Returns the placement's metrics, the old log-probs and the updates' metrics."""
        cfg, span = self.cfg, self._span
        T = cfg.rollout.temperature or 1.0
        with timer("learner_input"), span("learner", "load batch"):  # images once per record; placed once
            data = StepBatch.from_rollouts(rollouts)
            updates = self._mini_batches(len(data))
            placed = self.learners.load_batch(data, updates)
        with span("learner", "old log-probs"):
            old = self.learners.compute_logprobs("policy", T)  # the proximal policy
        if cfg.algorithm.kl_coef > 0:
            with span("learner", "reference log-probs"):
                self.learners.compute_logprobs("reference", T)
        with span("learner", "updates"):
            train = self._update(len(updates), T)
        return placed, old, train

    def _span(self, track: str, name: str):
        """A trace span (``trainer.trace``), or nothing."""
        return self.tracer(track, name) if self.tracer is not None else contextlib.nullcontext()

    def push_weights(self, step: int, engines: list[int] | None = None) -> dict[str, float]:
        """Push version ``self.version`` to every live engine (``engines``: at least to those, the ones joining).
        Engines that die or hang during the push are dropped (and replaced later) and the push is tried once
        more (the others must not go on with a partial update); a second failure stops the run, naming the step.

        With no live engine left (all lost at once, before or during the push) there is no one to push to:
        that is logged and counted (``sync/skipped_pushes``); the learner holds the version and the
        replacements, started at the step boundary, are given it before they take work."""
        from ivgr_dist.sync.fanout import SyncError

        def push(subset: list[int] | None) -> dict[str, float]:
            extra = {"engines": subset} if subset is not None else {}
            return self.sync.push(self.learners, self.rollouts, self.version, **extra)

        def skipped(why: str) -> dict[str, float]:
            log.warning(
                "step %d: %s: no live rollout engine to push version %d to; replacements get it when they join",
                step, why, self.version,
            )  # fmt: skip
            return {"sync/skipped_pushes": 1.0}

        if engines is None and not self.rollouts.alive:
            return skipped("every engine was lost before the push")
        try:
            return push(engines)
        except SyncError as err:
            first = err
        for e in first.failed_engines:
            self.rollouts.drop(e, f"step {step}, push to version {self.version}: {first.errors.get(e, 'no answer')}")
        log.error(
            "step %d: %s; dropped engine(s) %s, pushing again to %d engine(s)",
            step, first, first.failed_engines, len(self.rollouts.alive),
        )  # fmt: skip
        subset = None if engines is None else [e for e in engines if e in self.rollouts.alive]
        if subset is None and not self.rollouts.alive:
            out = skipped("the push lost every engine")
        else:
            try:
                out = push(subset) if subset is None or subset else {}
            except SyncError as err:
                raise SyncError(f"step {step}: {err}", err.version, err.failed_engines, err.errors) from first
        return {**out, "sync/failed_pushes": 1.0, "sync/dropped_engines": float(len(first.failed_engines))}

    # ----------------------------------------------------------------------------- the fleet

    def _on_idle(self) -> None:
        """The producer's idle hook, called while generation waits on the engines (in the trainer's thread when
        synchronous, in the producer's when asynchronous): heal the fleet now if the learner group is idle and
        nothing pushes weights (:attr:`_busy` is free), else leave it to the next wait or step boundary."""
        if not self._busy.acquire(blocking=False):
            return
        try:
            self._heal()
        finally:
            self._busy.release()

    def _heal(self) -> None:
        """Replace lost engines, start pending ones, retire extra ones (RolloutPool.heal); a joining engine gets
        the current weights before it takes work (at version 0 it loaded them itself from model.path). Only with
        :attr:`_busy` held (the step boundary, or :meth:`_on_idle`)."""

        def push(engines: list[int]) -> None:
            if self.version > 0:
                self.push_weights(self._step_in_progress, engines)

        self.rollouts.heal(push)

    def _fleet_step(self) -> dict[str, float]:
        """At a step boundary: apply a target from ``ivgr-dist scale``, heal, report the fleet."""
        if self.control is not None:
            try:
                wanted = self.control.take_request()
            except Exception as exc:  # noqa: BLE001 - the mailbox is a convenience; training goes on without it
                log.warning("fleet control actor unreachable: %s", exc)
                wanted = None
            if wanted is not None:
                self.rollouts.set_target(wanted)
            try:
                self._stop_requested = bool(self.control.stop_requested())
            except Exception:  # noqa: BLE001 - see above
                pass
        self._heal()
        out = self.rollouts.fleet_metrics()
        if self.control is not None:
            self.control.report({"step": self._step_in_progress, **{k.split("/", 1)[1]: v for k, v in out.items()}})
        # ranks started again because their worker died before the actor ran (LearnerGroup._await_actors)
        out["learner/failed_starts"] = float(getattr(self.learners, "failed_starts", 0))
        return out

    def _mini_batches(self, n: int) -> list[list[int]]:
        """Sample indices of each update: consecutive runs of global_batch_size groups (batch order)."""
        per_update = self.cfg.learner.global_batch_size * self.cfg.rollout.n
        return [list(range(i, min(i + per_update, n))) for i in range(0, n, per_update)]

    def _update(self, mini_batches: int, temperature: float) -> dict[str, float]:
        """ppo_epochs passes of optimizer steps over the loaded step's mini-batches."""
        steps = [
            self.learners.train_step(m, temperature)
            for _ in range(self.cfg.learner.ppo_epochs)
            for m in range(mini_batches)
        ]
        out = {k: sum(m[k] for m in steps) / len(steps) for k in steps[0]}
        out["learner/updates"] = float(len(steps))
        return out

    def _assign_advantages(self, rollouts: list[Rollout]) -> None:
        for r, a in zip(rollouts, rollout_advantages(rollouts, self.cfg.algorithm.adv_eps), strict=True):
            r.advantage = a

    # ----------------------------------------------------------------------------- checkpoints

    def _should_save(self, step: int) -> bool:
        every = self.cfg.trainer.save_every
        return step == self.cfg.trainer.max_steps or (every > 0 and step % every == 0)

    def save(self, step: int) -> Path:
        """Learner (sharded: model, optimizer, scheduler) + driver state, written to ``step_N.tmp`` and renamed to
        ``step_N`` once complete and durable (``checkpoints.save``); the learner part counts only once the driver
        sees every shard each rank confirmed (on shared storage, or the run stops here)."""

        def write_learner(path: Path) -> None:
            checkpoints.check_shards(path, self.learners.save_checkpoint(str(path)))

        state = {
            "step": step,
            "weight_version": self.version,
            **self.producer.resume_state(step),  # the sampler before the first batch not trained on
            # taken before the learner writes its shards: a lost reference cache cannot fail the save after them
            "scorer": self.scorer.state_dict(),
        }
        path = checkpoints.save(self.out, step, write_learner, state, self.cfg.trainer.keep_checkpoints)
        self.last_checkpoint = path
        return path

    def maybe_resume(self) -> None:
        """Continue from the newest checkpoint that loads (``checkpoints.resume``: a corrupt newer one is reported
        and skipped)."""

        def load(found: checkpoints.Checkpoint) -> None:
            self.learners.load_checkpoint(str(found.path / "learner"))
            self.producer.load_state(found.state)
            self.scorer.load_state_dict(found.state["scorer"])

        found = checkpoints.resume(self.out, load)
        if found is None:
            return
        self.step, self.version = found.step, found.state["weight_version"]
        with self._busy:
            self.push_weights(self.step)  # engines start from the base weights
        log.info("resumed from %s (step %d, weight version %d)", found.path, self.step, self.version)

    def close(self) -> None:
        if self.control is not None:
            self.control.close()
        self.metrics.close()
        if self.tracer is not None:
            self.tracer.write()
        self.scorer.close()
        self.sync.close()
        self.rollouts.shutdown()
        self.learners.shutdown()


def total_updates(cfg: Config) -> int:
    """Optimizer steps of the whole run (the learning-rate schedule's length)."""
    per_step = -(-cfg.data.rollout_batch_size // cfg.learner.global_batch_size)
    return max(1, cfg.trainer.max_steps * per_step * cfg.learner.ppo_epochs)


def rollout_advantages(rollouts: list[Rollout], eps: float) -> list[float]:
    """GRPO advantage of each rollout within its group (``group_advantages``). An ``excluded`` rollout (its
    judged accuracy failed, ``reward.judge.on_failure=mask``) gets 0 and is left out of its group's mean and
    std: the group's other rollouts are compared among themselves."""
    kept = [i for i, r in enumerate(rollouts) if not r.excluded]
    out = [0.0] * len(rollouts)
    if kept:
        rewards = torch.tensor([rollouts[i].reward for i in kept], dtype=torch.float64)
        adv = group_advantages(rewards, [rollouts[i].group_key for i in kept], eps=eps)
        for i, a in zip(kept, adv.tolist(), strict=True):
            out[i] = a
    return out


def _overhead(seconds: dict[str, float], generate: float) -> dict[str, float]:
    """``time/overhead_s``: the step's time outside generation the learner waited for (all of it when
    synchronous, the part not hidden behind the previous step when asynchronous), learner compute (the
    learner's passes without placing their input) and weight sync: the reward tail, the learner input, the
    probe check and the driver's own work; ``time/overhead_frac``: its share of the step."""
    exposed = min(seconds["wait"], generate)
    compute = exposed + seconds["learner"] - seconds["learner_input"] + seconds["sync"]
    overhead = max(0.0, seconds["step"] - compute)
    return {"time/overhead_s": overhead, "time/overhead_frac": overhead / max(seconds["step"], 1e-9)}


def _check_storage(out: Path, model_path: str, targets) -> None:
    """The shared-storage check of engines placed after the start (``RolloutPool``'s ``storage_check``)."""
    probe = StorageProbe(out, model_path)
    try:
        probe.probe(targets)
    finally:
        probe.close()


def _cluster_line() -> str:
    """The start-up summary's line about the Ray cluster."""
    import ray

    res = ray.cluster_resources()
    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    return f"cluster: {nodes} node(s), {res.get('CPU', 0):g} CPUs, {res.get('GPU', 0):g} GPUs"


def _write_nodes(path: Path, probed: list[dict]) -> None:
    """Where every role runs (Ray node id and address), from the storage probes: ``nodes.json``."""
    import ray

    nodes = {"driver": {"node_id": ray.get_runtime_context().get_node_id(), "ip": ray.util.get_node_ip_address()}}
    nodes |= {p["label"]: {"node_id": p["node_id"], "ip": p["ip"], "host": p["host"]} for p in probed}
    path.write_text(json.dumps(nodes, indent=2))
    log.info("roles on %d Ray node(s): %s", len({n["node_id"] for n in nodes.values()}), path)


def _log_trained(path: Path, step: int, rollouts: list[Rollout]) -> None:
    """``trained.jsonl``: per step, the rollouts the learner trained on, counted per prompt uid (an audit that
    no rollout was lost or trained twice when engines fail, join or leave)."""
    counts: dict[str, int] = {}
    for r in rollouts:
        counts[r.prompt.uid] = counts.get(r.prompt.uid, 0) + 1
    with path.open("a") as f:
        f.write(json.dumps({"step": step, "rollouts": len(rollouts), "groups": counts}) + "\n")


def _version_metrics(rollouts: list[Rollout], version: int) -> dict[str, float]:
    """How far behind the policy being updated (``version``) the rollouts were generated: staleness from each
    rollout's oldest version, and the share whose generation spanned a weight update."""
    if not rollouts:
        return {}
    stale = [version - r.weight_version for r in rollouts]
    mixed = [r.weight_version_last is not None and r.weight_version_last != r.weight_version for r in rollouts]
    return {
        "rollout/staleness_mean": sum(stale) / len(stale),
        "rollout/staleness_max": float(max(stale)),
        "rollout/mixed_version_frac": sum(mixed) / len(mixed),
    }


def _mismatch(rollouts: list[Rollout], learner_logprobs: list, version: int) -> dict[str, float]:
    """``logprob/mismatch_mean``: mean |learner - engine| log-prob over the tokens sampled under the learner's
    own weights (version ``version`` from first to last token): nonzero only through numerics, so it checks
    that the engines run the learner's weights. Tokens of older versions differ by policy change as well;
    ``logprob/offpolicy_abs_mean`` reports them (asynchronous runs)."""
    sums = {True: [0.0, 0], False: [0.0, 0]}
    for r, lp in zip(rollouts, learner_logprobs, strict=True):
        on = r.weight_version == version and r.weight_version_last in (None, version)
        acc = sums[on]
        acc[0] += float(np.abs(np.asarray(r.logprobs, dtype=np.float64) - np.asarray(lp, dtype=np.float64)).sum())
        acc[1] += len(r.logprobs)
    out = {}
    if sums[True][1]:
        out["logprob/mismatch_mean"] = sums[True][0] / sums[True][1]
    if sums[False][1]:
        out["logprob/offpolicy_abs_mean"] = sums[False][0] / sums[False][1]
    return out


SUMMARY_KEYS = (
    "reward/grounded/overall",
    "reward/grounded/accuracy",
    "reward/grounded/box_iou",
    "reward/textual/overall",
    "reward/textual/accuracy",
    "reward/textual/consistency",
    "reward/single/overall",
)


def _window_size(n: int, window: int) -> int:
    """``window``, shrunk to half of ``n`` values (at least 1) so the first and last windows do not overlap."""
    return max(1, min(window, n // 2 or 1))


def window_means(records: list[dict], key: str, window: int) -> tuple[float, float] | None:
    """Mean of ``key`` over the first and over the last ``window`` records that have it."""
    values = [r[key] for r in records if r.get(key) is not None]
    if not values:
        return None
    w = _window_size(len(values), window)
    return sum(values[:w]) / w, sum(values[-w:]) / w


def summarize(cfg: Config, records: list[dict], window: int = 5) -> str:
    """Final summary: rewards of the first vs the last steps (window means), where metrics, checkpoints
    and the exported policy are."""
    out = Path(cfg.trainer.output_dir)
    lines = [f"ivgr-dist train: {len(records)} steps this run; metrics: {out / 'metrics.jsonl'}"]
    if not records:
        lines.append(
            f"  nothing to do: the newest checkpoint is at or past trainer.max_steps={cfg.trainer.max_steps}; "
            "raise trainer.max_steps to train further (it resumes from that checkpoint)"
        )
    if records:
        w = _window_size(len(records), window)
        first, last = records[:w], records[-w:]
        span = f"steps {first[0]['step']}-{first[-1]['step']}", f"steps {last[0]['step']}-{last[-1]['step']}"
        lines.append(f"  {'mean reward':32s} {span[0]:>14s}  {span[1]:>14s}")
        for key in SUMMARY_KEYS:
            means = window_means(records, key, w)
            if means is not None:
                lines.append(f"  {key:32s} {means[0]:14.3f}  {means[1]:14.3f}  ({means[1] - means[0]:+.3f})")
        asked = sum(r.get("judge/requests") or 0.0 for r in records)
        if asked:
            failed = sum(r.get("judge/failures") or 0.0 for r in records)
            lines.append(
                f"  judge: {asked:.0f} requests, {failed:.0f} failed ({failed / asked:.1%})"
                + ("; failed ones were masked or scored by their fallback (reward.judge.on_failure)" if failed else "")
            )
        verified = [r["sync/verified"] for r in records if "sync/verified" in r]
        lines.append(
            f"  weight version {records[-1]['weight_version']:.0f}; engines verified against the learner on "
            f"{sum(v == 1.0 for v in verified)} of {len(verified)} checks"
        )
    newest = checkpoints.latest_checkpoint(out)
    lines.append(f"  latest checkpoint: {newest.path if newest is not None else 'none'}")
    if (out / "model" / "config.json").is_file():
        lines.append(f"  policy (Hugging Face format): {out / 'model'}")
        lines.append(f"  evaluate: ivgr-dist eval --model {out / 'model'} --data {cfg.data.val_files[0]} --mode both")
    return "\n".join(lines)
