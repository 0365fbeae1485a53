"""``ivgr-dist preflight``: check a recipe against the Ray cluster, the data and the memory budget before any GPU
work, print one table, and exit non-zero on a blocker.

verl, OpenRLHF and slime find a wrong recipe when the run reaches it (an engine that does not fit, a learner that
runs out of memory at its first step, a data set whose largest images are dropped as too long). Every check
here reads what the run itself would use (the placement path of ``ivgr_dist.runtime.placement``, the data
pipeline's prompt builder and length filter, the storage probe, the judge's start-up check):

=================  =====================================================================================
check              what it compares
=================  =====================================================================================
``ray``            Ray's authentication mode (token or disabled) and the nodes it sees
``resources``      what each role asks for (engines, learner ranks, reward workers, judge engines) against
                   what the cluster has in total, per node: one engine's bundles must fit on ONE node
``placement``      the run's placement groups reserved for real (learners first, packed onto as few nodes
                   as possible; then one group per engine), which node each engine and learner rank lands
                   on; released at once
``storage``        every node of the plan sees ``trainer.output_dir`` and ``model.path`` (the run's probe)
``model``          ``model.path``: config.json, a supported family, the image processor, the tokenizer,
                   weights; parameters counted from the safetensors headers (no tensor is read)
``data``           every data file readable with the columns and types the pipeline reads; a sample of the
                   first train file through the real loader (bad rows, prompts filtered as too long)
``token budget``   the longest prompt the config admits (an image at ``data.max_pixels`` plus the sample's
                   longest text, template included) against ``data.max_prompt_length``, and that plus
                   ``rollout.max_response_length`` against ``rollout.engine.max_model_len``
``kv cache``       per engine: KV tokens that fit (device memory x ``gpu_memory_utilization`` x TP, less the
                   weights and an activation reserve; ``cpu_kvcache_space_gb`` on CPU) against
                   ``max_model_len`` (vLLM refuses to start below it) and ``max_num_seqs`` sequences of the
                   expected length (sample's median prompt + ``max_response_length``)
``learner memory`` per rank: FSDP2 shards of fp32 parameters, gradients and AdamW state (16 bytes per
                   parameter / ranks), the largest gathered layer, activations of one micro-batch of
                   ``learner.micro_batch_tokens`` (layer inputs only with gradient checkpointing) and its
                   logits, against device memory
``judge``          ``reward.judge.backend=openai``: one real request from a reward worker's node, which
                   must also hold the API key
=================  =====================================================================================

Statuses: ``ok``, ``warn`` (the run works, but not as the numbers suggest), ``FAIL`` (a blocker), ``skip`` (not
applicable, or not asked for). Device memory is read from a GPU (on the driver, or a one-GPU Ray task) or
declared (``--device-memory-gib``; tests declare it). The memory figures are estimates (stated per check), meant
to catch a recipe that cannot fit, not to replace vLLM's own profiling.

``train`` runs the fast form first (:func:`fast_checks`: model, data schemas, token budget, resources against
the cluster's totals, and the memory checks where a GPU is on the driver) and stops on a blocker before the
warm start, the engines and the learners start.
"""

from __future__ import annotations

import json
import logging
import math
import struct
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ivgr_dist.config import Config
from ivgr_dist.runtime.placement import sum_bundles

log = logging.getLogger(__name__)

__all__ = [
    "Check",
    "ModelFacts",
    "PreflightError",
    "fast_checks",
    "format_table",
    "run_preflight",
]

GIB = 1 << 30
VLLM_GPU_RESERVE = int(1.5 * GIB)
"""Per engine GPU: CUDA context, NCCL buffers, CUDA graphs (vLLM keeps these outside ``gpu_memory_utilization``'s
KV share only in part); an estimate."""


class PreflightError(RuntimeError):
    """A blocker found before the run started; the message is the table of checks."""


@dataclass
class Check:
    name: str
    status: str  # ok | warn | FAIL | skip
    detail: str

    @property
    def blocker(self) -> bool:
        return self.status == "FAIL"


def _ok(name: str, detail: str) -> Check:
    return Check(name, "ok", detail)


def _warn(name: str, detail: str) -> Check:
    return Check(name, "warn", detail)


def _fail(name: str, detail: str) -> Check:
    return Check(name, "FAIL", detail)


def _skip(name: str, detail: str) -> Check:
    return Check(name, "skip", detail)


