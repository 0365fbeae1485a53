"""``ivgr-dist`` command line: one entry point, one sub-command per job.

Every sub-command takes ``--config FILE`` (defaults: the embedded tiny CPU config) followed by
dotted overrides (``data.paired_ratio=0.8``). Configuration errors exit with status 2 and a
message naming the key, the value and the rule.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence

from ivgr_dist.runtime._ext_fix import install as _install_ext_fix

_install_ext_fix()  # before anything imports transformers / vLLM; this process's multiprocessing children inherit it

log = logging.getLogger("ivgr_dist")


def _config(args: argparse.Namespace):
    from ivgr_dist.config import load_config

    return load_config(args.config, args.overrides)


def _run_config(args: argparse.Namespace, before_logs: Callable | None = None):
    """The config of a job that runs on Ray: paths made absolute here, on the driver, before any actor sees
    them; shared paths that landed in this node's copy of the job's working directory are refused.
    ``before_logs(cfg)`` runs before ``<output_dir>/logs/`` is opened (``train --overwrite`` moves it aside)."""
    from ivgr_dist.runtime.logs import setup_run_logs
    from ivgr_dist.runtime.storage import check_not_node_local, resolve_paths

    cfg = _config(args)
    resolved = resolve_paths(cfg)
    check_not_node_local(cfg, resolved)
    args.run_config = resolved  # for the interrupt message (main)
    if before_logs is not None:
        before_logs(resolved)
    setup_run_logs(resolved.trainer.output_dir)
    return resolved


def cmd_show_config(args: argparse.Namespace) -> int:
    from ivgr_dist.config import to_yaml

    print(to_yaml(_config(args)), end="")
    return 0


def cmd_make_tiny_model(args: argparse.Namespace) -> int:
    import dataclasses

    from ivgr_dist.models.tiny import make_tiny_model

    cfg = _config(args)
    tiny = cfg.model.tiny if args.family is None else dataclasses.replace(cfg.model.tiny, family=args.family)
    out = make_tiny_model(args.dir, tiny, overwrite=args.overwrite)
    print(json.dumps({"model_dir": str(out)}))
    return 0


def cmd_make_synthetic(args: argparse.Namespace) -> int:
    from ivgr_dist.data.synthetic import make_synthetic

    cfg = _config(args)
    summary = make_synthetic(args.dir, cfg.data.synthetic, num_records=args.n, seed=args.seed)
    print(json.dumps(summary))
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    """Assets, data validation and one rollout batch of prompts: what a run needs before it starts."""
    import time
    from collections import Counter

    from ivgr_dist.data.pipeline import build_pipeline

    cfg = _config(args)
    t0 = time.perf_counter()
    limit = cfg.rollout.engine.max_images_per_prompt
    train = build_pipeline(cfg.model, cfg.data, "train", max_images=limit)
    val = build_pipeline(cfg.model, cfg.data, "val", sampler=False, max_images=limit)
    prompts = train.next_prompts()
    elapsed = time.perf_counter() - t0
    for stream in ("grounded", "textual", "single"):
        example = next((p for p in prompts if p.stream == stream), None)
        if example is not None:
            print(f"--- {stream} prompt (record {example.original_idx}, {example.num_prompt_tokens} tokens) ---")
            print(example.prompt_text)
            print(f"answer={example.answer!r} targets(resized px)={example.target_boxes}")
    lengths = [p.num_prompt_tokens for p in prompts]
    summary = {
        "model_dir": str(cfg.model.path),
        "train_records": len(train.records),
        "val_records": len(val.records),
        "batch_prompts": len(prompts),
        "batch_streams": dict(Counter(p.stream for p in prompts)),
        "batch_prompt_tokens_max": max(lengths) if lengths else 0,
        "seconds": round(elapsed, 2),
        **train.records.metrics(),
        **train.sampler.metrics(),
    }
    print(json.dumps(summary))
    return 0


def cmd_sft(args: argparse.Namespace) -> int:
    """Supervised warm start on the learner group; writes a model directory (see ivgr_dist.commands.sft)."""
    from ivgr_dist.commands.sft import run_sft
    from ivgr_dist.runtime.startup import init_ray, seed_everything

    cfg = _run_config(args)
    seed_everything(cfg.trainer.seed)
    init_ray(cfg)
    out = run_sft(cfg, overwrite=args.overwrite, command="sft")
    print(json.dumps({"sft_model_dir": str(out), "metrics": cfg.sft_logs_dir}))
    return 0


def _finished(cfg) -> bool:
    """Whether ``train`` would resume from a checkpoint already at ``trainer.max_steps``."""
    from ivgr_dist.driver.checkpoints import latest_checkpoint

    found = latest_checkpoint(cfg.trainer.output_dir) if cfg.trainer.resume else None
    return found is not None and found.step >= cfg.trainer.max_steps


def _fresh_start(cfg, overwrite: bool) -> None:
    """``train --overwrite``: the earlier run's files go to a timestamped sibling (the warm start stays, reused
    unless ``--overwrite-sft``). Without it, ``trainer.resume=false`` in a directory with checkpoints is refused:
    the new run's checkpoints would mix with the old ones (and a later resume could load the old run)."""
    from ivgr_dist.driver import checkpoints

    out = cfg.trainer.output_dir
    if overwrite:
        inputs = [cfg.model.path, *cfg.data.train_files, *cfg.data.val_files, cfg.data.image_root]
        keep = [cfg.sft_model_dir, cfg.sft_logs_dir, *(p for p in inputs if p)]
        aside = checkpoints.move_run_aside(out, keep=keep)
        if aside is not None:
            log.info(
                "--overwrite: moved the earlier run's files (checkpoints, metrics, trained.jsonl, logs, model ...) "
                "from %s to %s; this run starts at step 1 with fresh logs",
                out,
                aside,
            )
        return
    found = checkpoints.existing_checkpoints(out) if not cfg.trainer.resume else []
    if found:
        raise FileExistsError(
            f"trainer.resume=false but {found[-1].parent} holds an earlier run's checkpoints (newest "
            f"{found[-1].name}): start over with `ivgr-dist train --overwrite` (moves that run's files, logs and "
            "metrics included, to a timestamped sibling; nothing deleted) or set trainer.output_dir to a new directory"
        )


