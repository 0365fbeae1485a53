"""``EngineJudge``: the judge model served by in-cluster vLLM engines (Ray actors on their own resources).

Why: a cluster that trains the policy can also host the judge, without an external endpoint and its
network faults. The engines are the same adapter the rollout pool uses
(:class:`~ivgr_dist.rollout.worker.RolloutWorker`), started from ``cfg.model`` (a model directory)
with the judge's sampling (``cfg.temperature``, ``cfg.max_tokens``, ``cfg.samples`` per request).

A request is rendered with the judge model's chat template (no images) into a
:class:`~ivgr_dist.types.Prompt` and sent with ``generate_group(prompt, n=cfg.samples, ...)``; the
answers are parsed by :mod:`~ivgr_dist.reward.judge.prompts`. Retries, deadlines, balancing across
engines (least in flight, cool-down of failing engines), fallback and counters are those of the
HTTP judge (:func:`~ivgr_dist.reward.judge.openai.run_request`).

With a ``fleet`` (a :class:`~ivgr_dist.reward.judge.fleet.JudgeFleet` actor handle: how ``make_scorer`` builds
it for a run) the judge owns no engine: every reward worker sends its requests to the one shared fleet, which
balances, health-checks and replaces the engines; ``close()`` leaves the fleet to its creator.

Lifecycle: the engines start lazily on the first ``score()`` (Ray must be initialised by then, else
``RuntimeError``: a set-up bug) and stop in ``close()``. If they cannot start, every request gets its fallback (``failed=True``) and
the error is logged; the start is not retried (it costs minutes), ``close()`` and a new judge do.
A prompt that cannot fit the engine's ``max_model_len`` with ``cfg.max_tokens`` of answer is
answered by its fallback without a call.
"""

from __future__ import annotations

import asyncio
import logging
import os

from ivgr_dist.config import EngineConfig, ModelConfig, RolloutConfig
from ivgr_dist.reward.judge.base import JudgeRequest, JudgeResult
from ivgr_dist.reward.judge.openai import Balancer, CallError, Endpoint, run_request
from ivgr_dist.reward.judge.prompts import build_messages, parser_for
from ivgr_dist.runtime.logs import actor_env
from ivgr_dist.types import Prompt

__all__ = ["EngineJudge"]

log = logging.getLogger(__name__)