def format_table(checks: Iterable[Check], width: int = 110) -> str:
    """One row per check: name, status, detail (wrapped)."""
    import textwrap

    rows = []
    for c in checks:
        lines = textwrap.wrap(c.detail, width) or [""]
        rows.append(f"{c.name:<16} {c.status:<5} {lines[0]}")
        rows += [f"{'':<16} {'':<5} {ln}" for ln in lines[1:]]
    head = f"{'check':<16} {'':<5} detail"
    return "\n".join([head, "-" * (len(head) + width - 6), *rows])


# ------------------------------------------------------------------------------------------- model


@dataclass
class ModelFacts:
    """What the memory and token checks need from ``model.path``."""

    family: str = ""
    factor: int = 28
    layers: int = 0
    hidden: int = 0
    intermediate: int = 0
    heads: int = 0
    kv_heads: int = 0
    head_dim: int = 0
    vocab: int = 0
    params: int = 0
    largest_layer_params: int = 0
    params_source: str = ""
    tokenizer: Any = field(default=None, repr=False)


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"


def _dtype_bytes(name: str) -> int:
    return {"float32": 4, "fp32": 4, "float16": 2, "fp16": 2, "bfloat16": 2, "bf16": 2}.get(str(name).lower(), 2)


def safetensors_params(model_dir: Path) -> tuple[int, dict[str, int]]:
    """Parameters in ``model_dir``'s ``*.safetensors`` files, read from their headers only (8-byte length + JSON):
    the total, and per decoder layer prefix (``...layers.<i>``) for the largest layer FSDP gathers at once."""
    total, per_layer = 0, {}
    for path in sorted(model_dir.glob("*.safetensors")):
        with path.open("rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            count = math.prod(meta["shape"])
            total += count
            parts = name.split(".")
            if "layers" in parts:
                prefix = ".".join(parts[: parts.index("layers") + 2])
                per_layer[prefix] = per_layer.get(prefix, 0) + count
    return total, per_layer


def check_model(cfg: Config) -> tuple[Check, ModelFacts | None]:
    from ivgr_dist.models.family import check_pixel_bounds, image_spec

    name, path = "model", Path(cfg.model.path)
    if not (path / "config.json").is_file():
        if cfg.model.make_tiny_if_missing and not (path.exists() and any(path.iterdir())):
            return _skip(name, f"model.path={path} is missing; the run builds the tiny model there"), None
        return _fail(name, f"model.path={path}: no config.json (not a Hugging Face model directory)"), None
    try:
        spec = image_spec(path)
        check_pixel_bounds(spec, cfg.data.min_pixels, cfg.data.max_pixels, path)
    except (ValueError, FileNotFoundError) as exc:
        return _fail(name, str(exc)), None
    conf = json.loads((path / "config.json").read_text())
    text = conf.get("text_config") or conf
    facts = ModelFacts(family=spec.model_type, factor=spec.factor)
    facts.layers = int(text.get("num_hidden_layers", 0))
    facts.hidden = int(text.get("hidden_size", 0))
    facts.intermediate = int(text.get("intermediate_size", 0))
    facts.heads = int(text.get("num_attention_heads", 0))
    facts.kv_heads = int(text.get("num_key_value_heads", facts.heads))
    facts.head_dim = int(text.get("head_dim") or (facts.hidden // max(facts.heads, 1)))
    facts.vocab = int(text.get("vocab_size", conf.get("vocab_size", 0)))
    params, per_layer = safetensors_params(path)
    if not params:
        return _fail(name, f"model.path={path}: no *.safetensors weights"), facts
    facts.params, facts.params_source = params, "safetensors headers"
    facts.largest_layer_params = max(per_layer.values(), default=0)
    try:
        from transformers import AutoTokenizer

        facts.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.model.trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - any tokenizer failure is this check's finding
        return _fail(name, f"model.path={path}: the tokenizer does not load: {exc}"), facts
    return (
        _ok(
            name,
            f"{spec.model_type} at {path}: {_count(params)} parameters ({facts.params_source}), "
            f"{facts.layers} layers, hidden {facts.hidden}, {facts.kv_heads} KV heads x {facts.head_dim}, "
            f"image side multiple {spec.factor}",
        ),
        facts,
    )


# -------------------------------------------------------------------------------------------- data


@dataclass
class DataFacts:
    sample_rows: int = 0
    max_text_tokens: int = 0
    median_prompt_tokens: int = 0
    filtered_long: int = 0
    bad_rows: int = 0


def check_data(cfg: Config, facts: ModelFacts | None, sample_rows: int = 256) -> tuple[Check, DataFacts]:
    """Every file's schema (the pipeline's own column rules), then the first ``sample_rows`` rows of the first train
    file through the real loader (``RecordTable`` with the model's prompt builder)."""
    from ivgr_dist.data.dataset import DataError, read_parquet
    from ivgr_dist.data.schema import column_problem

    name, out = "data", DataFacts()
    files = [*cfg.data.train_files, *cfg.data.val_files]
    missing = [f for f in files if not Path(f).is_file()]
    if missing:
        if cfg.data.make_synthetic_if_missing:
            return _skip(name, f"{missing[0]} is missing; the run generates the synthetic set there"), out
        return _fail(name, f"data file {missing[0]} does not exist (data.train_files / data.val_files)"), out
    rows = {}
    for f in files:
        try:
            schema = read_parquet(f, schema_only=True)
        except Exception as exc:  # noqa: BLE001 - unreadable file: this check's finding
            return _fail(name, f"{f}: not a readable parquet file: {exc}"), out
        problem = column_problem(schema)
        if problem is None and "answer" not in schema.names:
            problem = f"no 'answer' column (columns: {schema.names})"
        if problem is None and not {"problem", "query"} & set(schema.names):
            problem = f"needs a 'problem' or 'query' column (columns: {schema.names})"
        if problem is not None:
            return _fail(name, f"{f}: {problem}"), out
        import pyarrow.parquet as pq

        rows[f] = pq.ParquetFile(f).metadata.num_rows
    summary = f"{len(files)} file(s) readable with the expected columns ({sum(rows.values())} rows)"
    if facts is None or facts.tokenizer is None or sample_rows <= 0:
        return _ok(name, summary + "; no sample measured (no model to build prompts with)"), out
    try:
        table = _sample_table(cfg, facts, Path(cfg.data.train_files[0]), sample_rows)
    except DataError as exc:
        return _fail(name, f"a sample of {cfg.data.train_files[0]}: {exc}"), out
    out.sample_rows = table.num_rows
    out.bad_rows = table.counts["data/bad_rows/total"]
    out.filtered_long = sum(table.counts[f"data/filtered_long/{s}"] for s in ("grounded", "textual", "single"))
    out.max_text_tokens, out.median_prompt_tokens = _prompt_lengths(cfg, table)
    detail = (
        f"{summary}; sample of {out.sample_rows} rows of {cfg.data.train_files[0]}: {out.bad_rows} bad, "
        f"{out.filtered_long} prompt(s) too long for data.max_prompt_length={cfg.data.max_prompt_length}, "
        f"median prompt {out.median_prompt_tokens} tokens"
    )
    if out.filtered_long:
        return _warn(name, detail), out
    return (_warn if out.bad_rows else _ok)(name, detail), out


def _sample_table(cfg: Config, facts: ModelFacts, path: Path, n: int):
    """The first ``n`` rows of ``path`` through ``RecordTable`` (a copy in a temp dir; images resolved as they
    would be from the original file)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ivgr_dist.data.dataset import RecordTable
    from ivgr_dist.data.prompts import PromptBuilder

    pf = pq.ParquetFile(path)
    batch = next(pf.iter_batches(batch_size=n), None)
    data = replace(cfg.data, max_bad_row_fraction=1.0)
    if cfg.data.image_root is None:  # relative image paths are relative to the data file
        data = replace(data, image_root=str(path.parent), allow_outside_image_root=True)
    builder = PromptBuilder(facts.tokenizer, data, factor=facts.factor, box_coords=_box_coords(facts.family))
    with tempfile.TemporaryDirectory(prefix="ivgr-preflight-") as tmp:
        sample = Path(tmp) / "sample.parquet"
        pq.write_table(pa.Table.from_batches([batch]) if batch is not None else pf.read().slice(0, 0), sample)
        return RecordTable([sample], data, builder, progress=False, max_images=cfg.rollout.engine.max_images_per_prompt)


def _box_coords(family: str) -> str:
    from ivgr_dist.models.family import BOX_COORDS

    return BOX_COORDS.get(family, "pixels")


def _prompt_lengths(cfg: Config, table, limit: int = 64) -> tuple[int, int]:
    """(longest text part of any stream's prompt, template included; median full prompt) over the first
    ``limit`` usable records of the sample, built as the run builds them (images loaded and resized)."""
    builder = table.builder
    ids = sorted([*table.paired_ids, *table.single_ids])[:limit]
    items = [(i, s) for i in ids for s in table.streams(i)]
    texts = 0
    for i, s in items:
        texts = max(texts, len(builder.token_ids([builder.render(table.record(i), s)])[0]))
    full = sorted(p.num_prompt_tokens for p in table.prompts(items))
    return texts, (full[len(full) // 2] if full else 0)


# ------------------------------------------------------------------------------------ token budget


def image_tokens_at_max(facts: ModelFacts, cfg: Config) -> int:
    """Tokens of one image at ``data.max_pixels`` (a square one: the most a resize can keep)."""
    from ivgr_dist.data.image import smart_resize

    side = int(math.isqrt(cfg.data.max_pixels))
    h, w = smart_resize(side, side, factor=facts.factor, min_pixels=cfg.data.min_pixels, max_pixels=cfg.data.max_pixels)
    return (h // facts.factor) * (w // facts.factor)


def check_token_budget(cfg: Config, facts: ModelFacts | None, data: DataFacts) -> Check:
    name = "token budget"
    if facts is None or facts.tokenizer is None:
        return _skip(name, "no model to count tokens with")
    images = cfg.rollout.engine.max_images_per_prompt
    per_image = image_tokens_at_max(facts, cfg)
    text = data.max_text_tokens or _template_tokens(cfg, facts)
    longest = text + images * (per_image - 1)
    where = "the sample's longest text" if data.max_text_tokens else "the prompt template"
    limit = cfg.data.max_prompt_length
    head = (
        f"{facts.family}: an image at data.max_pixels={cfg.data.max_pixels} is {per_image} tokens "
        f"({facts.factor}x{facts.factor} pixels each), x {images} per prompt, plus {text} tokens of {where} = "
        f"{longest}"
    )
    if longest > limit:
        return _fail(
            name,
            f"{head} > data.max_prompt_length={limit}: prompts with the largest images would be dropped as too long "
            f"(data/filtered_long/*). Raise data.max_prompt_length to >= {longest} (and "
            f"rollout.engine.max_model_len to >= {longest} + rollout.max_response_length) or lower data.max_pixels",
        )
    need = limit + cfg.rollout.max_response_length
    return _ok(
        name,
        f"{head} <= data.max_prompt_length={limit}; + rollout.max_response_length={cfg.rollout.max_response_length}"
        f" = {need} <= rollout.engine.max_model_len={cfg.rollout.engine.max_model_len}",
    )


def _template_tokens(cfg: Config, facts: ModelFacts) -> int:
    """Tokens of the longest stream's prompt for a one-line question (template and instructions)."""
    from ivgr_dist.data.prompts import PromptBuilder

    builder = PromptBuilder(facts.tokenizer, cfg.data, factor=facts.factor, box_coords=_box_coords(facts.family))
    record = {"problem": "<image>What is shown?", "images": ["x.png"], "question_type": ""}
    return max(len(builder.token_ids([builder.render(record, s)])[0]) for s in ("grounded", "textual"))


# -------------------------------------------------------------------------------------------- memory


def check_kv_cache(
    cfg: Config, facts: ModelFacts | None, data: DataFacts, device_bytes: int | None, gpus: bool
) -> Check:
    """Per engine: KV tokens that fit against ``max_model_len`` and ``max_num_seqs`` expected sequences."""
    name, eng, tp = "kv cache", cfg.rollout.engine, cfg.rollout.tensor_parallel_size
    if facts is None or not facts.layers:
        return _skip(name, "no model dimensions")
    kv_dtype = _dtype_bytes(cfg.model.dtype)
    per_token = 2 * facts.layers * facts.kv_heads * facts.head_dim * kv_dtype
    if gpus:
        if device_bytes is None:
            return _skip(name, "device memory unknown: no GPU on the driver or in a Ray task; declare it with "
                         "--device-memory-gib")  # fmt: skip
        weights = facts.params * _dtype_bytes(cfg.model.dtype)
        act = eng.max_num_batched_tokens or 2048
        act_bytes = act * (4 * facts.hidden + 2 * facts.intermediate // tp) * 2
        budget = tp * (device_bytes * eng.gpu_memory_utilization - VLLM_GPU_RESERVE) - weights - act_bytes
        how = (
            f"{tp} x {device_bytes / GIB:.0f} GiB x gpu_memory_utilization {eng.gpu_memory_utilization:g} - "
            f"{tp} x {VLLM_GPU_RESERVE / GIB:.1f} GiB reserve - {weights / GIB:.1f} GiB weights - "
            f"{act_bytes / GIB:.1f} GiB activations"
        )
    else:
        budget = eng.cpu_kvcache_space_gb * GIB
        how = f"rollout.engine.cpu_kvcache_space_gb={eng.cpu_kvcache_space_gb}"
    tokens = int(max(budget, 0) // per_token)
    expected = (data.median_prompt_tokens or cfg.data.max_prompt_length // 2) + cfg.rollout.max_response_length
    seqs = tokens // max(expected, 1)
    detail = (
        f"per engine {how} = {max(budget, 0) / GIB:.1f} GiB of KV, {per_token} bytes per token: "
        f"{tokens} tokens, {seqs} sequences of ~{expected} tokens (median prompt + max_response_length)"
    )
    if tokens < eng.max_model_len:
        return _fail(
            name,
            f"{detail} < rollout.engine.max_model_len={eng.max_model_len}: vLLM refuses to start. Raise "
            "gpu_memory_utilization or tensor_parallel_size, or lower max_model_len",
        )
    if seqs < eng.max_num_seqs:
        return _warn(
            name,
            f"{detail}; max_num_seqs={eng.max_num_seqs}: vLLM runs ~{seqs} at once and queues (or preempts) the rest",
        )
    return _ok(name, f"{detail} >= max_num_seqs={eng.max_num_seqs}")


def learner_bytes_per_rank(cfg: Config, facts: ModelFacts) -> tuple[int, str]:
    """Estimated peak device bytes of one learner rank and how it was counted."""
    lc, n = cfg.learner, max(cfg.learner.num_ranks, 1)
    bf16 = lc.precision in ("bf16", "auto")
    act_dtype = 2 if bf16 else 4
    state = 16 * facts.params // n  # fp32 parameters + gradients + AdamW's two moments, sharded
    gathered = facts.largest_layer_params * (2 if bf16 else 4) * 2  # this layer and the next one's prefetch
    t = lc.micro_batch_tokens
    per_layer_full = t * (10 * facts.hidden + 3 * facts.intermediate) * act_dtype
    if lc.gradient_checkpointing:
        acts = facts.layers * t * facts.hidden * act_dtype + per_layer_full
    else:
        acts = facts.layers * per_layer_full
    logits = t * facts.vocab * (act_dtype + 4)  # the lm head's output and its gradient / fp32 chunk
    total = int((state + gathered + acts + logits) * 1.1)
    how = (
        f"sharded fp32 params+grads+AdamW {state / GIB:.1f} GiB, gathered layers {gathered / GIB:.1f}, activations "
        f"{acts / GIB:.1f} ({'checkpointed' if lc.gradient_checkpointing else 'not checkpointed'}, "
        f"{t} tokens), logits {logits / GIB:.1f}, +10%"
    )
    return total, how


def check_learner_memory(cfg: Config, facts: ModelFacts | None, device_bytes: int | None, gpus: bool) -> Check:
    name = "learner memory"
    if facts is None or not facts.params:
        return _skip(name, "no model dimensions")
    if not gpus:
        return _skip(name, "CPU learner ranks: host memory, not checked")
    if device_bytes is None:
        return _skip(name, "device memory unknown: declare it with --device-memory-gib")
    need, how = learner_bytes_per_rank(cfg, facts)
    detail = f"per rank of {cfg.learner.num_ranks}: ~{need / GIB:.1f} GiB ({how}) of {device_bytes / GIB:.0f} GiB"
    if need > device_bytes:
        return _fail(
            name,
            f"{detail}: does not fit. Add ranks (learner.num_ranks), lower learner.micro_batch_tokens or turn on "
            "learner.gradient_checkpointing",
        )
    return (_warn if need > 0.9 * device_bytes else _ok)(name, detail)


# ------------------------------------------------------------------------------------- cluster side


def role_bundles(cfg: Config, gpus: bool) -> dict[str, list[list[dict[str, float]]]]:
    """Each role's placement groups (a list of bundles each), as the run reserves them."""
    from ivgr_dist.runtime.placement import engine_bundles, learner_bundles, with_resources

    roles: dict[str, list[list[dict[str, float]]]] = {
        "learner group": [learner_bundles(cfg.learner, gpus)],
        "rollout engine": [
            engine_bundles(cfg.rollout.tensor_parallel_size, gpus, 1.0, dict(cfg.rollout.resources) or None)
            for _ in range(cfg.rollout.num_engines)
        ],
    }
    if cfg.reward.num_workers:
        worker = with_resources({"CPU": float(cfg.reward.cpus_per_worker)}, dict(cfg.reward.resources) or None)
        roles["reward worker"] = [[worker] for _ in range(cfg.reward.num_workers)]
    judge = cfg.reward.judge
    if judge.backend == "engine":
        roles["judge engine"] = [  # judge engines run at tensor parallel 1 (rollout.fleet.FleetSpec)
            engine_bundles(1, gpus, 1.0, dict(judge.resources) or None) for _ in range(judge.num_engines)
        ]
    return roles


def check_resources(cfg: Config, nodes: list[dict[str, float]], gpus: bool) -> Check:
    """Totals: every role's sum against the cluster's; every single group against the largest node (a STRICT_PACK
    engine must fit on one node). ``nodes``: each node's total resources."""
    name = "resources"
    if not nodes:
        return _skip(name, "not connected to a Ray cluster")
    roles = role_bundles(cfg, gpus)
    need: dict[str, float] = {}
    problems = []
    for role, groups in roles.items():
        for g, bundles in enumerate(groups):
            for b in bundles:
                for k, v in b.items():
                    need[k] = need.get(k, 0.0) + v
            if role in ("rollout engine", "judge engine"):
                group_need = sum_bundles(bundles)
                if not any(all(n.get(k, 0.0) >= v for k, v in group_need.items()) for n in nodes):
                    problems.append(f"{role} {g} needs {_fmt(group_need)} on ONE node; no node has that")
                    break
    have = sum_bundles(nodes)
    short = {k: v for k, v in need.items() if have.get(k, 0.0) < v}
    per_node = "; ".join(f"node {i}: {_fmt(n)}" for i, n in enumerate(nodes))
    asked = ", ".join(f"{role} x{len(groups)}" for role, groups in roles.items())
    if short:
        problems.insert(
            0, "the run needs " + ", ".join(f"{k} {v:g} (cluster has {have.get(k, 0.0):g})" for k, v in short.items())
        )
    if problems:
        return _fail(name, f"{'; '.join(problems)}. Roles: {asked}. Cluster: {per_node}")
    return _ok(name, f"needs {_fmt(need)} for {asked}; cluster {len(nodes)} node(s): {per_node}")


def _fmt(res: dict[str, float]) -> str:
    keys = sorted(k for k in res if not k.startswith(("node:", "memory", "object_store", "accelerator_type")))
    return ", ".join(f"{k} {res[k]:g}" for k in keys if "_group_" not in k) or "nothing"


def cluster_nodes() -> list[dict[str, Any]]:
    """Alive nodes: id, address, total resources ([] when this process has not joined Ray)."""
    import ray

    if not ray.is_initialized():
        return []

    return [
        {"id": n["NodeID"], "ip": n.get("NodeManagerAddress", "?"), "resources": dict(n.get("Resources", {}))}
        for n in ray.nodes()
        if n.get("Alive")
    ]


def _node_name(node: dict[str, Any]) -> str:
    """``ip/id8``: the address, and the id's first characters (several nodes may share an address)."""
    return f"{node['ip']}/{node['id'][:8]}"


def check_placement(cfg: Config, gpus: bool, timeout_s: float = 20.0) -> tuple[Check, list]:
    """Reserve the run's groups for real (learners first, then each engine), read which node each bundle got,
    release them. Returns the check and the reserved ``(label, pg, bundle)`` targets for the storage probe (the
    caller releases them with :func:`release`)."""
    import ray

    from ivgr_dist.runtime.placement import PlacementError, reserve

    name = "placement"
    ips = {n["id"]: _node_name(n) for n in cluster_nodes()}
    roles = role_bundles(cfg, gpus)
    pgs, targets, where = [], [], []
    try:
        for role, strategy in (
            ("learner group", "PACK"),
            ("rollout engine", "STRICT_PACK"),
            ("judge engine", "STRICT_PACK"),
        ):
            for g, bundles in enumerate(roles.get(role, [])):
                what = role if role == "learner group" else f"{role} {g}"
                try:
                    pg = reserve(bundles, strategy, what, timeout_s)
                except PlacementError as exc:
                    return _fail(name, f"{exc}. Reserved so far: {'; '.join(where) or 'nothing'}"), pgs
                pgs.append(pg)
                table = ray.util.placement_group_table(pg)
                nodes = [ips.get(table["bundles_to_node_id"][b], "?") for b in range(len(bundles))]
                if role == "learner group":
                    targets += [(f"learner rank {r}", pg, r) for r in range(len(bundles))]
                    where.append(f"learner ranks 0-{len(bundles) - 1} on {len(set(nodes))} node(s) {_spans(nodes)}")
                else:
                    targets.append((what, pg, 0))
                    where.append(f"{what} on {nodes[0]}")
        n_nodes = _min_nodes_for(roles["learner group"][0], [n["resources"] for n in cluster_nodes()])
        detail = "; ".join(where)
        used = len(set(_nodes_of(ray, pgs[0]))) if pgs else 0
        if used > n_nodes:
            return _warn(name, f"{detail}: the learner ranks span {used} nodes, {n_nodes} would do"), (pgs, targets)
        return _ok(name, detail), (pgs, targets)
    except BaseException:
        release(pgs)
        raise


def _nodes_of(ray, pg) -> list[str]:
    table = ray.util.placement_group_table(pg)
    return list(table["bundles_to_node_id"].values())


def _spans(nodes: list[str]) -> str:
    """``ranks a-b on ip`` runs."""
    out, start = [], 0
    for i in range(1, len(nodes) + 1):
        if i == len(nodes) or nodes[i] != nodes[start]:
            out.append(f"{start}-{i - 1}@{nodes[start]}" if i - 1 > start else f"{start}@{nodes[start]}")
            start = i
    return "(" + ", ".join(out) + ")"


def _min_nodes_for(bundles: list[dict[str, float]], nodes: list[dict[str, float]]) -> int:
    """Fewest nodes of this cluster that could hold ``bundles`` (largest nodes first, by the scarcest resource)."""
    need = sum_bundles(bundles)
    key = next((k for k in ("GPU",) if k in need), "CPU")
    per = bundles[0].get(key, 1.0) or 1.0
    caps = sorted((int(n.get(key, 0.0) // per) for n in nodes), reverse=True)
    left, used = len(bundles), 0
    for c in caps:
        if left <= 0:
            break
        left -= c
        used += 1
    return max(used, 1)


def release(reserved) -> None:
    from ray.util.placement_group import remove_placement_group

    pgs = reserved[0] if isinstance(reserved, tuple) else reserved
    for pg in pgs or []:
        try:
            remove_placement_group(pg)
        except Exception as exc:  # noqa: BLE001 - teardown
            log.debug("removing a preflight placement group: %s", exc)


def check_storage(cfg: Config, targets: list) -> Check:
    from ivgr_dist.runtime.storage import StorageError, StorageProbe

    name = "storage"
    if not targets:
        return _skip(name, "no placement to probe from")
    try:
        probe = StorageProbe(cfg.trainer.output_dir, cfg.model.path if Path(cfg.model.path).exists() else None)
    except OSError as exc:
        return _fail(name, f"trainer.output_dir={cfg.trainer.output_dir}: the driver cannot write there: {exc}")
    try:
        results = probe.probe(targets)
    except StorageError as exc:
        return _fail(name, str(exc))
    finally:
        probe.close()
    hosts = sorted({f"{r['ip']}/{r['node_id'][:8]}" for r in results})
    return _ok(name, f"trainer.output_dir and model.path seen and written from {len(results)} place(s) on {hosts}")


def check_judge(cfg: Config, timeout_s: float = 60.0) -> Check:
    """``openai``: the judge's own start-up check (one real request per endpoint) in a Ray task placed as a reward
    worker is (``reward.resources``), so the key must be there too."""
    import os

    name, judge = "judge", cfg.reward.judge
    if judge.backend != "openai":
        return _skip(name, f"reward.judge.backend={judge.backend}: no server to reach (started by the run)")
    import ray

    def probe(judge_cfg, driver_has_key):
        import asyncio
        import socket

        from ivgr_dist.reward.judge import JudgeUnavailable, check_judge, make_judge

        try:
            asyncio.run(check_judge(make_judge(judge_cfg), driver_has_key))
        except JudgeUnavailable as exc:
            return f"from {socket.gethostname()}: {exc}"
        return None

    has_key = bool(os.environ.get(judge.api_key_env)) if judge.api_key_env and not judge.api_key_file else None
    task = ray.remote(num_cpus=0, max_retries=0, resources=dict(cfg.reward.resources) or None)(probe)
    ref = task.remote(judge, has_key)
    ready, _ = ray.wait([ref], timeout=timeout_s)
    if not ready:
        ray.cancel(ref, force=True)
        return _fail(name, f"the judge check did not finish within {timeout_s:g} s")
    problem = ray.get(ref)
    if problem:
        return _fail(name, problem)
    return _ok(name, f"{judge.urls} answered a test request from a reward worker's node (key present there)")


def check_ray(nodes: list[dict[str, Any]]) -> Check:
    name = "ray"
    if not nodes:
        return _skip(name, "not connected to a Ray cluster")
    try:
        from ray._private.authentication.authentication_utils import is_token_auth_enabled

        token = is_token_auth_enabled()
    except Exception:  # noqa: BLE001 - an older Ray has no token authentication
        token = False
    names = [_node_name(n) for n in nodes]
    detail = f"{len(nodes)} node(s) {names}; authentication: {'token' if token else 'disabled'}"
    if not token and len(nodes) > 1:
        return _warn(
            name,
            f"{detail}: anyone who reaches the cluster's ports can run code on it; start it with RAY_AUTH_MODE=token",
        )
    return _ok(name, detail)


# --------------------------------------------------------------------------------------------- driver


def device_memory(declared_gib: float | None, gpus: bool, timeout_s: float = 30.0) -> int | None:
    """Bytes of one device: declared, else read from a GPU on the driver, else from a one-GPU Ray task."""
    if declared_gib is not None:
        return int(declared_gib * GIB)
    if not gpus:
        return None
    import torch

    if torch.cuda.is_available():
        return int(torch.cuda.get_device_properties(0).total_memory)
    import ray

    def read() -> int:
        import torch

        return int(torch.cuda.get_device_properties(0).total_memory)

    ref = ray.remote(num_gpus=1, num_cpus=0, max_retries=0)(read).remote()
    ready, _ = ray.wait([ref], timeout=timeout_s)
    if not ready:
        ray.cancel(ref, force=True)
        return None
    try:
        return int(ray.get(ref))
    except Exception as exc:  # noqa: BLE001 - a node without CUDA torch: memory unknown
        log.warning("could not read device memory in a Ray task: %s", exc)
        return None


def _gpus_in(nodes: list[dict[str, Any]]) -> bool:
    return any(n["resources"].get("GPU", 0) > 0 for n in nodes)


def fast_checks(cfg: Config, device_memory_gib: float | None = None) -> list[Check]:
    """The checks that need no reservation, request or probe (``train`` runs these first): ray, resources against
    the cluster's totals, model, data schemas, token budget, and the memory checks where device memory is known."""
    nodes = cluster_nodes()
    gpus = _gpus_in(nodes)
    model_check, facts = check_model(cfg)
    data_check, data = check_data(cfg, facts, sample_rows=0)
    device = device_memory(device_memory_gib, gpus, timeout_s=0) if (device_memory_gib or _cuda_here()) else None
    resources = check_resources(cfg, [n["resources"] for n in nodes], gpus)
    if resources.blocker:  # the run waits for resources (nodes that join, an autoscaler), with its own deadline
        resources = _warn(resources.name, f"{resources.detail} (the run waits up to the placement timeouts)")
    return [
        check_ray(nodes),
        resources,
        model_check,
        data_check,
        check_token_budget(cfg, facts, data),
        check_kv_cache(cfg, facts, data, device, gpus),
        check_learner_memory(cfg, facts, device, gpus),
    ]


def _cuda_here() -> bool:
    import torch

    return torch.cuda.is_available()


def run_preflight(
    cfg: Config,
    device_memory_gib: float | None = None,
    sample_rows: int = 256,
    placement_timeout_s: float = 20.0,
    judge: bool = True,
) -> list[Check]:
    """Every check (module docstring), in order; Ray must be initialised (``init_ray``)."""
    nodes = cluster_nodes()
    gpus = _gpus_in(nodes)
    checks = [check_ray(nodes), check_resources(cfg, [n["resources"] for n in nodes], gpus)]
    reserved: Any = ([], [])
    if checks[-1].blocker:
        checks += [_skip("placement", "resources missing"), _skip("storage", "no placement")]
    else:
        placement, reserved = check_placement(cfg, gpus, placement_timeout_s)
        checks.append(placement)
        try:
            checks.append(check_storage(cfg, reserved[1] if isinstance(reserved, tuple) else []))
        finally:
            release(reserved)
    model_check, facts = check_model(cfg)
    data_check, data = check_data(cfg, facts, sample_rows)
    device = device_memory(device_memory_gib, gpus)
    checks += [
        model_check,
        data_check,
        check_token_budget(cfg, facts, data),
        check_kv_cache(cfg, facts, data, device, gpus),
        check_learner_memory(cfg, facts, device, gpus),
        check_judge(cfg) if judge else _skip("judge", "not asked for (--no-judge)"),
    ]
    return checks