def cmd_preflight(args: argparse.Namespace) -> int:
    """check a config against the Ray cluster, the data and the memory budget before any GPU work; exit 1 on a
    blocker (docs: ivgr_dist.commands.preflight)"""
    from ivgr_dist.commands.preflight import format_table, run_preflight
    from ivgr_dist.runtime.startup import init_ray
    from ivgr_dist.runtime.storage import check_not_node_local, resolve_paths

    cfg = _config(args)
    resolved = resolve_paths(cfg)
    check_not_node_local(cfg, resolved)
    init_ray(resolved)
    checks = run_preflight(
        resolved,
        device_memory_gib=args.device_memory_gib,
        sample_rows=args.sample_rows,
        placement_timeout_s=args.placement_timeout_s,
        judge=not args.no_judge,
    )
    print(format_table(checks))
    blockers = [c.name for c in checks if c.blocker]
    if blockers:
        print(f"ivgr-dist preflight: {len(blockers)} blocker(s): {', '.join(blockers)}", file=sys.stderr)
        return 1
    print("ivgr-dist preflight: no blocker")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """Warm start (when sft.enabled), then GRPO on both streams on Ray (local cluster unless RAY_ADDRESS)."""
    from ivgr_dist.commands.sft import run_sft, sft_config_for_rl
    from ivgr_dist.driver.trainer import Trainer, summarize
    from ivgr_dist.runtime.startup import init_ray, seed_everything

    cfg = _run_config(args, before_logs=lambda c: _fresh_start(c, args.overwrite))
    if _finished(cfg):  # before Ray, the warm start and the engines start: a finished job has nothing to do
        print(summarize(cfg, []))
        return 0
    from ivgr_dist.runtime.metrics import require_loggers

    require_loggers(cfg.trainer.loggers)  # a missing wandb fails here, before anything starts
    seed_everything(cfg.trainer.seed)
    init_ray(cfg)
    from ivgr_dist.commands.preflight import PreflightError, fast_checks, format_table

    checks = fast_checks(cfg)  # model, data schemas, token budget, resources: seconds, before anything starts
    if any(c.blocker for c in checks):
        raise PreflightError(f"preflight found a blocker:\n{format_table(checks)}")
    for c in checks:  # quiet when all is well; `ivgr-dist preflight` prints the whole table
        (log.warning if c.status == "warn" else log.debug)("preflight: %s %s: %s", c.name, c.status, c.detail)
    from ivgr_dist.reward.pool import make_scorer

    # the scorer before the warm start: a judge that cannot work (JudgeUnavailable) stops the job in seconds
    scorer = make_scorer(cfg.reward, cfg.algorithm, output_dir=cfg.trainer.output_dir)
    try:
        if cfg.sft.enabled:
            run_sft(cfg, overwrite=args.overwrite_sft, command="train")
            cfg = sft_config_for_rl(cfg)
        trainer = Trainer.from_config(cfg, scorer=scorer)
    except BaseException:
        scorer.close()
        raise
    try:
        records = trainer.train()
    finally:
        trainer.close()
    import ray

    ray.shutdown()  # flush the actors' last log lines before the summary, so it is what the user sees last
    print(summarize(cfg, records))
    if records:
        from ivgr_dist.commands.report import write_report

        try:
            print(f"  report (plots): {write_report(cfg.trainer.output_dir)}")
        except Exception as exc:  # noqa: BLE001 - plots are a convenience; the run's outputs are complete
            log.error("could not write the report: %s (ivgr-dist report %s)", exc, cfg.trainer.output_dir)
    if trainer.stop_signal is not None:
        from ivgr_dist.runtime.interrupts import Interrupted

        stopped = Interrupted(trainer.stop_signal)
        print(
            f"ivgr-dist train: stopped by {stopped.name} after step {trainer.step + len(records)}; checkpoint "
            f"{trainer.last_checkpoint}; resume: {_resume_command(args)}",
            file=sys.stderr,
        )
        return stopped.exit_code
    if trainer.judge_stop is not None:
        print(
            f"ivgr-dist train: stopped after step {trainer.step + len(records)}: {trainer.judge_stop}; checkpoint "
            f"{trainer.last_checkpoint}; resume once the judge works: {_resume_command(args)}",
            file=sys.stderr,
        )
        return 1
    return 0


