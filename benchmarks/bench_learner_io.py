"""The learner's input path, before vs after, measured in one run; prints ONE JSON line.

Part 1, data (a recipe-like step that fits this machine): synthetic records with 448x448 images, 32 prompts
(both streams of ~15 records, plus singles), 5 rollouts each, on a real 2-rank learner group of the tiny
Qwen2.5-VL on a local Ray cluster.

- before: what the learner path did until this change: the driver turned EVERY rollout into pixel values
  (``SampleEncoder.encode``, one copy per rollout) and sent the sample list to the ranks once per pass
  (old log-probs, reference log-probs, update: three times). Its bytes are the pickled size of those
  lists; its time is the driver's encoding plus three real Ray transfers of them to two actors placed like
  the ranks (``Sink``), since that code path no longer exists.
- after: ``StepBatch.from_rollouts`` (uint8 images once per record, arrays) and
  ``LearnerGroup.load_batch`` (sent once, images encoded on the ranks), on the real group.
- padding: one real step (old + reference log-probs, one update) with padded micro-batches
  (``learner.pack_sequences=false``) and with packed rows, same samples: ``learner/padding_ratio`` and the
  learner's compute time of each.

Part 2, memory: peak memory per rank while two ranks (gloo, plain processes) initialise a ~90 M-parameter random
Qwen2.5-VL saved in bf16 like released checkpoints (policy and reference, fp32 on CPU), with
``learner.sharded_init=false`` (every rank loads the full model, then shards) and ``=true`` (meta-device
build, each rank reads its own rows). Peak RSS is the address space's high-water mark (VmHWM; it counts the
checkpoint file's pages the process touched); peak anonymous memory (RssAnon, polled) is what the process
itself allocated.

Fields: ``driver_bytes_ratio`` (after / before), ``padding_ratio`` (after; ``padding_ratio_before``),
``peak_rss_ratio`` (after / before, the larger rank), ``input_s_before`` / ``input_s_after``,
``learner_compute_s_padded`` / ``_packed``, ``input_frac_after`` (input time / (input + compute)).

    python benchmarks/bench_learner_io.py [--records 16] [--n 5] [--side 448] [--hidden 768] [--layers 14]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import pickle
import random
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))


# ------------------------------------------------------------------------------------- part 1: data


def make_rollouts(workdir: Path, side: int, prompts: int, n: int, response: int, seed: int = 0):
    """(model dir, config, rollouts): ``prompts`` prompts of the synthetic set at ``side`` x ``side`` with ``n``
    random responses each (the learner's cost does not depend on what the tokens say)."""
    from ivgr_dist.config import load_config
    from ivgr_dist.data.pipeline import build_pipeline
    from ivgr_dist.types import Rollout

    cfg = load_config(
        None,
        [
            f"model.path={workdir / 'tiny-qwen2.5-vl'}",
            f"data.train_files=[{workdir / f'synthetic-{side}' / 'train.parquet'}]",
            f"data.val_files=[{workdir / f'synthetic-{side}' / 'val.parquet'}]",
            "data.synthetic.num_records=256",
            f"data.synthetic.min_image_size={side}",
            f"data.synthetic.max_image_size={side}",
            f"data.max_pixels={side * side}",
            f"data.rollout_batch_size={prompts}",
            f"rollout.n={n}",
            f"rollout.max_response_length={response}",
            "learner.num_ranks=2",
        ],
    )
    pipe = build_pipeline(cfg.model, cfg.data, "train")
    rng = random.Random(seed)
    vocab = len(pipe.tokenizer) - 64  # stay clear of the special tokens at the end
    out = []
    for p in pipe.next_prompts():
        for k in range(n):
            length = rng.randint(response // 2, response)
            ids = [rng.randrange(100, vocab) for _ in range(length)]
            out.append(Rollout(p, k, ids, "", [-1.0] * length, 0, advantage=rng.uniform(-1, 1)))
    return cfg, out


class Sink:
    """Stands where a learner rank stood in the old path: receives a sample list, as its calls did."""

    def take(self, samples) -> int:
        return len(samples)


def before_path(cfg, rollouts, shards: list[list[int]]) -> dict:
    """The old path's bytes and time: per-rollout encoding on the driver, three transfers of the samples."""
    import ray

    from ivgr_dist.learner.batch import SampleEncoder

    encoder = SampleEncoder(cfg.model.path)
    t0 = time.perf_counter()
    samples = [encoder.encode(r) for r in rollouts]
    encode_s = time.perf_counter() - t0
    per_pass = sum(len(pickle.dumps([samples[i] for i in s], protocol=5)) for s in shards)
    sinks = [ray.remote(Sink).options(num_cpus=0).remote() for _ in shards]
    ray.get([s.take.remote([]) for s in sinks])
    t0 = time.perf_counter()
    for _ in range(3):  # old log-probs, reference log-probs, update
        ray.get([sink.take.remote([samples[i] for i in s]) for sink, s in zip(sinks, shards, strict=True)])
    transfer_s = time.perf_counter() - t0
    for s in sinks:
        ray.kill(s)
    return {"bytes": 3 * per_pass, "encode_s": encode_s, "transfer_s": transfer_s, "s": encode_s + transfer_s}


def learner_step(cfg, batch, pack: bool) -> dict:
    """One real learner step on a 2-rank group: load, old and reference log-probs, one update."""
    import dataclasses

    from ivgr_dist.learner.group import LearnerGroup

    learner_cfg = dataclasses.replace(cfg.learner, pack_sequences=pack, cpus_per_rank=1)
    group = LearnerGroup(cfg.model, learner_cfg, cfg.algorithm, total_steps=1, timeout_s=1200)
    try:
        t0 = time.perf_counter()
        placed = group.load_batch(batch)
        input_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        group.compute_logprobs("policy", 1.0)
        group.compute_logprobs("reference", 1.0)
        metrics = group.train_step(0, 1.0)
        compute_s = time.perf_counter() - t0
    finally:
        group.shutdown()
    return {**placed, "input_s": input_s, "compute_s": compute_s, **metrics}


# ----------------------------------------------------------------------------------- part 2: memory


def _status_mb(field: str) -> float:
    """A memory figure of this process from /proc/self/status, in MiB. VmHWM is the peak resident set of this
    address space (``ru_maxrss`` would not do: Linux carries it over ``execve``, so a spawned child starts with
    its parent's peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _init_rank(rank: int, port: int, model_dir: str, sharded: bool, q) -> None:
    from ivgr_dist.runtime._ext_fix import install

    install()
    import torch

    torch.set_num_threads(1)
    import threading

    from ivgr_dist.config import AlgorithmConfig, LearnerConfig, ModelConfig
    from ivgr_dist.learner.worker import LearnerWorker

    base = _status_mb("VmRSS")
    anon = {"peak": _status_mb("RssAnon"), "stop": False}

    def sample() -> None:  # no high-water mark exists for anonymous memory alone: poll it
        while not anon["stop"]:
            anon["peak"] = max(anon["peak"], _status_mb("RssAnon"))
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    worker = LearnerWorker(
        ModelConfig(path=model_dir, make_tiny_if_missing=False),
        LearnerConfig(num_ranks=2, sharded_init=sharded),
        AlgorithmConfig(),  # kl_coef > 0: the reference policy loads too
        rank,
        2,
        total_steps=1,
    )
    worker.init_distributed("127.0.0.1", port)
    params = worker.num_params()
    peak = _status_mb("VmHWM")
    anon["stop"] = True
    sampler.join()
    worker.close()
    q.put((rank, base, peak, params, anon["peak"]))


def init_peak_rss(model_dir: Path, sharded: bool) -> dict:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_init_rank, args=(r, port, str(model_dir), sharded, q)) for r in range(2)]
    for p in procs:
        p.start()
    got = dict((r, rest) for r, *rest in (q.get(timeout=900) for _ in procs))
    for p in procs:
        p.join(timeout=60)
    return {
        "base_mb": [round(got[r][0]) for r in range(2)],
        "peak_mb": [round(got[r][1]) for r in range(2)],
        "params": got[0][2],
        "anon_peak_mb": [round(got[r][3]) for r in range(2)],
    }


def bf16_copy(model_dir: Path) -> Path:
    """The model directory with its weights in bf16, as released checkpoints are (the learner keeps fp32
    masters, so loading casts: that is when a full model lands in each rank's memory)."""
    from safetensors.torch import load_file, save_file

    out = model_dir.with_name(model_dir.name + "-bf16")
    if (out / "config.json").is_file():
        return out
    tmp = out.with_name("." + out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(model_dir, tmp)
    state = load_file(str(tmp / "model.safetensors"))
    save_file({k: v.to(torch.bfloat16) for k, v in state.items()}, str(tmp / "model.safetensors"), {"format": "pt"})
    cfg = json.loads((tmp / "config.json").read_text())
    cfg["dtype"] = "bfloat16"
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    tmp.rename(out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--n", type=int, default=5)
    ap.add_argument("--side", type=int, default=448)
    ap.add_argument("--response", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--layers", type=int, default=14)
    ap.add_argument("--workdir", default="outputs/bench")
    ap.add_argument("--skip-memory", action="store_true")
    args = ap.parse_args()

    from ivgr_dist.runtime._ext_fix import install

    install()
    import ray

    from ivgr_dist.learner.step_data import StepBatch, place

    workdir = Path(args.workdir).resolve()
    cfg, rollouts = make_rollouts(workdir, args.side, args.prompts, args.n, args.response)
    from ivgr_dist.runtime.startup import worker_runtime_env  # the import fix in every Ray worker

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, runtime_env=worker_runtime_env())
    try:
        t0 = time.perf_counter()
        batch = StepBatch.from_rollouts(rollouts)
        pack_s = time.perf_counter() - t0
        shards = [r[0] for r in place(batch, [list(range(len(batch)))], 2)]
        before = before_path(cfg, rollouts, shards)
        padded = learner_step(cfg, batch, pack=False)
        packed = learner_step(cfg, batch, pack=True)
    finally:
        ray.shutdown()
    out = {
        "bench": "learner_io",
        "prompts": len({r.prompt.uid for r in rollouts}),
        "records": len(batch.images),
        "samples": len(batch),
        "n": args.n,
        "image_side": args.side,
        "driver_bytes_before": before["bytes"],
        "driver_bytes_after": int(packed["learner/input_bytes"]),
        "driver_bytes_ratio": round(packed["learner/input_bytes"] / before["bytes"], 4),
        "input_s_before": round(before["s"], 3),
        "input_s_before_encode": round(before["encode_s"], 3),
        "input_s_before_transfer": round(before["transfer_s"], 3),
        "input_s_after": round(pack_s + packed["input_s"], 3),
        "input_s_after_rank_encode_max": round(packed["learner/encode_s_max"], 3),
        "padding_ratio_before": round(padded["learner/padding_ratio"], 4),
        "padding_ratio": round(packed["learner/padding_ratio"], 4),
        "learner_compute_s_padded": round(padded["compute_s"], 3),
        "learner_compute_s_packed": round(packed["compute_s"], 3),
        "input_frac_after": round((pack_s + packed["input_s"]) / (pack_s + packed["input_s"] + packed["compute_s"]), 4),
    }
    if not args.skip_memory:
        from bench_sync import build_model

        big = bf16_copy(build_model(workdir / f"io-qwen2.5-vl-h{args.hidden}-l{args.layers}", args.hidden, args.layers))
        full = init_peak_rss(big, sharded=False)
        sharded = init_peak_rss(big, sharded=True)
        out.update(
            {
                "params": full["params"],
                "peak_rss_mb_before": full["peak_mb"],
                "peak_rss_mb_after": sharded["peak_mb"],
                "peak_anon_mb_before": full["anon_peak_mb"],
                "peak_anon_mb_after": sharded["anon_peak_mb"],
                "rss_mb_at_start": sharded["base_mb"],
                "peak_rss_ratio": round(max(sharded["peak_mb"]) / max(full["peak_mb"]), 3),
                "peak_anon_ratio": round(max(sharded["anon_peak_mb"]) / max(full["anon_peak_mb"]), 3),
            }
        )
    out.update({"cpus": os.cpu_count(), "loadavg_1m": round(os.getloadavg()[0], 2)})
    print(json.dumps(out))


if __name__ == "__main__":
    main()
