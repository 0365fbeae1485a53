"""``ivgr-dist eval``: accuracy of a model on iVGR-layout parquet files, per datasource, both streams side by side.

The engine is the training stack itself: the records and prompts come from the data pipeline
(:func:`~ivgr_dist.data.pipeline.build_pipeline`), generation from the same
:class:`~ivgr_dist.rollout.pool.RolloutPool` (engines from ``cfg.rollout``), scoring from the same rule rewards
and judge (:class:`~ivgr_dist.reward.scorer.InProcessScorer` with ``cfg.reward.judge``; ``reward.recipe_exact``
selects the recipe's box rules, as in training). Greedy decoding (temperature 0, one sample) by default;
``--sample`` uses ``rollout.temperature`` and ``rollout.n``.

Which prompts run: a record with target boxes (an A/B pair in training) is asked as T (textual) and/or
G (grounded) per ``--mode``; a record without boxes is asked once with the ``single`` prompt in every
mode and reported in its own column S. Streams that did not run show ``-``.

Where this departs from training:

- Scoring always runs in the driver (``reward.num_workers`` is ignored), and no consistency reference is ever
  stored, so textual rollouts never cost consistency judge calls (consistency is not an eval metric; it is 0 in
  ``Rollout.rewards``). Accuracy is the training reward's accuracy, judge included for answers the rules cannot
  decide; judge failures count in ``eval.json``'s ``judge`` block and score 0.
- Records whose prompt exceeds ``data.max_prompt_length``, and bad rows with ``data.bad_rows=skip``, are not
  evaluated; their counts are in ``eval.json``'s ``data`` block and the Markdown names them.

Outputs (``--out``): ``eval.json`` (settings, tables, counts), ``eval.md`` (the tables, also printed) and
``predictions.jsonl`` (one line per response: record, stream, answer, extracted answer, reward components).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from ivgr_dist.config import Config, ConfigError, JudgeConfig, RewardConfig
from ivgr_dist.reward.scorer import InProcessScorer
from ivgr_dist.types import Rollout

log = logging.getLogger(__name__)

__all__ = [
    "COLUMNS",
    "MODES",
    "EvalScorer",
    "EvalTable",
    "add_arguments",
    "cmd_eval",
    "eval_prompts",
    "render_markdown",
    "run_eval",
    "summarize",
]

MODES = ("textual", "grounded", "both")
COLUMNS = (("textual", "T"), ("grounded", "G"), ("single", "S"))
"""Stream of each table column and its label, in column order."""
STREAM_METRICS = {
    "textual": ("accuracy", "format", "response_tokens", "truncated"),
    "grounded": ("accuracy", "format", "box_iou", "box_valid", "response_tokens", "truncated"),
    "single": ("accuracy", "format", "response_tokens", "truncated"),
}
"""Per-record means reported for each stream (``records`` and ``samples`` are counts)."""
_ROWS = (
    ("records", "records"),
    ("accuracy", "accuracy"),
    ("format", "answer format"),
    ("box_iou", "box IoU (mean)"),
    ("box_valid", "box_valid"),
    ("response_tokens", "response tokens (mean)"),
    ("truncated", "truncated at max length"),
)
RECORDS_PER_CHUNK = 256
"""Records whose prompts (resized images included) are held in memory at once."""
_OVERRIDE = re.compile(r"^[A-Za-z_][\w]*(\.[\w]+)+=")


# ------------------------------------------------------------------------------------- aggregation


class EvalTable:
    """Per-datasource, per-stream means over records (a record's samples are averaged first). Pure."""

    def __init__(self) -> None:
        # (datasource, stream, original_idx) -> [samples, sums per metric]
        self._records: dict[tuple[str, str, int], list] = {}

    def add(self, rollout: Rollout) -> None:
        p = rollout.prompt
        values = {
            "accuracy": rollout.rewards.get("accuracy", 0.0),
            "format": rollout.rewards.get("format", 0.0),
            "response_tokens": float(len(rollout.response_ids)),
            "truncated": float(rollout.finish_reason == "length"),
        }
        if p.stream == "grounded":
            values["box_iou"] = rollout.rewards.get("box_iou", 0.0)
            values["box_valid"] = rollout.rewards.get("box_valid", 0.0)
        entry = self._records.setdefault((p.datasource, p.stream, p.original_idx), [0, defaultdict(float)])
        entry[0] += 1
        for k, v in values.items():
            entry[1][k] += float(v)

    def result(self) -> dict[str, Any]:
        """``{"datasources": {ds: {stream: metrics}}, "all": {stream: metrics}}``; absent streams are omitted.

        ``metrics``: ``records``, ``samples`` and the means of :data:`STREAM_METRICS` over records. ``all`` is the
        micro-average over every record of that stream, whatever its datasource.
        """
        per: dict[tuple[str, str], list[dict[str, float]]] = defaultdict(list)
        samples: dict[tuple[str, str], int] = defaultdict(int)
        for (ds, stream, _), (n, sums) in self._records.items():
            means = {k: v / n for k, v in sums.items()}
            for key in ((ds, stream), ("\0all", stream)):
                per[key].append(means)
                samples[key] += n
        out: dict[str, Any] = {"datasources": {}, "all": {}}
        for (ds, stream), rows in sorted(per.items()):
            metrics: dict[str, float] = {"records": len(rows), "samples": samples[(ds, stream)]}
            for name in STREAM_METRICS[stream]:
                metrics[name] = sum(r[name] for r in rows) / len(rows)
            if ds == "\0all":
                out["all"][stream] = metrics
            else:
                out["datasources"].setdefault(ds, {})[stream] = metrics
        return out


def summarize(rollouts: Iterable[Rollout]) -> dict[str, Any]:
    """:meth:`EvalTable.result` over scored rollouts (``Rollout.rewards`` set by the scorer)."""
    table = EvalTable()
    for r in rollouts:
        table.add(r)
    return table.result()


def _cell(metrics: dict[str, float] | None, name: str) -> str:
    if metrics is None or name not in metrics:
        return "-"
    v = metrics[name]
    if name in ("records", "samples"):
        return str(int(v))
    if name == "response_tokens":
        return f"{v:.1f}"
    return f"{v:.3f}"


def _table(title: str, streams: dict[str, dict[str, float]]) -> list[str]:
    columns = [(s, label) for s, label in COLUMNS if s != "single" or "single" in streams]
    lines = [f"### {title}", "", "| metric | " + " | ".join(f"{label} ({s})" for s, label in columns) + " |"]
    lines.append("|---|" + "---:|" * len(columns))
    for name, label in _ROWS:
        lines.append(f"| {label} | " + " | ".join(_cell(streams.get(s), name) for s, _ in columns) + " |")
    return lines + [""]


def render_markdown(tables: dict[str, Any], header: Sequence[str] = ()) -> str:
    """One Markdown table per datasource (sorted), then ``all``; columns T, G, and S when the table has singles."""
    lines = ["# ivgr-dist eval", ""]
    lines += [f"- {h}" for h in header]
    if header:
        lines.append("")
    for ds, streams in sorted(tables["datasources"].items()):
        lines += _table(f"`{ds}`", streams)
    lines += _table("all (micro-average over records)", tables["all"])
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------- running


class EvalScorer(InProcessScorer):
    """The in-process scorer without a reference table: consistency is never judged in eval. A judge failure
    scores 0 (``reward.judge.on_failure`` is set to ``zero``): the tables average over every record, and masking
    is about training's advantages."""

    def __init__(
        self,
        algo,
        judge_cfg: JudgeConfig | None = None,
        judge=None,
        recipe_exact: bool = False,
        rule_timeout_s: float = RewardConfig.rule_timeout_s,
    ):
        cfg = replace(judge_cfg or JudgeConfig(), on_failure="zero")
        super().__init__(algo, cfg, judge=judge, recipe_exact=recipe_exact, rule_timeout_s=rule_timeout_s)

    def _offer_reference(self, record_key: int, candidate) -> bool:
        return False


def eval_prompts(records, mode: str, max_records: int | None = None) -> list[tuple[int, str]]:
    """``(original_idx, stream)`` items in record order: paired records per ``mode``, others as ``single``."""
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: must be one of {list(MODES)}")
    paired = set(records.paired_ids)
    ids = sorted([*records.paired_ids, *records.single_ids])
    if max_records is not None:
        ids = ids[:max_records]
    streams = {"textual": ("textual",), "grounded": ("grounded",), "both": ("grounded", "textual")}[mode]
    return [(i, s) for i in ids for s in (streams if i in paired else ("single",))]


def eval_config(cfg: Config, model_dir: str | Path, data_files: Sequence[str | Path]) -> Config:
    """``cfg`` pointed at the model and data; nothing is generated (missing files are errors)."""
    files = [str(f) for f in data_files]
    if not files:
        raise ConfigError("--data: at least one parquet file is needed")
    for f in files:
        if not Path(f).is_file():
            raise FileNotFoundError(f"--data {f!r}: no such file")
    model = replace(cfg.model, path=str(model_dir), make_tiny_if_missing=False)
    data = replace(cfg.data, train_files=files, val_files=files, make_synthetic_if_missing=False)
    return replace(cfg, model=model, data=data)


def _prediction(r: Rollout) -> dict[str, Any]:
    from ivgr_dist.reward.rules import extract_answer

    p = r.prompt
    return {
        "original_idx": p.original_idx,
        "datasource": p.datasource,
        "stream": p.stream,
        "sample": r.sample_idx,
        "answer": p.answer,
        "extracted": extract_answer(r.response_text),
        "rewards": {k: v for k, v in r.rewards.items() if k != "consistency"},
        "response_tokens": len(r.response_ids),
        "finish_reason": r.finish_reason,
        "response": r.response_text,
    }


def run_eval(
    cfg: Config,
    model_dir: str | Path,
    data_files: Sequence[str | Path],
    mode: str,
    out_dir: str | Path,
    *,
    temperature: float = 0.0,
    n: int = 1,
    max_records: int | None = None,
) -> dict[str, Any]:
    """Generate, score and tabulate; writes ``eval.json``, ``eval.md``, ``predictions.jsonl``; returns eval.json's dict.

    Starts a local Ray cluster (or joins ``trainer.ray_address`` / RAY_ADDRESS) unless Ray is already
    initialised; shuts down only a cluster it started.
    """
    import ray

    from ivgr_dist.data.pipeline import build_pipeline
    from ivgr_dist.runtime.startup import cluster_has_gpus, init_ray

    if mode not in MODES:
        raise ConfigError(f"--mode {mode!r}: must be one of {list(MODES)}")
    if n < 1 or temperature < 0:
        raise ConfigError(f"n={n}, temperature={temperature}: need n >= 1 and temperature >= 0")
    if temperature == 0 and n > 1:
        raise ConfigError(f"rollout.n={n} with temperature 0: greedy decoding takes one sample (vLLM rejects n > 1)")
    if max_records is not None and max_records < 1:
        raise ConfigError(f"--max-records {max_records}: must be >= 1")
    cfg = eval_config(cfg, model_dir, data_files)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    data = build_pipeline(
        cfg.model, cfg.data, "val", sampler=False, max_images=cfg.rollout.engine.max_images_per_prompt
    )
    items = eval_prompts(data.records, mode, max_records)
    started_ray = not ray.is_initialized()
    init_ray(cfg)
    pool = scorer = None
    try:
        from ivgr_dist.rollout.pool import PoolStats, RolloutPool
        from ivgr_dist.sync import engine_backend

        use_gpus = cluster_has_gpus()
        # No weight sync in eval; the engines still need a weight-transfer backend name (collective engines
        # wait for a group the driver never forms, which is fine: they only generate).
        # the judge first: one that cannot work (JudgeUnavailable) stops the eval before its engines start
        scorer = EvalScorer(
            cfg.algorithm,
            cfg.reward.judge,
            recipe_exact=cfg.reward.recipe_exact,
            rule_timeout_s=cfg.reward.rule_timeout_s,
        )
        scorer.check_judge()
        pool = RolloutPool(cfg.model, cfg.rollout, engine_backend(cfg.sync.backend, use_gpus), use_gpus)
        stats = PoolStats()
        table = EvalTable()
        seed = pool.sampling_seed()
        with (out / "predictions.jsonl").open("w") as preds:
            for r in _generate_and_score(data.records, items, pool, scorer, stats, n, temperature, seed):
                table.add(r)
                preds.write(json.dumps(_prediction(r)) + "\n")
        judge = {k: v for k, v in scorer.metrics().items() if k.startswith("judge/")}
    finally:
        if scorer is not None:
            scorer.close()
        if pool is not None:
            pool.shutdown()
        if started_ray:
            ray.shutdown()
    tables = table.result()
    dropped = {k: v for k, v in data.records.metrics().items() if v and ("bad_rows" in k or "filtered_long" in k)}
    result = {
        "model": str(cfg.model.path),
        "data_files": list(cfg.data.val_files),
        "mode": mode,
        "temperature": temperature,
        "n": n,
        "max_response_length": cfg.rollout.max_response_length,
        "max_records": max_records,
        "prompts": len(items),
        "data": data.records.metrics(),
        "judge": judge,
        "rollout_tokens": stats.tokens,
        "seconds": round(time.perf_counter() - t0, 2),
        "tables": tables,
    }
    header = [
        f"model: `{result['model']}`",
        f"data: {', '.join(f'`{f}`' for f in result['data_files'])}",
        f"mode: {mode}; temperature {temperature}, n={n}; max_response_length {cfg.rollout.max_response_length}",
        "columns: T = textual stream, G = grounded stream, S = single prompt (records without target boxes)",
    ]
    if dropped:
        header.append(f"not evaluated: {dropped}")
    if judge.get("judge/failures"):
        header.append(f"judge failures (scored 0): {int(judge['judge/failures'])} of {int(judge['judge/requests'])}")
    markdown = render_markdown(tables, header)
    (out / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "eval.md").write_text(markdown + "\n")
    return result


def _generate_and_score(
    records, items, pool, scorer, stats, n: int, temperature: float, seed: int | None
) -> Iterator[Rollout]:
    """Scored rollouts, chunk by chunk (a record's streams stay in one chunk); a tqdm bar over groups."""
    from tqdm import tqdm

    with tqdm(total=len(items), desc="eval groups", unit="group") as bar:
        start = 0
        while start < len(items):
            end, seen = start, set()
            while end < len(items) and (items[end][0] in seen or len(seen) < RECORDS_PER_CHUNK):
                seen.add(items[end][0])
                end += 1
            prompts = records.prompts(items[start:end])  # a record whose image fails to decode is left out, counted
            bar.update(end - start - len(prompts))
            start = end
            if not prompts:
                continue
            groups = pool.generate(prompts, n=n, temperature=temperature, stats=stats, seed=seed)
            for group in scorer.score_stream(groups, prompts, step=0):
                bar.update(1)
                yield from group


# -------------------------------------------------------------------------------------------- CLI


def add_arguments(sp: argparse.ArgumentParser) -> None:
    """The ``eval`` flags (cli.py adds ``--config``)."""
    sp.add_argument("--model", required=True, help="Hugging Face model directory to evaluate")
    sp.add_argument("--data", required=True, nargs="+", action="extend", metavar="FILE",
                    help="parquet file(s) in the iVGR layout")  # fmt: skip
    sp.add_argument("--mode", choices=MODES, default="both", help="streams of records with target boxes")
    sp.add_argument("--out", default=None, help="output directory (default: <trainer.output_dir>/eval)")
    sp.add_argument("--sample", action="store_true",
                    help="sample with rollout.temperature and rollout.n (default: greedy, one sample)")  # fmt: skip
    sp.add_argument("--max-records", type=int, default=None, help="evaluate only the first N usable records")
    sp.add_argument("overrides", nargs="*", help="dotted overrides, e.g. rollout.max_response_length=1024")


def split_overrides(data: Sequence[str], overrides: Sequence[str]) -> tuple[list[str], list[str]]:
    """``--data a.parquet rollout.n=2`` puts the override into ``--data``; move ``key.sub=value`` items back."""
    files = [d for d in data if not (_OVERRIDE.match(d) and not Path(d).exists())]
    moved = [d for d in data if d not in files]
    return files, [*moved, *overrides]


def cmd_eval(args: argparse.Namespace) -> int:
    """Evaluate a model on parquet file(s) with the training rollout pool; prints the Markdown tables."""
    from ivgr_dist.config import load_config

    files, overrides = split_overrides(args.data, args.overrides)
    cfg = load_config(args.config, overrides)
    temperature, n = (cfg.rollout.temperature, cfg.rollout.n) if args.sample else (0.0, 1)
    out = args.out or str(Path(cfg.trainer.output_dir) / "eval")
    from ivgr_dist.runtime.logs import setup_run_logs

    setup_run_logs(Path(out).resolve())  # the engines' and Ray's output: <out>/logs/ (console with -v)
    run_eval(cfg, args.model, files, args.mode, out, temperature=temperature, n=n, max_records=args.max_records)
    print((Path(out) / "eval.md").read_text(), end="")
    return 0