def _same_command(args: argparse.Namespace, argv: Sequence[str] | None = None) -> str:
    """The command that ran (or it with ``argv`` for its arguments), as the user typed it."""
    import os
    import shlex

    argv = args.argv if argv is None else argv
    if os.path.basename(sys.argv[0]) == "ivgr-dist":
        return shlex.join(["ivgr-dist", *argv])
    return shlex.join(["python", "-m", "ivgr_dist.cli", *argv])


def _resume_command(args: argparse.Namespace) -> str:
    """The command that resumes this run: the one that ran without what would start it over (``--overwrite`` moves
    the run aside, ``--overwrite-sft`` retrains the warm start, ``trainer.resume=false`` is refused once
    checkpoints exist), with ``trainer.resume=true`` when the run's config turned resuming off."""
    argv = [a for a in args.argv if a not in ("--overwrite", "--overwrite-sft") and not a.startswith("trainer.resume=")]
    cfg = getattr(args, "run_config", None)
    if cfg is not None and not cfg.trainer.resume:
        argv.append("trainer.resume=true")
    return _same_command(args, argv)


def _interrupted_message(args: argparse.Namespace, exc) -> str:
    """One line: which signal, and for a run with an output directory the newest checkpoint to resume from."""
    line = f"ivgr-dist {args.command}: interrupted by {exc.name}"
    cfg = getattr(args, "run_config", None)
    if args.command == "train" and cfg is not None:
        from ivgr_dist.driver.checkpoints import latest_checkpoint

        newest = latest_checkpoint(cfg.trainer.output_dir)
        if newest is not None:
            line += f"; newest checkpoint {newest.path}; resume: {_resume_command(args)}"
        else:
            line += (
                f"; no checkpoint yet in {cfg.trainer.output_dir}; run the same command again to start over: "
                f"{_same_command(args)}"
            )
    return line


