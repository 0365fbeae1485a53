"""The learner group: ``learner.num_ranks`` :class:`~ivgr_dist.learner.worker.LearnerWorker` actors.

The driver holds one :class:`LearnerGroup` and calls its explicit methods; each fans the call out
to every rank (all ranks must take part: FSDP's collectives), waits with a timeout, and returns one
answer. An error on any rank is raised at once with the rank number and the method; the group is
then unusable (the other ranks may be stuck in a collective) and should be shut down.

Placement: one bundle per rank (``cpus_per_rank`` CPUs, 1 GPU per rank when the cluster has GPUs
unless ``gpus_per_rank`` says otherwise) in one PACK placement group, so ranks share a node where
they fit (rollout engines have placement groups of their own: ``ivgr_dist.runtime.placement``). Rendezvous:
rank 0's actor picks its node address and a free port; every rank then joins the process group at
that address.

A step's data moves once: :meth:`load_batch` places the step's
:class:`~ivgr_dist.learner.step_data.StepBatch` on the ranks (per mini-batch, whole records to the
lightest rank by tokens, so a record's image reaches one rank), and every pass of the step
(:meth:`compute_logprobs` for the old and the reference log-probs, one :meth:`train_step` per
mini-batch) runs on what the ranks hold; only log-probs (float32 arrays) and metrics come back.
The loss does not need records kept together (the worker divides by the GLOBAL token count); it
saves bytes and image encoding. Uneven shards need no padding: the workers agree on the
micro-batch count themselves and run masked-out dummy micro-batches, so any split works, empty
shards included.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ivgr_dist.config import AlgorithmConfig, LearnerConfig, ModelConfig
from ivgr_dist.learner.step_data import StepBatch
from ivgr_dist.learner.worker import LearnerWorker
from ivgr_dist.runtime.logs import actor_env

__all__ = ["LearnerGroup"]


class LearnerGroup:
    """Ray actors of the learner ranks, created, placed and joined into one process group."""

    def __init__(
        self,
        model_cfg: ModelConfig,
        learner_cfg: LearnerConfig,
        algo_cfg: AlgorithmConfig,
        total_steps: int,
        timeout_s: float = 1800.0,
        worker_cls: type = LearnerWorker,
        storage=None,
    ):
        """Reserve the ranks' placement group, check there that every rank's node sees the shared storage
        (``storage``: an ``ivgr_dist.runtime.storage.StorageProbe``, when given), start one ``worker_cls`` actor per rank
        (tests pass a stand-in) and join them into one process group."""
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from ivgr_dist.runtime.placement import learner_bundles, reserve

        self.num_ranks = n = learner_cfg.num_ranks
        self.timeout_s = timeout_s
        bundles = learner_bundles(learner_cfg, ray.cluster_resources().get("GPU", 0) > 0)
        bundle = {k: v for k, v in bundles[0].items() if k in ("CPU", "GPU")}
        gpus, cpus = bundle.get("GPU", 0), learner_cfg.cpus_per_rank
        what = f"learner group ({n} ranks)"
        self._pg = reserve(bundles, "PACK", what, learner_cfg.placement_timeout_s)
        if storage is not None:
            try:
                storage.probe([(f"learner rank {r}", self._pg, r) for r in range(n)])
            except BaseException:
                ray.util.remove_placement_group(self._pg)
                raise
        threads = str(max(1, cpus))
        env = {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
        actor_cls = ray.remote(worker_cls)

        def start_rank(r: int):
            return actor_cls.options(
                num_cpus=bundle.get("CPU", 0),
                num_gpus=gpus,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=self._pg, placement_group_bundle_index=r
                ),
                runtime_env={"env_vars": {**env, **actor_env(f"learner-{r}")}},
            ).remote(model_cfg, learner_cfg, algo_cfg, r, n, total_steps)

        self.actors = [start_rank(r) for r in range(n)]
        self.failed_starts = 0
        try:
            self._await_actors(start_rank)
            addr, port = self._gather([self.actors[0].master_address.remote()], "master_address")[0]
            self._gather([a.init_distributed.remote(addr, port) for a in self.actors], "init_distributed")
        except BaseException:
            self.shutdown()
            raise

    def _await_actors(self, start_rank) -> None:
        """Wait until every rank's actor exists (:func:`~ivgr_dist.runtime.placement.await_actor_starts`): a rank whose
        worker died before its actor ran is started again in its bundle, counted in ``failed_starts``; a rank
        whose ``__init__`` raised fails the start, naming the rank."""
        import ray

        from ivgr_dist.runtime.placement import await_actor_starts

        def restart(r: int) -> None:
            ray.kill(self.actors[r], no_restart=True)
            self.actors[r] = start_rank(r)

        def on_retry(r: int, why: str) -> None:
            self.failed_starts += 1

        await_actor_starts(
            "learner rank",
            range(self.num_ranks),
            lambda r: self.actors[r].__ray_ready__.remote(),
            restart,
            lambda r, _: None,
            on_retry,
            self.timeout_s,
        )

    # ------------------------------------------------------------------------------------ calls

    def _gather(self, refs: list, what: str, ranks: Sequence[int] | None = None) -> list:
        """Results of ``refs`` (one per rank), failing fast with the rank number of the first error."""
        import ray

        ranks = list(range(len(refs))) if ranks is None else list(ranks)
        rank_of = {ref: r for ref, r in zip(refs, ranks, strict=True)}
        results: dict[int, object] = {}
        pending = list(refs)
        deadline = time.monotonic() + self.timeout_s
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                late = sorted(rank_of[p] for p in pending)
                raise TimeoutError(f"learner {what}: rank(s) {late} did not answer within {self.timeout_s}s")
            done, pending = ray.wait(pending, num_returns=1, timeout=left)
            for ref in done:
                try:
                    results[rank_of[ref]] = ray.get(ref, timeout=max(1.0, left))
                except Exception as exc:
                    raise RuntimeError(f"learner rank {rank_of[ref]} failed in {what}: {exc}") from exc
        return [results[r] for r in ranks]

    def load_batch(self, batch: StepBatch, mini_batches: Sequence[Sequence[int]] | None = None) -> dict[str, float]:
        """Place a step's samples on the ranks ONCE for all its passes (:meth:`compute_logprobs`, every
        :meth:`train_step`): ``step_data.place`` gives each rank whole records per mini-batch, and each rank
        receives only the prompts and images of its samples (encoded there). ``mini_batches``: the sample
        indices of each update (default: one mini-batch of everything). Returns ``learner/input_bytes`` (array
        bytes sent to the ranks) and ``time/learner_load_s``."""
        from ivgr_dist.learner.step_data import place

        t0 = time.perf_counter()
        mini_batches = [list(range(len(batch)))] if mini_batches is None else [list(m) for m in mini_batches]
        per_rank = place(batch, mini_batches, self.num_ranks)
        self._order = [[i for m in ranks for i in m] for ranks in per_rank]
        self._count = len(batch)
        shards = [batch.select(order) for order in self._order]
        refs = [
            a.load_batch.remote(shard, [len(m) for m in ranks])
            for a, shard, ranks in zip(self.actors, shards, per_rank, strict=True)
        ]
        done = self._gather(refs, "load_batch")
        return {
            "learner/input_bytes": float(sum(s.nbytes() for s in shards)),
            "learner/encode_s_max": max(d["encode_s"] for d in done),
            "time/learner_load_s": time.perf_counter() - t0,
        }

    def compute_logprobs(self, which: str = "policy", temperature: float = 1.0) -> list[np.ndarray]:
        """Response-token log-probs of every loaded sample under ``which``, input order (the ranks also keep
        them as the samples' old or reference log-probs for the updates)."""
        refs = [a.compute_logprobs.remote(which, temperature) for a in self.actors]
        return self._in_order(self._gather(refs, f"compute_logprobs({which})"))

    def score(self, batch: StepBatch, which: str = "policy", temperature: float = 1.0) -> list[np.ndarray]:
        """Log-probs of a batch outside the step (the sync probe), split over the ranks; the loaded step stays."""
        from ivgr_dist.learner.step_data import place

        per_rank = place(batch, [list(range(len(batch)))], self.num_ranks)
        refs = [
            a.score.remote(batch.select(r[0]), which, temperature) for a, r in zip(self.actors, per_rank, strict=True)
        ]
        out: list = [None] * len(batch)
        for ranks, values in zip(per_rank, self._gather(refs, f"score({which})"), strict=True):
            for i, v in zip(ranks[0], values, strict=True):
                out[i] = v
        return out

    def _in_order(self, per_rank: list[list]) -> list:
        out: list = [None] * self._count
        for order, values in zip(self._order, per_rank, strict=True):
            for i, v in zip(order, values, strict=True):
                out[i] = v
        return out

    def train_step(self, mini_batch: int = 0, temperature: float = 1.0, objective: str = "grpo") -> dict[str, float]:
        """One optimizer update over mini-batch ``mini_batch`` of the loaded step (``objective``: ``grpo`` or ``sft``).

        The workers all-reduce their metric sums themselves (losses carry the global denominator,
        fractions are token-weighted), so every rank returns the same global metrics and rank 0's
        are returned.
        """
        refs = [a.train_step.remote(mini_batch, temperature, objective) for a in self.actors]
        return dict(self._gather(refs, "train_step")[0])

    # ------------------------------------------------------------------ weight sync (ivgr_dist.sync)

    def push_weights(self, version: int | None, plan: dict[str, Any]) -> list[dict[str, Any]]:
        """Every rank runs its part of a push (``LearnerWorker.push_weights``: the sender of ``plan["backend"]``);
        returns every rank's answer, rank order."""
        return self.collect(self.push_weights_async(version, plan), f"push_weights(version={version})")

    def push_weights_async(self, version: int | None, plan: dict[str, Any]) -> list:
        """:meth:`push_weights` started on every rank; returns their refs, rank order (:meth:`collect` them), while
        the driver drives the engines' side of the transfer."""
        return [a.push_weights.remote(version, plan) for a in self.actors]

    def wait(self, refs: list, timeout_s: float) -> None:
        """Wait until every ref has ended, at most ``timeout_s`` (raises nothing: :meth:`collect` tells)."""
        import ray

        ray.wait(refs, num_returns=len(refs), timeout=timeout_s)

    def collect(self, refs: list, what: str) -> list:
        """The results of refs made by the ``*_async`` calls, rank order (all of them must succeed)."""
        return self._gather(refs, what)

    def node_ids(self) -> list[str]:
        """The Ray node of each rank, rank order."""
        return self._gather([a.node_id.remote() for a in self.actors], "node_id")

    def master_address(self) -> tuple[str, int]:
        """Rank 0's node address and a free port there (for a rendezvous rank 0 hosts)."""
        return self._gather([self.actors[0].master_address.remote()], "master_address")[0]

    def state_checksum(self) -> dict[str, float]:
        """Float64 sum of every full parameter, by checkpoint name."""
        return self._gather([a.state_checksum.remote() for a in self.actors], "state_checksum")[0]

    def save_checkpoint(self, path: str | Path) -> list[dict]:
        """Every rank writes its shards; returns each rank's confirmation (node, files and sizes), rank order."""
        return self._gather([a.save_checkpoint.remote(str(path)) for a in self.actors], "save_checkpoint")

    def load_checkpoint(self, path: str | Path) -> None:
        self._gather([a.load_checkpoint.remote(str(path)) for a in self.actors], "load_checkpoint")

    def export_hf(self, path: str | Path, dtype: str | None = None) -> Path:
        """A Hugging Face model directory at ``path``, complete or absent (rank 0 writes a temporary sibling
        and swaps it in itself; see ``LearnerWorker.export_hf``)."""
        self._gather([a.export_hf.remote(str(path), dtype) for a in self.actors], "export_hf")
        return Path(path)

    def num_params(self) -> int:
        return self._gather([self.actors[0].num_params.remote()], "num_params")[0]

    def shutdown(self) -> None:
        """Kill the actors and free the placement group (safe to call twice)."""
        import ray

        for a in getattr(self, "actors", []):
            ray.kill(a, no_restart=True)
        self.actors = []
        if getattr(self, "_pg", None) is not None:
            ray.util.remove_placement_group(self._pg)
            self._pg = None
