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

from ivgr_dist._ext_fix import install as _install_ext_fix

_install_ext_fix()  # before anything imports transformers / vLLM (no-op where the .pth already ran)

log = logging.getLogger("ivgr_dist")


def _config(args: argparse.Namespace):
    from ivgr_dist.config import load_config

    return load_config(args.config, args.overrides)


def cmd_show_config(args: argparse.Namespace) -> int:
    from ivgr_dist.config import to_yaml

    print(to_yaml(_config(args)), end="")
    return 0


def cmd_make_tiny_model(args: argparse.Namespace) -> int:
    from ivgr_dist.models.tiny import make_tiny_model

    cfg = _config(args)
    out = make_tiny_model(args.dir, cfg.model.tiny, overwrite=args.overwrite)
    print(json.dumps({"model_dir": str(out)}))
    return 0


def cmd_make_synthetic(args: argparse.Namespace) -> int:
    from ivgr_dist.data.synthetic import make_synthetic

    cfg = _config(args)
    summary = make_synthetic(args.dir, cfg.data.synthetic, num_records=args.n, seed=args.seed)
    print(json.dumps(summary))
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ivgr-dist", description=__doc__.split("\n")[0])
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, fn: Callable[[argparse.Namespace], int], help: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=help)
        sp.set_defaults(fn=fn)
        sp.add_argument("--config", default=None, help="YAML config file (default: the embedded tiny CPU config)")
        return sp

    sp = add("show-config", cmd_show_config, "print the resolved configuration as YAML")
    sp.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.paired_ratio=0.8")

    sp = add("make-tiny-model", cmd_make_tiny_model, "write a tiny random Qwen2.5-VL model directory")
    sp.add_argument("dir", help="output model directory")
    sp.add_argument("--overwrite", action="store_true", help="replace DIR if it exists")
    sp.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.tiny.num_layers=4")

    sp = add("make-synthetic", cmd_make_synthetic, "write a synthetic visual-grounding data set (parquet + images)")
    sp.add_argument("dir", help="output directory (train.parquet, val.parquet, images/)")
    sp.add_argument("--n", type=int, default=None, help="number of records (default: data.synthetic.num_records)")
    sp.add_argument("--seed", type=int, default=None, help="seed (default: data.synthetic.seed)")
    sp.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.synthetic.max_objects=3")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from ivgr_dist.config import ConfigError

    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.fn(args)
    except ConfigError as exc:
        print(f"ivgr-dist {args.command}: configuration error: {exc}", file=sys.stderr)
        return 2
    except FileExistsError as exc:
        print(f"ivgr-dist {args.command}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