def cmd_scale(args: argparse.Namespace) -> int:
    """Change the rollout engine target of a running job (at its next step boundary), or show its fleet."""
    import os

    import ray

    from ivgr_dist.driver import control

    address = args.address or os.environ.get("RAY_ADDRESS") or "auto"
    ray.init(address=address, namespace=control.NAMESPACE, log_to_driver=False, logging_level=logging.WARNING)
    try:
        try:
            actor = control.find(args.run)
        except LookupError as exc:
            print(f"ivgr-dist scale: {exc}", file=sys.stderr)
            return 1
        if args.command == "stop":
            print(json.dumps(ray.get(actor.request_stop.remote(), timeout=30)))
            return 0
        if args.engines is None:
            print(json.dumps(ray.get(actor.status.remote(), timeout=30)))
            return 0
        try:
            reply = ray.get(actor.set_target.remote(args.engines), timeout=30)
        except ray.exceptions.RayTaskError as exc:
            print(f"ivgr-dist scale: {exc.cause if exc.cause is not None else exc}", file=sys.stderr)
            return 2
        print(json.dumps(reply))
        return 0
    finally:
        ray.shutdown()


def cmd_report(args: argparse.Namespace) -> int:
    """Plots and a Markdown summary of a run's metrics.jsonl in RUN_DIR/report/ (see ivgr_dist.commands.report)."""
    from ivgr_dist.commands.report import write_report

    print(json.dumps({"report": str(write_report(args.run_dir))}))
    return 0


