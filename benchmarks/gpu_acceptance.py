"""GPU acceptance: the learner's real path (``LearnerWorker``) on both model families, one JSON verdict.

Per model (a tiny random Qwen2.5-VL and a tiny random Qwen3-VL built here with ``ivgr_dist.models.tiny``, plus
the checkpoint of ``--model-dir`` when given), on ``--world-size`` ranks:

- ``LearnerWorker`` itself, as ``LearnerGroup`` runs it (without Ray: the worker is a plain class that the group
  wraps in ``ray.remote``): ``init_distributed`` over NCCL (``--device cuda``) or gloo (``--device cpu``), the
  policy and the frozen reference loaded sharded from the Hugging Face directory (``learner.sharded_init``),
  FlashAttention-2 where ``flash_attn`` imports on CUDA else SDPA (``learner.attn_implementation=auto``; the
  verdict names which ran), packed micro-batches (``learner.pack_sequences``), gradient checkpointing, bf16
  compute on CUDA (fp32 on CPU, where the learner never uses bf16);
- a step's samples made by the learner's own ``SampleEncoder`` (the model directory's processor; images as
  uint8 arrays, as the driver ships them) and placed on the ranks by ``step_data.place``;
- the policy's response-token log-probs against an fp32 forward of the same weights (transformers
  ``from_pretrained``, SDPA, one row per sample without padding, unsharded), max and mean absolute difference;
- one GRPO update (``train_step``): finite loss, a gradient, every rank's parameters changed
  (``state_checksum``), the log-probs moved;
- peak device memory (``torch.cuda.max_memory_allocated``; on CPU the process's peak RSS instead).

Weight transfer (``benchmarks/_acceptance_sync.py``), where vllm and ray import (``--weight-sync auto``, the
default): a local Ray cluster, a TP=2
vLLM engine (``RolloutPool``), 2 learner ranks (``LearnerGroup``), one GRPO update on the engine's rollouts, a
push by the collective backend (``nccl`` on CUDA, ``gloo`` on CPU; ``ivgr_dist.sync.collective``) and the
``sync.verify`` probe, which must fail before the push (stale engine) and pass after it. On CUDA that needs 4
devices (NCCL puts no two ranks on one device). Where vllm, ray or omegaconf (``load_config``) does not import,
as on the lent GPU machines, the check says so ("skipped: vllm, ray not importable"); the verdict never counts
a skipped check as passed.

The learner checks need torch and transformers only (plus safetensors, tokenizers, numpy and Pillow, which
transformers' processors import); no Ray, no vLLM, no OmegaConf (``ivgr_dist.learner.worker`` imports none of them
at module level; the weight-transfer check imports them only after finding vllm and ray). Run it from the
repository root without installing the package::

    PYTHONPATH=src python benchmarks/gpu_acceptance.py --out verdict.json [--model-dir DIR]
    PYTHONPATH=src python benchmarks/gpu_acceptance.py --device cpu --world-size 2   # the same path on CPU

Prints ONE JSON object (and writes it to ``--out``): per check ``status`` (ran / skipped / failed) with its
numbers, and ``ok`` (every check that ran passed and the learner checks ran). Exit status: 0 when ok, 1 when a
check failed, 2 when nothing could run (``--device cuda`` without CUDA).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from _acceptance_sync import importable, weight_sync_check  # noqa: E402 - benchmarks/, beside this script

FAMILIES = ("qwen2_5_vl", "qwen3_vl")

# Tolerances on |policy - fp32 reference| response-token log-probs (nats), by learner precision and model.
# bf16, real checkpoint (--model-dir): bf16 keeps 8 significant bits (a rounding is off by up to 2^-9 = 0.2 %),
# and matmul inputs, activations and the logits are rounded; over a real model's layers that gives ~1e-2 nats on
# average. The max bound is what the mismatch would do to training: exp(0.2) = 1.22 keeps a token's importance
# ratio inside the GRPO clip range [1 - 0.2, 1 + 0.28], so numerical noise alone never clips a token; the mean
# bound (0.02 nats, a 2 % ratio error) is where a systematic error (a wrong rotary position, a lost image,
# attention across packed sequences, a layer left unloaded) shows, since those shift every token by far more.
# Not yet measured on a real checkpoint (the responses here are random tokens, i.e. unlikely ones, whose
# log-probs are the least precise): a max above 0.2 there wants the measured number before the bound moves.
# bf16, tiny random models: their logits are near 0, so rounding costs little; measured with --precision bf16
# on CPU (gloo, SDPA): max 0.004-0.005, mean 0.0011-0.0013 on both families. Bounds ~10x / ~8x that. What they
# catch, measured by breaking the packed attention so that it runs across the packed sequences (one causal block
# per row): max 0.13-0.14, mean 0.022-0.025 in fp32 and in bf16 on both families, failing these bounds by 2-3x.
# fp32: the same arithmetic up to summation order (packed vs one-row SDPA, sharded vs whole parameters);
# measured max 1e-6; tests/integration/test_learner.py pins 1e-5 per token, here 1e-4 for headroom.
TOLERANCE = {
    ("bf16", "checkpoint"): {"max": 0.2, "mean": 0.02},
    ("bf16", "tiny"): {"max": 0.05, "mean": 0.01},
    ("fp32", "checkpoint"): {"max": 1e-4, "mean": 1e-5},
    ("fp32", "tiny"): {"max": 1e-4, "mean": 1e-5},
}

MICRO_BATCH_TOKENS = 256  # with the samples below: 2-4 sequences per packed row, several micro-batches
IMAGE_SIZES = [(112, 84), (56, 56), (84, 112), (112, 112)]  # (width, height) of each prompt's image
SAMPLES_PER_PROMPT = 2
RESPONSE_LENGTHS = [12, 20, 28, 36, 16, 24, 32, 40]


def _peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# ------------------------------------------------------------------------------------ inputs


def make_step_batch(encoder, seed: int = 0):
    """A step of 4 prompts (each with one image of its own size) x 2 samples, random responses and advantages,
    built the way the driver ships it (``StepBatch``: uint8 images, unexpanded ``<|image_pad|>``)."""
    from ivgr_dist.learner.step_data import StepBatch

    rng = np.random.default_rng(seed)
    tok = encoder.processor.tokenizer
    special = set(tok.all_special_ids) | {encoder.image_pad_id}
    top = min(i for i in special if i is not None and i > 32)  # ordinary tokens come before Qwen's specials
    images, prompt_ids, prompt_images, prompt_tokens, uids = {}, [], [], [], []
    for j, (w, h) in enumerate(IMAGE_SIZES):
        key = f"{j}/0"
        images[key] = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        content = [{"type": "image"}, {"type": "text", "text": f"What color is shape {j}?"}]
        text = encoder.processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        _, grid = encoder.image_inputs([images[key]])
        prompt_ids.append(np.asarray(ids, dtype=np.int32))
        prompt_images.append((key,))
        prompt_tokens.append(len(ids) - 1 + int(grid.prod()) // encoder.merge_size**2)
        uids.append(f"{j}:textual")
    n = len(IMAGE_SIZES) * SAMPLES_PER_PROMPT
    lengths = [RESPONSE_LENGTHS[i % len(RESPONSE_LENGTHS)] for i in range(n)]
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    advantages = rng.standard_normal(n).astype(np.float32)
    advantages -= advantages.mean()  # a GRPO-like zero-mean batch, never all zero
    return StepBatch(
        images=images,
        prompt_ids=prompt_ids,
        prompt_images=prompt_images,
        prompt_tokens=np.asarray(prompt_tokens, dtype=np.int64),
        prompt_uids=uids,
        sample_prompt=np.repeat(np.arange(len(IMAGE_SIZES), dtype=np.int32), SAMPLES_PER_PROMPT),
        response_offsets=offsets,
        response_ids=rng.integers(32, top, size=int(offsets[-1])).astype(np.int32),
        behaviour_logprobs=np.zeros(int(offsets[-1]), dtype=np.float32),
        advantages=advantages,
    )


def fp32_reference_logprobs(model_dir: str, samples, device) -> list[np.ndarray]:
    """Response-token log-probs of each sample from a plain fp32 transformers forward of the checkpoint
    (SDPA, the sample alone in its row, unsharded): what the learner must reproduce."""
    import inspect

    import torch
    from transformers import AutoModelForImageTextToText

    from ivgr_dist.learner.grpo import logprobs_from_logits

    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    model = model.to(device).eval()
    image_token = model.config.image_token_id
    typed = "mm_token_type_ids" in inspect.signature(model.forward).parameters  # transformers >= 5.19
    out = []
    with torch.no_grad():
        for s in samples:
            ids = torch.tensor([s.input_ids], device=device)
            kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
            if typed:
                kwargs["mm_token_type_ids"] = (ids == image_token).long()
            if s.pixel_values is not None:
                kwargs.update(pixel_values=s.pixel_values.to(device), image_grid_thw=s.image_grid_thw.to(device))
            logits = model(**kwargs, use_cache=False).logits[0, s.prompt_len - 1 : -1]
            out.append(logprobs_from_logits(logits, ids[0, s.prompt_len :]).cpu().numpy())
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


# ------------------------------------------------------------------------------------ one model


def check_model(model_dir: str, rank: int, world_size: int, device_type: str, port: int, precision: str) -> dict:
    """Everything this script checks for one model directory, on this rank (collective)."""
    import copy

    import torch
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from ivgr_dist.config import AlgorithmConfig, LearnerConfig, ModelConfig
    from ivgr_dist.learner.batch import SampleEncoder, plan_packs
    from ivgr_dist.learner.step_data import place
    from ivgr_dist.learner.worker import LearnerWorker

    t0 = time.perf_counter()
    model_type = json.loads((Path(model_dir) / "config.json").read_text()).get("model_type")
    out: dict = {"model_dir": str(model_dir), "model_type": model_type}
    cuda = device_type == "cuda"
    local = int(os.environ.get("LOCAL_RANK", rank))
    device = torch.device("cuda", local % torch.cuda.device_count()) if cuda else torch.device("cpu")

    encoder = SampleEncoder(model_dir)
    batch = make_step_batch(encoder)
    mine = place(batch, [list(range(len(batch)))], world_size)[rank][0]
    samples = encoder.samples(batch.select(mine))
    out["samples"] = {"global": len(batch), "this_rank": len(samples)}

    if cuda:
        torch.cuda.set_device(device)
        torch.cuda.reset_peak_memory_stats(device)
    want = fp32_reference_logprobs(model_dir, samples, device)  # before the learner: never both in memory
    if cuda:
        out["fp32_reference_peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        torch.cuda.reset_peak_memory_stats(device)

    learner = LearnerConfig(
        num_ranks=world_size,
        backend="nccl" if cuda else "gloo",
        precision=precision,  # auto: bf16 on CUDA, fp32 on CPU (the learner's own rule)
        attn_implementation="auto",  # FlashAttention-2 where flash_attn imports on CUDA, else SDPA
        pack_sequences=True,
        sharded_init=True,
        gradient_checkpointing=True,
        micro_batch_tokens=MICRO_BATCH_TOKENS,
        lr=1e-4,
        warmup_ratio=0.0,
        lr_schedule="constant",
    )
    worker = LearnerWorker(
        ModelConfig(path=str(model_dir), make_tiny_if_missing=False),
        learner,
        AlgorithmConfig(kl_coef=0.01),  # > 0: the frozen reference policy loads too, as in a run
        rank,
        world_size,
        total_steps=1,
    )
    try:
        t1 = time.perf_counter()
        worker.init_distributed("127.0.0.1", port)
        out["init_s"] = time.perf_counter() - t1
        params = list(worker.policy.parameters())
        dtensors = [p for p in params if isinstance(p, DTensor)]
        local_numel = sum(p.to_local().numel() for p in dtensors)
        out["learner"] = {
            "class": f"{type(worker).__module__}.{type(worker).__qualname__}",
            "backend": dist.get_backend(),
            "world_size": world_size,
            "precision": worker.precision,
            "attn_implementation": worker.attn_implementation,
            "pack_sequences": worker.cfg.pack_sequences,
            "sharded_init": worker.cfg.sharded_init,
            "gradient_checkpointing": bool(getattr(worker.policy, "is_gradient_checkpointing", False)),
            "params": worker.num_params(),
            "all_params_fsdp_sharded": len(dtensors) == len(params),
            "local_param_fraction": local_numel / max(1, sum(p.numel() for p in dtensors)),
            "reference_loaded": worker.reference is not None,
        }
        lengths = [s.num_tokens for s in samples]
        packs = plan_packs(lengths, MICRO_BATCH_TOKENS)
        out["packing"] = {"micro_batches": len(packs), "max_sequences_per_row": max(len(p) for p in packs)}

        worker.load_samples(copy.deepcopy(samples))
        t1 = time.perf_counter()
        got = worker.compute_logprobs("policy")
        out["logprobs_s"] = time.perf_counter() - t1
        worker.compute_logprobs("reference")
        diff = np.concatenate([np.abs(g - w) for g, w in zip(got, want, strict=True)])
        stats = torch.tensor([float(diff.max()), float(diff.sum()), float(diff.size)], dtype=torch.float64)
        maxed = stats[:1].clone()
        _all_reduce(maxed, dist.ReduceOp.MAX, device)
        summed = stats[1:].clone()
        _all_reduce(summed, dist.ReduceOp.SUM, device)
        tiny = (Path(model_dir) / "ivgr_tiny.json").is_file()  # written by ivgr_dist.models.tiny
        tol = TOLERANCE[(worker.precision, "tiny" if tiny else "checkpoint")]
        out["logprob_vs_fp32"] = {
            "max_abs_diff": float(maxed[0]),
            "mean_abs_diff": float(summed[0] / summed[1]),
            "tokens": int(summed[1]),
            "tolerance": tol,
            "within_tolerance": float(maxed[0]) < tol["max"] and float(summed[0] / summed[1]) < tol["mean"],
        }

        before = worker.state_checksum()
        t1 = time.perf_counter()
        metrics = worker.train_step(0)
        out["step_s"] = time.perf_counter() - t1
        after = worker.state_checksum()
        changed = sum(before[k] != after[k] for k in before)
        moved = worker.logprobs(samples, "policy", 1.0)
        shift = float(np.mean(np.concatenate([np.abs(a - b) for a, b in zip(moved, got, strict=True)])))
        out["grpo_step"] = {
            "loss": metrics["loss/total"],
            "kl": metrics["loss/kl"],
            "grad_norm": metrics["grad_norm"],
            "skipped_step": metrics["learner/skipped_step"],
            "micro_batches": metrics["learner/micro_batches"],
            "padding_ratio": metrics["learner/padding_ratio"],
            "tensors_changed": int(changed),
            "tensors": len(before),
            "logprob_mean_shift": shift,
        }
        if cuda:
            peak = torch.tensor([torch.cuda.max_memory_allocated(device) / 2**30], dtype=torch.float64)
            _all_reduce(peak, dist.ReduceOp.MAX, device)
            out["learner_peak_mem_gib"] = float(peak[0])
        else:
            out["peak_rss_mib"] = _peak_rss_mib()  # this process, whole run so far (no device memory on CPU)
    finally:
        worker.close()
    out["total_s"] = time.perf_counter() - t0
    out["failures"] = failures(out)
    return out


def _all_reduce(t, op, device) -> None:
    import torch.distributed as dist

    moved = t.to(device)
    dist.all_reduce(moved, op=op)
    t.copy_(moved.cpu())


def failures(out: dict) -> list[str]:
    """What is wrong with one model's results (empty: passed)."""
    bad = []
    lrn, lp, step = out["learner"], out["logprob_vs_fp32"], out["grpo_step"]
    if not (lrn["pack_sequences"] and lrn["sharded_init"] and lrn["gradient_checkpointing"]):
        bad.append(f"packing/sharded init/checkpointing not all on: {lrn}")
    if not lrn["all_params_fsdp_sharded"]:
        bad.append("some policy parameters are not FSDP2 DTensors")
    if lrn["world_size"] > 1 and not lrn["local_param_fraction"] < 0.75:
        bad.append(f"rank holds {lrn['local_param_fraction']:.2f} of the parameters on {lrn['world_size']} ranks")
    if not lp["within_tolerance"]:
        bad.append(
            f"log-probs vs fp32: max {lp['max_abs_diff']:.3g}, mean {lp['mean_abs_diff']:.3g} > {lp['tolerance']}"
        )
    if not (math.isfinite(step["loss"]) and math.isfinite(step["grad_norm"]) and step["grad_norm"] > 0):
        bad.append(f"GRPO step: loss {step['loss']}, grad_norm {step['grad_norm']}")
    if step["skipped_step"] or step["tensors_changed"] == 0 or not step["logprob_mean_shift"] > 0:
        bad.append(f"GRPO step did not change the policy: {step}")
    if step["padding_ratio"] != 0.0:
        bad.append(f"packed micro-batches have padding: {step['padding_ratio']}")
    return bad


