"""One rank of the FSDP2 learner: policy + frozen reference policy, log-probs, GRPO updates, state.

:class:`LearnerWorker` is a plain class: :class:`~ivgr_dist.learner.group.LearnerGroup` wraps it in
``ray.remote`` (one actor per rank), and tests or ``torchrun`` scripts use it directly. The step is
split into small named calls: :meth:`load_batch`, :meth:`compute_logprobs`, :meth:`train_step`, :meth:`push_weights`
(weight sync, by the backend's sender: ``ivgr_dist.sync``), :meth:`save_checkpoint` / :meth:`load_checkpoint`, :meth:`export_hf`.

Sharding: FSDP2 ``fully_shard`` on every decoder layer and vision block (the model's
``_no_split_modules``) and on the root. On GPU (precision ``bf16``) parameters are fp32 masters
computed in bf16 with fp32 gradient reduction; on CPU everything is fp32 (gloo).

Collectives: every FSDP forward all-gathers parameters, so all ranks must run the same number of
forwards through the same sub-modules. Each call first agrees on the number of micro-batches
(all-reduce MAX) and ranks with fewer run dummy micro-batches whose loss is masked out; with more
than one rank an image-free micro-batch gets one masked-out dummy image so the vision tower runs
everywhere (:func:`~ivgr_dist.learner.batch.append_dummy_image`).

Loss scaling: the token-mean loss of an update uses ``denom = global response tokens / world size``
on every rank; FSDP averages gradients over ranks, so the result is the exact token mean over the
whole global batch whatever the split (docs/algorithm.md: token-mean aggregation).

Loading: with ``learner.sharded_init`` (default) each rank builds the model on the meta device, shards
it and reads only its own rows of every tensor from the safetensors files (``ivgr_dist.learner.loading``),
so no rank holds the full model. Data: a step's samples are placed on the ranks once
(:meth:`load_batch`, images encoded here once per image) and every pass reads them there; micro-batches
are packed rows without padding (``learner.pack_sequences``; see ``ivgr_dist.learner.batch``).

Departures from the recipe (verl): weight decay applies to all parameters, as in the recipe; the warm-up is linear, then the learning rate stays constant
(``learner.lr_schedule=cosine`` decays it instead); a
step whose gradient norm is not finite is skipped (reported as ``learner/skipped_step``).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil
import socket
import time
from collections.abc import Iterator, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from ivgr_dist.config import AlgorithmConfig, LearnerConfig, ModelConfig
from ivgr_dist.learner.batch import (
    LearnerSample,
    SampleEncoder,
    append_dummy_image,
    collate,
    make_micro_batches,
    pack,
    plan_packs,
    register_packed_sdpa,
    response_fields,
)
from ivgr_dist.learner.grpo import GRPOLossConfig, grpo_loss, logprobs_from_logits, token_mean, truncated_is_weights
from ivgr_dist.learner.step_data import StepBatch
from ivgr_dist.learner.update_metrics import UpdateSums, loss_metrics
from ivgr_dist.models.naming import checkpoint_names
from ivgr_dist.sync import make_sender
from ivgr_dist.sync.base import WeightSender
from ivgr_dist.sync.buckets import TensorMeta, plan_buckets

__all__ = ["LearnerWorker", "lr_factor", "pick_master_address", "resolve_attn_implementation", "warmup_factor"]


def warmup_factor(step: int, warmup_steps: int) -> float:
    """Learning-rate factor of optimizer step ``step`` (0-based): linear warm-up, then 1."""
    return 1.0 if warmup_steps <= 0 else min(1.0, (step + 1) / warmup_steps)


def lr_factor(
    step: int, warmup_steps: int, total_steps: int, schedule: str = "constant", min_ratio: float = 0.0
) -> float:
    """Learning-rate factor of optimizer step ``step`` (0-based): linear warm-up, then ``constant`` (1) or
    ``cosine`` decay from 1 to ``min_ratio`` at ``total_steps``."""
    if step < warmup_steps or schedule == "constant":
        return warmup_factor(step, warmup_steps)
    if schedule != "cosine":
        raise ValueError(f"schedule={schedule!r}: must be 'constant' or 'cosine'")
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def resolve_attn_implementation(choice: str, cuda: bool) -> str:
    """``learner.attn_implementation`` -> what transformers gets: ``auto`` is FlashAttention-2 where the
    ``flash_attn`` package imports on a CUDA rank, else SDPA; an explicit ``flash_attention_2`` that cannot
    run fails here, naming why, rather than inside the first forward."""
    import importlib.util

    have_flash = importlib.util.find_spec("flash_attn") is not None
    if choice == "auto":
        return "flash_attention_2" if (cuda and have_flash) else "sdpa"
    if choice == "flash_attention_2" and not (cuda and have_flash):
        why = (
            "no CUDA device on this rank"
            if not cuda
            else "the flash_attn package is not installed (pip install -e '.[flash]')"
        )
        raise ValueError(f"learner.attn_implementation=flash_attention_2: {why}")
    if choice not in ("sdpa", "flash_attention_2"):
        raise ValueError(f"learner.attn_implementation={choice!r}: must be auto, sdpa or flash_attention_2")
    return choice


def pick_master_address() -> tuple[str, int]:
    """This node's address (Ray's node IP inside Ray, else 127.0.0.1) and a TCP port currently free on it."""
    from ivgr_dist.runtime.rendezvous import free_port, node_address

    addr = node_address()
    return addr, free_port(addr)


class LearnerWorker:
    """One learner rank. Construct, then :meth:`init_distributed` on every rank together."""

    def __init__(
        self,
        model_cfg: ModelConfig,
        learner_cfg: LearnerConfig,
        algo_cfg: AlgorithmConfig,
        rank: int,
        world_size: int,
        total_steps: int,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
        from ivgr_dist.runtime.logs import redirect_actor_output
        from ivgr_dist.runtime.placement import pin_to_cores

        redirect_actor_output(f"learner-{rank}")

        pin_to_cores(list(learner_cfg.cpu_affinity), f"learner rank {rank}")
        self.model_cfg, self.cfg, self.algo_cfg = model_cfg, learner_cfg, algo_cfg
        self.rank, self.world_size, self.total_steps = rank, world_size, max(0, int(total_steps))
        self.loss_cfg = GRPOLossConfig(
            clip_low=algo_cfg.clip_low, clip_high=algo_cfg.clip_high, kl_coef=algo_cfg.kl_coef, eps=algo_cfg.adv_eps
        )
        self.step = 0  # optimizer updates done
        self.policy = self.reference = self.optimizer = self.scheduler = None
        self._sender: WeightSender | None = None  # of the last push's backend (push_weights)
        self._sender_name: str | None = None

    # ------------------------------------------------------------------------------------ set-up

    def node_id(self) -> str:
        """The Ray node this rank runs on ("" outside Ray)."""
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""

    def master_address(self) -> tuple[str, int]:
        """Address and free port for the rendezvous (called on rank 0's actor)."""
        return pick_master_address()

    def init_distributed(
        self, master_addr: str | None = None, master_port: int | None = None, timeout_s: float = 1800.0
    ):
        """Join the process group (a TCP store at ``master_addr:master_port`` that rank 0 hosts, or ``env://``
        when not given), then load and shard the policy (and the reference policy when ``kl_coef > 0``) and
        build the optimizer and warm-up schedule."""
        from torch.distributed.device_mesh import init_device_mesh

        backend = self.cfg.backend
        if backend == "auto":
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            local = int(os.environ.get("LOCAL_RANK", "0")) % max(1, torch.cuda.device_count())
            torch.cuda.set_device(local)
            self._device = torch.device("cuda", local)
        else:
            self._device = torch.device("cpu")
        timeout = timedelta(seconds=timeout_s)
        if (
            master_addr
        ):  # rank 0's store listens on master_addr only (ivgr_dist.runtime.rendezvous), not every interface
            from ivgr_dist.runtime.rendezvous import open_store

            store = open_store(master_addr, int(master_port), self.world_size, self.rank == 0, timeout)
            dist.init_process_group(backend, store=store, rank=self.rank, world_size=self.world_size, timeout=timeout)
        else:
            dist.init_process_group(backend, init_method="env://", rank=self.rank, world_size=self.world_size,
                                    timeout=timeout)  # fmt: skip
        self.mesh = init_device_mesh(self._device.type, (self.world_size,))
        precision = self.cfg.precision
        if precision == "auto":
            precision = "bf16" if self._device.type == "cuda" else "fp32"
        self.precision = precision
        self.attn_implementation = resolve_attn_implementation(
            self.cfg.attn_implementation, self._device.type == "cuda"
        )
        if self.cfg.pack_sequences and self.attn_implementation == "sdpa":
            self.attn_implementation = register_packed_sdpa()  # SDPA within each packed sequence
        self._encoder = SampleEncoder(self.model_cfg.path)

        self.policy = self._load_sharded(trainable=True)
        if self.loss_cfg.uses_reference:
            self.reference = self._load_sharded(trainable=False)
        hf = self.policy.config
        pad = getattr(getattr(hf, "text_config", hf), "pad_token_id", None)
        self._pad_id = 0 if pad is None else int(pad)  # any id works: padded positions are masked
        self._image_token_id = getattr(hf, "image_token_id", None)
        vc = getattr(hf, "vision_config", None)
        self._vision = None
        if vc is not None and self._image_token_id is not None:
            patch_dim = getattr(vc, "in_channels", 3) * vc.temporal_patch_size * vc.patch_size**2
            self._vision = (patch_dim, vc.spatial_merge_size)
        self._tied = bool(getattr(hf, "tie_word_embeddings", False))
        # Checkpoint names for the engines and the export, as transformers saves this architecture.
        self._ckpt_names = checkpoint_names(self.policy)

        self.optimizer = torch.optim.AdamW(
            self.policy.parameters(),
            lr=self.cfg.lr,
            betas=tuple(self.cfg.betas),
            weight_decay=self.cfg.weight_decay,
            foreach=True,
        )
        warmup = math.ceil(self.cfg.warmup_ratio * self.total_steps)
        schedule, floor, total = self.cfg.lr_schedule, self.cfg.min_lr_ratio, self.total_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, warmup, total, schedule, floor)
        )

    def _load_sharded(self, trainable: bool):
        """The policy (``trainable``) or the frozen reference, FSDP2-sharded. ``learner.sharded_init``: each rank
        reads only its own rows from the checkpoint (``ivgr_dist.learner.loading``); otherwise every rank loads
        the full model through transformers first and then shards it."""
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        from transformers import AutoConfig, AutoModelForImageTextToText

        bf16 = self.precision == "bf16"
        # The frozen reference has no optimizer: keep it in the compute dtype directly.
        dtype = torch.bfloat16 if (bf16 and not trainable) else torch.float32
        mp = MixedPrecisionPolicy()
        if bf16 and trainable:
            mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        path, remote = self.model_cfg.path, self.model_cfg.trust_remote_code

        def wrap(model) -> None:
            model.config.use_cache = False
            if trainable and self.cfg.gradient_checkpointing:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            units = set(getattr(model, "_no_split_modules", None) or [])
            for module in [m for m in model.modules() if type(m).__name__ in units]:
                fully_shard(module, mesh=self.mesh, mp_policy=mp)
            fully_shard(model, mesh=self.mesh, mp_policy=mp)

        if self.cfg.sharded_init:
            from ivgr_dist.learner.loading import load_sharded

            config = AutoConfig.from_pretrained(path, trust_remote_code=remote)

            def build():
                return AutoModelForImageTextToText.from_config(
                    config, dtype=dtype, attn_implementation=self.attn_implementation, trust_remote_code=remote
                )

            model = load_sharded(path, build, wrap, self._device)
        else:
            model = AutoModelForImageTextToText.from_pretrained(
                path, dtype=dtype, attn_implementation=self.attn_implementation, trust_remote_code=remote
            )
            wrap(model)
        if trainable:
            model.train()
        else:
            model.eval().requires_grad_(False)
        return model

    def close(self) -> None:
        """Leave the process group (lets a process host another worker afterwards, e.g. in tests)."""
        self.policy = self.reference = self.optimizer = self.scheduler = None
        if self._sender is not None:
            self._sender.close()
            self._sender = self._sender_name = None
        if dist.is_initialized():
            dist.destroy_process_group()

    def num_params(self) -> int:
        """Parameters of the full (unsharded) policy."""
        return sum(p.numel() for p in self.policy.parameters())

    def device(self) -> str:
        return str(self._device)

    # ----------------------------------------------------------------------------------- helpers

    def _all_reduce(self, values: Sequence[float], op=dist.ReduceOp.SUM) -> list[float]:
        t = torch.tensor(list(values), dtype=torch.float64, device=self._device)
        dist.all_reduce(t, op=op)
        return t.tolist()

    def _dummy_sample(self) -> LearnerSample:
        """Two pad tokens, no response: runs the model's collectives, adds nothing to any result."""
        return LearnerSample([self._pad_id] * 2, 2, None, None, 0.0, old_logprobs=[], ref_logprobs=[])

    def _plan(self, samples: Sequence[LearnerSample]) -> list[list[int] | None]:
        """This rank's micro-batches (sample indices), then ``None`` (a dummy micro-batch) up to the
        count every rank agrees on."""
        if self.cfg.pack_sequences:
            idx = plan_packs([s.num_tokens for s in samples], self.cfg.micro_batch_tokens)
        else:
            idx = make_micro_batches(samples, self.cfg.micro_batch_tokens)
        n = int(self._all_reduce([len(idx)], dist.ReduceOp.MAX)[0])
        return idx + [None] * (n - len(idx))

    def _positions(self, sample: LearnerSample) -> Tensor:
        """``[3, L]`` rotary positions of a sample as the model computes them for it alone (3-D for image
        tokens). The prompt's are computed once and shared by its samples (``prompt_cache``); response tokens
        continue the prompt's last text position."""
        rope = getattr(getattr(self.policy, "model", None), "get_rope_index", None)
        if rope is None or sample.pixel_values is None:
            return torch.arange(sample.num_tokens, dtype=torch.long)[None].expand(3, -1)
        cache = sample.prompt_cache if sample.prompt_cache is not None else {}
        prompt = cache.get("positions")
        if prompt is None:
            ids = torch.as_tensor(sample.input_ids[: sample.prompt_len], dtype=torch.long)[None]
            kind = (ids == self._image_token_id).long()
            prompt = cache["positions"] = rope(ids, kind, sample.image_grid_thw)[0][:, 0]
        tail = prompt[:, -1:] + torch.arange(1, sample.response_len + 1, dtype=torch.long)[None]
        return torch.cat([prompt, tail], dim=1)

    def _forward(self, model, samples: Sequence[LearnerSample], temperature: float) -> tuple[Tensor, dict]:
        """Log-probs ``[1, K]`` of every response token of ``samples`` (flat, sample order), and the
        matching :func:`~ivgr_dist.learner.batch.response_fields` plus ``slots`` / ``real`` token counts.

        Packed (``learner.pack_sequences``): one row, no padding, logits only at the kept positions.
        Padded: a rectangle (:func:`collate`), logits from the first response column on, then the response
        positions gathered. Either way prompt positions, often mostly image tokens, never reach the
        vocabulary projection.
        """
        dev = self._device
        fields = response_fields(samples)
        labels = fields["labels"].to(dev)
        dummy = (self._image_token_id, *self._vision) if self.world_size > 1 and self._vision else None
        if self.cfg.pack_sequences:
            p = pack(samples, self._positions, dummy)
            kwargs = {"input_ids": p["input_ids"].to(dev), "position_ids": p["position_ids"].to(dev)}
            if p["pixel_values"] is not None:
                kwargs["pixel_values"] = p["pixel_values"].to(dev)
                kwargs["image_grid_thw"] = p["image_grid_thw"].to(dev)
            logits = model(**kwargs, use_cache=False, logits_to_keep=p["keep"].to(dev)).logits
            fields.update(slots=p["slots"], real=p["real"])
            return logprobs_from_logits(logits, labels, temperature), fields
        batch = collate(samples, self._pad_id, self._image_token_id)
        if dummy is not None and batch["pixel_values"] is None:
            batch = append_dummy_image(batch, self._pad_id, self._image_token_id, *self._vision)
        t = batch["input_ids"].shape[1]
        s = max(0, min(batch["prompt_lens"]) - 1)
        kwargs = {k: batch[k].to(dev) for k in ("input_ids", "attention_mask", "mm_token_type_ids") if k in batch}
        if batch["pixel_values"] is not None:
            kwargs["pixel_values"] = batch["pixel_values"].to(dev)
            kwargs["image_grid_thw"] = batch["image_grid_thw"].to(dev)
        logits = model(**kwargs, use_cache=False, logits_to_keep=t - s).logits[:, :-1]
        rows = [(r, x.prompt_len - 1 - s, x.num_tokens - 1 - s) for r, x in enumerate(samples) if x.response_len]
        keep = torch.cat([logits[r, a:b] for r, a, b in rows])[None] if rows else logits[:1, -1:]
        fields.update(slots=t * len(samples), real=sum(x.num_tokens for x in samples))
        return logprobs_from_logits(keep, labels, temperature), fields

    def _model(self, which: str):
        if which == "policy":
            return self.policy
        if which == "reference":
            if self.reference is None:
                raise ValueError(
                    f"no reference policy: algorithm.kl_coef={self.algo_cfg.kl_coef} (it is loaded if > 0)"
                )
            return self.reference
        raise ValueError(f"which={which!r} must be 'policy' or 'reference'")

    # ----------------------------------------------------------------------------- the step's data

    def load_batch(self, batch: StepBatch, sizes: Sequence[int] | None = None) -> dict[str, float]:
        """Keep this rank's share of a step (``LearnerGroup.load_batch`` placed it) until the next call: images
        are encoded once here and shared by the samples; every pass of the step (log-probs, updates) reads it.
        ``sizes``: how many of its samples, in order, belong to each mini-batch (default: one)."""
        t0 = time.perf_counter()
        self.load_samples(self._encoder.samples(batch), sizes)
        return {"encode_s": time.perf_counter() - t0, "samples": float(len(batch))}

    def load_samples(self, samples: Sequence[LearnerSample], sizes: Sequence[int] | None = None) -> None:
        """:meth:`load_batch` for samples already built (in-process callers and tests)."""
        sizes = [len(samples)] if sizes is None else list(sizes)
        if sum(sizes) != len(samples):
            raise ValueError(f"mini-batch sizes {sizes} do not add up to {len(samples)} samples")
        self._samples = list(samples)
        self._mini = [list(range(a - n, a)) for a, n in zip(itertools.accumulate(sizes), sizes, strict=True)]

    def _loaded(self) -> list[LearnerSample]:
        if getattr(self, "_samples", None) is None:
            raise RuntimeError(f"rank {self.rank}: no step data; call load_batch first")
        return self._samples

    # --------------------------------------------------------------------------------- log-probs

    @torch.no_grad()
    def compute_logprobs(self, which: str = "policy", temperature: float = 1.0) -> list[np.ndarray]:
        """Log-prob of every response token of the loaded samples under ``which`` (``policy`` | ``reference``)
        at the sampling ``temperature``, one float32 array per sample; kept on the samples as their old
        (``policy``) or reference log-probs for the updates. Collective: every rank must call it."""
        samples = self._loaded()
        out = self.logprobs(samples, which, temperature)
        name = "old_logprobs" if which == "policy" else "ref_logprobs"
        for s, values in zip(samples, out, strict=True):
            setattr(s, name, values)
        return out

    @torch.no_grad()
    def score(self, batch: StepBatch, which: str = "policy", temperature: float = 1.0) -> list[np.ndarray]:
        """Log-probs of a batch that is not the step's (e.g. the sync probe); the loaded step is untouched."""
        return self.logprobs(self._encoder.samples(batch), which, temperature)

    @torch.no_grad()
    def logprobs(self, samples: Sequence[LearnerSample], which: str, temperature: float) -> list[np.ndarray]:
        """Response-token log-probs of ``samples`` under ``which`` (collective), one float32 array each."""
        model = self._model(which)
        result: list[np.ndarray] = [np.zeros(0, dtype=np.float32) for _ in samples]
        for idx in self._plan(samples):
            mb = [samples[i] for i in idx] if idx is not None else [self._dummy_sample()]
            logp, fields = self._forward(model, mb, temperature)
            lens = fields["response_lens"]
            if idx is not None and sum(lens):
                flat = logp[0].float().cpu().numpy()
                for i, piece in zip(idx, np.split(flat, np.cumsum(lens)[:-1]), strict=True):
                    result[i] = piece.copy()
        model.reshard()  # the FSDP root stays unsharded after a forward without backward
        return result

    # ------------------------------------------------------------------------------------ update

    def train_step(self, mini_batch: int = 0, temperature: float = 1.0, objective: str = "grpo") -> dict[str, float]:
        """One optimizer update on this rank's share of mini-batch ``mini_batch`` of the loaded step."""
        samples = self._loaded()
        return self.update([samples[i] for i in self._mini[mini_batch]], temperature, objective)

    def update(
        self, samples: Sequence[LearnerSample], temperature: float = 1.0, objective: str = "grpo"
    ) -> dict[str, float]:
        """One optimizer update on this rank's share of the global batch (collective).

        ``objective="grpo"``: the clipped GRPO loss; missing ``old_logprobs`` mean on-policy (ratio 1:
        the current log-probs, detached). ``objective="sft"``: the token-mean negative log-likelihood
        of the response tokens (the supervised warm start; advantages and log-probs are ignored).
        Both share micro-batching, the global token denominator, clipping and the optimizer.
        Returns global metrics (identical on every rank).
        """
        if objective not in ("grpo", "sft"):
            raise ValueError(f"objective={objective!r}: must be 'grpo' or 'sft'")
        sft = objective == "sft"
        if not sft and self.loss_cfg.uses_reference and any(s.ref_logprobs is None for s in samples):
            raise ValueError(
                f"kl_coef={self.loss_cfg.kl_coef} > 0 needs ref_logprobs on every sample; "
                "call compute_logprobs('reference') first"
            )
        local_tokens = sum(s.response_len for s in samples)
        global_tokens = self._all_reduce([local_tokens])[0]
        denom = max(global_tokens, 1.0) / self.world_size
        batches = self._plan(samples)
        n_dummy = sum(idx is None for idx in batches)
        self.optimizer.zero_grad(set_to_none=True)
        cap = self.algo_cfg.tis_cap
        sums = UpdateSums(self._device)  # on the device: no host sync per micro-batch
        t0 = time.perf_counter()
        for idx in batches:
            mb = [samples[i] for i in idx] if idx is not None else [self._dummy_sample()]
            logp, fields = self._forward(self.policy, mb, temperature)
            mask = fields["mask"].to(self._device)
            if sft:
                loss = -token_mean(logp, mask, denom)
                zero = torch.zeros((), device=self._device)
                m = dict.fromkeys(("pg_clipfrac", "pg_clipfrac_high", "pg_clipfrac_low", "approx_kl"), zero)
                m["pg_loss"] = m["loss"] = loss.detach()
            else:
                old = fields["old_logprobs"]
                old = logp.detach() if old is None else old.to(self._device)
                ref = fields["ref_logprobs"]
                ref = None if ref is None or not self.loss_cfg.uses_reference else ref.to(self._device)
                adv = fields["advantages"].to(self._device)
                behaviour = fields["behaviour_logprobs"]
                weights = None
                if cap > 0 and behaviour is not None:  # off-policy correction: proximal (old) over behaviour
                    weights = truncated_is_weights(old, behaviour.to(self._device), cap)
                loss, m = grpo_loss(
                    logp,
                    old,
                    ref,
                    adv,
                    mask,
                    denom=denom,
                    is_weights=weights,
                    is_cap=cap,
                    **self.loss_cfg.loss_kwargs(),
                )
                if weights is not None:
                    sums.add_is_weights(weights[mask], cap)
            loss.backward()
            sums.add_losses(m, mask.sum())
            if idx is not None:
                sums.add(slots=fields["slots"], real=fields["real"])
        if self._device.type == "cuda":
            torch.cuda.synchronize()
        fb_time = time.perf_counter() - t0
        grad_norm = self._clip_grad_norm()
        lr = self.scheduler.get_last_lr()[0]
        skipped = not math.isfinite(grad_norm)
        if skipped:
            self.optimizer.zero_grad(set_to_none=True)
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        tot = sums.all_reduce(dist.all_reduce)
        fb_time, n_dummy = self._all_reduce([fb_time, n_dummy], dist.ReduceOp.MAX)
        common = {
            "grad_norm": grad_norm,
            "lr": lr,
            "learner/tokens": tot["tokens"],
            "learner/padding_ratio": 1.0 - tot["real"] / tot["slots"] if tot["slots"] else 0.0,
            "learner/micro_batches": float(len(batches)),
            "learner/dummy_micro_batches": n_dummy,
            "learner/skipped_step": float(skipped),
            "time/learner_forward_backward_s": fb_time,
        }
        return {**loss_metrics(tot, self.world_size, sft), **common}

    def _clip_grad_norm(self) -> float:
        """Global L2 norm of the gradients before clipping; clips to ``grad_clip`` when it is > 0."""
        from torch.distributed.tensor import DTensor

        params = [p for p in self.policy.parameters() if p.grad is not None]
        if not params:
            return 0.0
        total = torch.nn.utils.get_total_norm([p.grad for p in params], norm_type=2.0, foreach=True)
        if isinstance(total, DTensor):
            total = total.full_tensor()  # sum of the shards' squared norms across ranks
        if self.cfg.grad_clip > 0 and math.isfinite(float(total)):
            torch.nn.utils.clip_grads_with_norm_(params, self.cfg.grad_clip, total, foreach=True)
        return float(total)

    # ------------------------------------------------------------------------------- full state

    def iter_full_tensors(self, dtype: torch.dtype | None = None) -> Iterator[tuple[str, Tensor | None]]:
        """``(checkpoint name, full tensor)`` of every weight, one at a time (collective).

        Every rank must drain the generator in step: gathering a shard into a full tensor is an all-gather.
        Only rank 0 gets the tensors (on this rank's device, cast to ``dtype`` when given), the other ranks
        ``None``. With one rank the tensors may share memory with the live parameters: copy them before the
        next update. Tied output embeddings are left out, as in HF checkpoints.
        """
        from torch.distributed.tensor import DTensor

        for name, tensor in self.named_weights():
            # Cast the local shard before gathering: a bf16 sync moves half the bytes of fp32 over the wire.
            local = tensor.detach().to(dtype) if dtype is not None else tensor.detach()
            full = local.full_tensor() if isinstance(local, DTensor) else local
            yield name, (full if self.rank == 0 else None)
            del full

    def named_weights(self) -> Iterator[tuple[str, Tensor]]:
        """``(checkpoint name, parameter as this rank holds it: a DTensor shard or a plain tensor)`` of every weight
        a push carries, in order (tied output embeddings left out, as in HF checkpoints); nothing gathered."""
        self.policy.reshard()
        for name, tensor in self.policy.state_dict().items():
            if not (self._tied and name == "lm_head.weight"):
                yield self._ckpt_names[name], tensor

    def weight_metadata(self, dtype: str | None = None) -> list[tuple[str, str, tuple[int, ...]]]:
        """``(checkpoint name, wire dtype name, global shape)`` of what :meth:`iter_full_tensors` yields, in
        order, without gathering anything (global shapes are known on every rank)."""
        wire = getattr(torch, dtype) if dtype else None
        out = []
        for name, tensor in self.policy.state_dict().items():
            if self._tied and name == "lm_head.weight":
                continue
            dt = wire if wire is not None else tensor.dtype
            out.append((self._ckpt_names[name], str(dt).removeprefix("torch."), tuple(tensor.shape)))
        return out

    def iter_full_state(self, bucket_bytes: int = 256 << 20, dtype: torch.dtype | None = None) -> Iterator[list]:
        """:meth:`iter_full_tensors` in buckets of about ``bucket_bytes`` (``ivgr_dist.sync.buckets.plan_buckets``'s
        cut, from global sizes: every rank cuts the same buckets); other ranks' buckets are empty lists."""
        wire = str(dtype).removeprefix("torch.") if dtype is not None else None
        metas = [TensorMeta(n, d, s) for n, d, s in self.weight_metadata(wire)]
        tensors = self.iter_full_tensors(dtype)
        for bucket in plan_buckets(metas, bucket_bytes):
            pairs = [next(tensors) for _ in bucket]
            yield [(n, t) for n, t in pairs if t is not None]

    # ------------------------------------------------------------------------------ weight sync

    def push_weights(self, version: int | None, plan: dict[str, Any]) -> dict[str, Any]:
        """This rank's part of a weight push (every rank calls it with the same ``plan``; a sender may run
        collectives among the ranks): the sender of ``plan["backend"]`` (``ivgr_dist.sync.make_sender``, made on
        first use and kept: a collective sender holds its transfer group) reads this rank's weights and sends or
        writes them as the plan says; its answer goes back to the driver's side of the backend."""
        name = plan["backend"]
        if self._sender_name != name:
            if self._sender is not None:
                self._sender.close()  # another backend now (a benchmark compares them on one learner group)
            self._sender, self._sender_name = make_sender(name), name
        return self._sender.push(self, version, plan)

    def state_checksum(self) -> dict[str, float]:
        """Float64 sum of every full parameter by checkpoint name (collective; same on every rank)."""
        from torch.distributed.tensor import DTensor

        self.policy.reshard()
        names, sums = [], []
        for name, tensor in self.policy.state_dict().items():
            local = tensor.to_local() if isinstance(tensor, DTensor) else (tensor if self.rank == 0 else None)
            names.append(self._ckpt_names[name])
            sums.append(float(local.double().sum()) if local is not None else 0.0)
        return dict(zip(names, self._all_reduce(sums), strict=True))

    # ------------------------------------------------------------------------------ checkpoints

    def save_checkpoint(self, path: str | Path) -> dict:
        """Sharded policy + optimizer + scheduler state with torch.distributed.checkpoint (collective;
        ``path`` must be on a file system every rank sees). The frozen reference is not saved. Returns this
        rank's confirmation: its node and the shard files it wrote with their sizes (rank 0 also DCP's
        ``.metadata``), for the driver to find before it marks the checkpoint complete."""
        from torch.distributed.checkpoint.state_dict import get_state_dict

        from ivgr_dist.driver.checkpoints import dcp_save

        self.policy.reshard()
        model_sd, optim_sd = get_state_dict(self.policy, self.optimizer)
        state = {"model": model_sd, "optim": optim_sd, "scheduler": self.scheduler.state_dict(), "step": self.step}
        dcp_save(state, path)  # a failure (a full disk) is an OSError naming the path
        mine = [p for p in Path(path).glob(f"__{self.rank}_*.distcp")]
        if self.rank == 0:
            mine.append(Path(path) / ".metadata")
        return {"rank": self.rank, "node": self.node_id(), "files": {p.name: p.stat().st_size for p in mine}}

    def load_checkpoint(self, path: str | Path) -> None:
        """Restore what :meth:`save_checkpoint` wrote (same world size or resharded by DCP). Fails first, naming
        this rank's node, when the checkpoint is not visible from here; raises ``CorruptCheckpoint`` when DCP
        cannot read it (the driver then tries the previous checkpoint, which overwrites all of this state)."""
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        from ivgr_dist.driver.checkpoints import CorruptCheckpoint, dcp_load

        if not (Path(path) / ".metadata").is_file():
            raise FileNotFoundError(
                f"learner rank {self.rank} on node {self.node_id()[:8]} ({socket.gethostname()}) cannot see the "
                f"checkpoint {path} (no .metadata): trainer.output_dir must be on storage every node mounts"
            )
        self.policy.reshard()
        model_sd, optim_sd = get_state_dict(self.policy, self.optimizer)
        state = {"model": model_sd, "optim": optim_sd, "scheduler": self.scheduler.state_dict(), "step": 0}
        try:
            dcp_load(state, path)
        except CorruptCheckpoint as exc:
            raise CorruptCheckpoint(f"learner rank {self.rank}: {exc}") from exc
        set_state_dict(self.policy, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])

    def export_hf(self, path: str | Path, dtype: str | None = None, max_shard_bytes: int = 5 << 30) -> None:
        """A Hugging Face model directory at ``path`` (collective; rank 0 writes): the source
        directory's config/tokenizer/processor files and the current weights as safetensors in
        checkpoint naming, in ``dtype`` (default: the dtype named in the source config.json), which its
        config.json names (see ``ivgr_dist.models.export.write_hf_model``).

        Never half-written, never missing once it existed: rank 0 writes a temporary sibling (``.<name>.tmp``)
        and, once every rank is through, swaps it in itself (``checkpoints.replace_dir``: an atomic exchange with
        the previous export, which is removed after; the owner of a file finalises it: on several nodes the
        driver's view of rank 0's files is not to be relied on). A failed export leaves the previous one."""
        from ivgr_dist.driver.checkpoints import replace_dir
        from ivgr_dist.models.export import write_hf_model

        src, final = Path(self.model_cfg.path), Path(path)
        out = final.with_name(f".{final.name}.tmp")
        if dtype is None:
            cfg = json.loads((src / "config.json").read_text())
            dtype = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
        buckets = self.iter_full_state(max_shard_bytes, getattr(torch, dtype))
        if self.rank == 0:
            shutil.rmtree(out, ignore_errors=True)  # a leftover of an interrupted export
            try:
                write_hf_model(out, src, buckets, dtype)
            except BaseException:
                shutil.rmtree(out, ignore_errors=True)  # a full disk gets its space back; the previous export stays
                raise
        else:
            for _ in buckets:  # the all-gathers of rank 0's buckets
                pass
        dist.barrier()
        if self.rank == 0:
            replace_dir(out, final)