def _parser() -> argparse.ArgumentParser:
    from ivgr_dist.config import TINY_FAMILIES

    p = argparse.ArgumentParser(prog="ivgr-dist", description=__doc__.split("\n")[0])
    verbose_help = "debug logging, and Ray's, vLLM's and every actor's output on the console (default: in logs/)"
    p.add_argument("-v", "--verbose", action="store_true", help=verbose_help)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, fn: Callable[[argparse.Namespace], int], help: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=help)
        sp.set_defaults(fn=fn)
        # also after the sub-command; SUPPRESS: absent here leaves the top-level value
        sp.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=verbose_help)
        sp.add_argument("--config", default=None, help="YAML config file (default: the embedded tiny CPU config)")
        return sp

    sp = add("show-config", cmd_show_config, "print the resolved configuration as YAML")
    sp.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.paired_ratio=0.8")

    sp = add("make-tiny-model", cmd_make_tiny_model, "write a tiny random Qwen2.5-VL or Qwen3-VL model directory")
    sp.add_argument("dir", help="output model directory")
    sp.add_argument(
        "--family", choices=TINY_FAMILIES, default=None, help="architecture (default: model.tiny.family, qwen2_5_vl)"
    )
    sp.add_argument("--overwrite", action="store_true", help="replace DIR if it exists")
    sp.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.tiny.num_layers=4")

    sp = add("make-synthetic", cmd_make_synthetic, "write a synthetic visual-grounding data set (parquet + images)")
    sp.add_argument("dir", help="output directory (train.parquet, val.parquet, images/)")
    sp.add_argument("--n", type=int, default=None, help="number of records (default: data.synthetic.num_records)")
    sp.add_argument("--seed", type=int, default=None, help="seed (default: data.synthetic.seed)")
    sp.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.synthetic.max_objects=3")
    sp = add("train", cmd_train, "run GRPO on both reasoning streams (rollout engines + learner group on Ray)")
    sp.add_argument(
        "--overwrite",
        action="store_true",
        help="start over: move the earlier run in trainer.output_dir (checkpoints, logs, metrics, model) to "
        "<output_dir>.old-<time>; the warm start stays",
    )
    sp.add_argument(
        "--overwrite-sft", action="store_true", help="with sft.enabled: retrain the warm start even if its model exists"
    )
    sp.add_argument("overrides", nargs="*", help="dotted overrides, e.g. trainer.max_steps=3")

    sp = add("preflight", cmd_preflight, cmd_preflight.__doc__.split("(")[0].strip())
    sp.add_argument(
        "--device-memory-gib", type=float, default=None,
        help="memory of one GPU (default: read from a GPU on this machine or in a one-GPU Ray task)",
    )  # fmt: skip
    sp.add_argument("--sample-rows", type=int, default=256, help="rows of the first train file to measure (0: none)")
    sp.add_argument("--placement-timeout-s", type=float, default=20.0, help="how long each placement group may take")
    sp.add_argument("--no-judge", action="store_true", help="do not send the judge a test request")
    sp.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.max_prompt_length=8192")

    sp = sub.add_parser("scale", help=cmd_scale.__doc__, description=cmd_scale.__doc__)
    sp.set_defaults(fn=cmd_scale)
    sp.add_argument("--engines", type=int, default=None, help="new target number of rollout engines (omit: show)")
    sp.add_argument("--run", default=None, help="the run (last part of trainer.output_dir); default: the only one")
    sp.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else the local one)")

    sp = sub.add_parser("stop", help="end a running job after its current step, with a checkpoint (resumable)")
    sp.set_defaults(fn=cmd_scale)
    sp.add_argument("--run", default=None, help="the run (last part of trainer.output_dir); default: the only one")
    sp.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else the local one)")

    sp = add("sft", cmd_sft, "supervised warm start with the learner group; writes a model directory")
    sp.add_argument("--overwrite", action="store_true", help="retrain even if the SFT model directory exists")
    sp.add_argument("overrides", nargs="*", help="dotted overrides, e.g. sft.steps=50")

    from ivgr_dist.commands.evaluate import add_arguments as add_eval_arguments
    from ivgr_dist.commands.evaluate import cmd_eval

    sp = add("eval", cmd_eval, "evaluate a model on parquet files: T and G accuracy per datasource")
    add_eval_arguments(sp)

    sp = add("prepare", cmd_prepare, "make missing CPU assets, validate the data and build one batch of prompts")
    sp.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.rollout_batch_size=32")

    sp = sub.add_parser("report", help=cmd_report.__doc__, description=cmd_report.__doc__)
    sp.set_defaults(fn=cmd_report)
    sp.add_argument("run_dir", metavar="RUN_DIR", help="a run's output directory (trainer.output_dir)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from ivgr_dist.commands.preflight import PreflightError
    from ivgr_dist.config import ConfigError
    from ivgr_dist.data.dataset import DataError
    from ivgr_dist.reward.judge import JudgeUnavailable
    from ivgr_dist.runtime.interrupts import Interrupted, raise_on_signals
    from ivgr_dist.runtime.logs import setup_console
    from ivgr_dist.runtime.storage import StorageError

    args = _parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    setup_console(args.verbose)
    raise_on_signals()
    try:
        return args.fn(args)
    except Interrupted as exc:  # Ctrl-C / SIGTERM outside the RL loop, or a second one inside it
        print(_interrupted_message(args, exc), file=sys.stderr)
        return exc.exit_code
    except ConfigError as exc:
        print(f"ivgr-dist {args.command}: configuration error: {exc}", file=sys.stderr)
        return 2
    except (FileExistsError, FileNotFoundError, DataError, StorageError, JudgeUnavailable, PreflightError) as exc:
        print(f"ivgr-dist {args.command}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