# ------------------------------------------------------------------------------------ ranks


def run_rank(rank, world_size, device_type, models, ports, precision, q=None):
    """Every model's check on this rank; rank 0's results (or the error) are the answer."""
    from ivgr_dist.runtime._ext_fix import install

    install()  # the CPU stack's torchvision/torchaudio wheels; changes nothing where they load (GPU machines)
    import torch

    if device_type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // world_size))
    results = {}
    for (label, model_dir), port in zip(models, ports, strict=True):
        try:
            results[label] = {"status": "ran", **check_model(model_dir, rank, world_size, device_type, port, precision)}
            if results[label]["failures"]:
                results[label]["status"] = "failed"
        except Exception as exc:  # noqa: BLE001 - the verdict names it; the other models still run
            results[label] = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}
            results[label]["traceback"] = traceback.format_exc(limit=8)[-3000:]
            if world_size > 1:
                raise  # the other ranks would wait in a collective: fail the run rather than hang
    if q is not None:
        q.put((rank, results))
    return results


def _spawned(rank, world_size, device_type, models, ports, precision, q) -> None:
    os.environ["LOCAL_RANK"] = str(rank)
    try:
        run_rank(rank, world_size, device_type, models, ports, precision, q)
    except BaseException as exc:
        where = traceback.format_exc(limit=6)[-1500:]
        q.put((rank, {"error": f"rank {rank}: {type(exc).__name__}: {exc}", "traceback": where}))
        raise