def judge_engine_setup(cfg, engine_cfg: EngineConfig, use_gpus: bool) -> tuple[ModelConfig, RolloutConfig, dict]:
    """The model and rollout configs of a judge engine (a ``RolloutWorker`` serving ``cfg.model`` with the judge's
    sampling), and its actor environment: CPU engines share the node's cores, unpinned (as the rollout engines
    do). Used by :class:`EngineJudge` and the shared ``JudgeFleet``."""
    model_cfg = ModelConfig(path=cfg.model, make_tiny_if_missing=False)
    rollout_cfg = RolloutConfig(
        n=cfg.samples,
        temperature=cfg.temperature,
        top_p=1.0,
        max_response_length=cfg.max_tokens,
        num_engines=cfg.num_engines,
        engine=engine_cfg,
    )
    env: dict[str, str] = {}
    if not use_gpus:
        threads = str(max(1, (os.cpu_count() or 1) // cfg.num_engines))
        env = {"OMP_NUM_THREADS": threads, "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
    return model_cfg, rollout_cfg, env


class EngineJudge:
    """Judge over ``cfg.num_engines`` vLLM engine actors serving the model directory ``cfg.model``."""

    def __init__(
        self,
        cfg,
        engine: EngineConfig | None = None,
        num_gpus_per_engine: float | None = None,
        start_timeout_s: float = 600.0,
        cooldown_s: float = 30.0,
        fleet=None,
    ):
        self.cfg = cfg
        self.fleet = fleet
        self.engine_cfg = engine or getattr(cfg, "engine", None) or EngineConfig()
        self.num_gpus_per_engine = num_gpus_per_engine  # None: 1 when the cluster has GPUs, else 0
        self.start_timeout_s = start_timeout_s
        names = ["judge-fleet"] if fleet is not None else [f"judge-engine-{i}" for i in range(cfg.num_engines)]
        self.balancer = Balancer(names, cooldown_s=cooldown_s)
        self.actors: list = []
        self.start_error: str | None = None
        self._tokenizer = None
        self._start_lock: asyncio.Lock | None = None
        self._sem: asyncio.Semaphore | None = None
        self._loop = None

    def __repr__(self) -> str:
        return f"EngineJudge(model={self.cfg.model!r}, engines={self.cfg.num_engines}, started={bool(self.actors)})"

    def endpoint_stats(self) -> list[dict]:
        """Per-engine counters (attempts, failures, cool-downs, in flight)."""
        return self.balancer.stats()

    # ----------------------------------------------------------------------------------- start

    def _loop_state(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # asyncio primitives belong to one loop
            self._loop = loop
            self._start_lock = asyncio.Lock()
            self._sem = asyncio.Semaphore(self.cfg.concurrency)

    async def _ensure_started(self) -> bool:
        async with self._start_lock:
            if self.actors or self.start_error:
                return bool(self.actors)
            try:
                await self._start()
            except Exception as e:  # a judge that cannot start is a judge fault: fall back, do not crash
                self.start_error = f"{type(e).__name__}: {e}"
                log.error("judge engines could not start (requests get their fallback): %s", self.start_error)
                await self._kill_actors()
            return bool(self.actors)

    async def _start(self) -> None:
        import ray
        from transformers import AutoTokenizer

        from ivgr_dist.rollout.worker import RolloutWorker

        self._tokenizer = AutoTokenizer.from_pretrained(self.cfg.model)
        if self.fleet is not None:  # the shared fleet: started once, whoever asks first
            stats = await asyncio.wait_for(self.fleet.start.remote(), timeout=self.start_timeout_s)
            self.actors = [self.fleet]
            log.info("judge: using the shared fleet (%d engines serving)", stats["engines_live"])
            return
        gpus = self.num_gpus_per_engine
        if gpus is None:
            gpus = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
        model_cfg, rollout_cfg, env = judge_engine_setup(self.cfg, self.engine_cfg, bool(gpus))
        remote_cls = ray.remote(RolloutWorker)
        self.actors = [
            remote_cls.options(
                num_cpus=1,
                num_gpus=gpus,
                max_concurrency=1024,
                runtime_env={"env_vars": {**env, **actor_env(f"judge-{i}")}},
            ).remote(model_cfg, rollout_cfg, i, "ivgr_shm")
            for i in range(self.cfg.num_engines)
        ]
        infos = await asyncio.wait_for(
            asyncio.gather(*(a.start.remote() for a in self.actors)), timeout=self.start_timeout_s
        )
        log.info("judge engines started: %s", ", ".join(f"{i['start_s']:.1f}s" for i in infos))

    async def _kill_actors(self) -> None:
        import ray

        actors, self.actors = self.actors, []
        for actor in actors:
            try:
                await asyncio.wait_for(actor.shutdown.remote(), timeout=30)
            except Exception as e:  # already dead or stuck: kill it anyway
                log.debug("judge engine shutdown: %s", e)
            ray.kill(actor)

    # ----------------------------------------------------------------------------------- score

    def _prompt(self, req: JudgeRequest) -> Prompt:
        text = self._tokenizer.apply_chat_template(build_messages(req), add_generation_prompt=True, tokenize=False)
        ids = self._tokenizer(text, add_special_tokens=False)["input_ids"]
        return Prompt(
            original_idx=-1,
            stream="judge",
            prompt_text=text,
            prompt_token_ids=ids,
            num_prompt_tokens=len(ids),
            answer="",
            question_type=req.kind,
            datasource="judge",
            question=req.question,
        )

    async def score(self, requests: list[JudgeRequest]) -> list[JudgeResult]:
        for r in requests:
            parser_for(r.kind)  # unknown kinds are caller bugs: raise before any work
        if not requests:
            return []
        import ray

        if not ray.is_initialized():  # a set-up bug, not a judge fault
            raise RuntimeError("EngineJudge needs an initialised Ray (ray.init) before the first score()")
        self._loop_state()
        if not await self._ensure_started():
            return [JudgeResult(score=r.fallback, failed=True) for r in requests]
        return list(await asyncio.gather(*(self._one(r) for r in requests)))

    async def _one(self, req: JudgeRequest) -> JudgeResult:
        prompt = self._prompt(req)
        if prompt.num_prompt_tokens + self.cfg.max_tokens > self.engine_cfg.max_model_len:
            log.warning("judge %s: prompt of %d tokens does not fit", req.request_id, prompt.num_prompt_tokens)
            return JudgeResult(score=req.fallback, failed=True)

        async def call(ep: Endpoint, res: JudgeResult) -> list[str]:
            import ray

            res.calls += 1
            if self.fleet is not None:
                try:
                    return await self.fleet.generate.remote(
                        prompt, self.cfg.samples, self.cfg.temperature, self.cfg.max_tokens
                    )
                except ray.exceptions.RayError as e:
                    raise CallError(f"{ep.name}: {type(e).__name__}: {str(getattr(e, 'cause', e))[:200]}") from None
            ref = self.actors[ep.index].generate_group.remote(
                prompt, n=self.cfg.samples, temperature=self.cfg.temperature, max_tokens=self.cfg.max_tokens
            )
            try:
                rollouts = await ref
            except asyncio.CancelledError:  # our deadline: stop the engine's work too
                ray.cancel(ref)
                raise
            except ray.exceptions.RayError as e:
                raise CallError(f"{ep.name}: {type(e).__name__}") from None
            return [r.response_text for r in rollouts]

        async with self._sem:
            return await run_request(req, self.cfg, self.balancer, call)

    async def close(self) -> None:
        if self.fleet is not None:
            self.actors = []  # the fleet belongs to whoever created it (make_scorer's owner)
            return
        if self.actors:
            await self._kill_actors()