def run_ranks(world_size: int, device_type: str, models: list[tuple[str, str]], precision: str, timeout_s: float):
    from ivgr_dist.runtime.rendezvous import free_port

    ports = [free_port("127.0.0.1") for _ in models]
    if world_size == 1:
        return run_rank(0, 1, device_type, models, ports, precision)
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [
        ctx.Process(target=_spawned, args=(r, world_size, device_type, models, ports, precision, q))
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    got: dict[int, dict] = {}
    try:
        deadline = time.monotonic() + timeout_s
        while len(got) < world_size:
            rank, results = q.get(timeout=max(1.0, deadline - time.monotonic()))
            got[rank] = results
            if "error" in results:
                break
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    errors = [f"{r['error']}\n{r['traceback']}" for r in got.values() if "error" in r]
    if errors or 0 not in got:
        raise RuntimeError("\n".join(errors) or "rank 0 gave no result")
    return got[0]


# ------------------------------------------------------------------------------------ verdict


def environment(device_type: str) -> dict:
    import torch
    import transformers

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "flash_attn_importable": importable("flash_attn"),
    }
    if device_type == "cuda":
        env["device"] = torch.cuda.get_device_name(0)
        env["cuda_devices"] = torch.cuda.device_count()
    else:
        env["device"] = "cpu"
    return env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--world-size", type=int, default=None, help="ranks (default: the CUDA devices; 2 on CPU)")
    parser.add_argument("--families", default=",".join(FAMILIES), help=f"tiny models to build: {', '.join(FAMILIES)}")
    parser.add_argument("--model-dir", default=None, help="also check this Hugging Face checkpoint directory")
    parser.add_argument("--work-dir", default=None, help="where the tiny models are built (default: a temp dir)")
    parser.add_argument("--out", default=None, help="write the JSON verdict here too")
    parser.add_argument(
        "--precision",
        choices=("auto", "bf16", "fp32"),
        default="auto",
        help="learner.precision: auto is bf16 on CUDA, fp32 on CPU; bf16 on CPU previews the bf16 tolerance",
    )
    parser.add_argument("--timeout-s", type=float, default=600.0)
    parser.add_argument(
        "--weight-sync",
        choices=("auto", "off"),
        default="auto",
        help="auto: the TP engine + push + verify check where vllm and ray import; off: skip it",
    )
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    if unknown := [f for f in families if f not in FAMILIES]:
        parser.error(f"--families: unknown {unknown}; valid: {list(FAMILIES)}")

    from ivgr_dist.runtime._ext_fix import install

    install()
    import torch

    verdict: dict = {"script": "benchmarks/gpu_acceptance.py", "device_requested": args.device}
    if args.device == "cuda" and not torch.cuda.is_available():
        verdict.update(ok=False, error="no CUDA device: nothing ran (--device cpu runs the same path on CPU)")
        return _emit(verdict, args.out, 2)
    world_size = args.world_size or (torch.cuda.device_count() if args.device == "cuda" else 2)
    verdict["environment"] = environment(args.device)

    from ivgr_dist.config import TinyModelConfig
    from ivgr_dist.models.tiny import make_tiny_model

    with tempfile.TemporaryDirectory(prefix="ivgr-acceptance-") as tmp:
        work = Path(args.work_dir or tmp)
        models = []
        for family in families:
            path = work / f"tiny-{family}"
            if not (path / "config.json").is_file():
                make_tiny_model(path, TinyModelConfig(family=family))
            models.append((f"tiny_{family}", str(path)))
        if args.model_dir:
            models.append(("model_dir", str(Path(args.model_dir).resolve())))
        try:
            checks = run_ranks(world_size, args.device, models, args.precision, args.timeout_s)
        except Exception as exc:  # noqa: BLE001 - a rank died or hung: still one verdict
            checks = {label: {"status": "failed", "error": f"{type(exc).__name__}: {exc}"} for label, _ in models}
        if args.weight_sync == "off":
            checks["weight_sync"] = {"status": "skipped", "reason": "skipped: --weight-sync off"}
        else:
            checks["weight_sync"] = weight_sync_check(args.device, models[0][1], work, args.timeout_s)
    learner = [c for k, c in checks.items() if k != "weight_sync"]
    ran_families = sorted({c.get("model_type") for c in learner if c["status"] == "ran"} - {None})
    verdict["checks"] = checks
    verdict["summary"] = {
        "ran": [k for k, c in checks.items() if c["status"] == "ran"],
        "skipped": [k for k, c in checks.items() if c["status"] == "skipped"],
        "failed": [k for k, c in checks.items() if c["status"] == "failed"],
        "families_ran": ran_families,
    }
    verdict["ok"] = not verdict["summary"]["failed"] and bool(learner)
    verdict["total_s"] = time.perf_counter() - t0
    return _emit(verdict, args.out, 0 if verdict["ok"] else 1)


def _emit(verdict: dict, out: str | None, code: int) -> int:
    text = json.dumps(verdict, indent=None, default=str)
    print(text, flush=True)
    if out:
        Path(out).write_text(text + "\n")
    return code


if __name__ == "__main__":
    sys.exit(main())
