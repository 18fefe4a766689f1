"""Command-line front ends (``scripts/*.py`` are thin wrappers around these).

Errors in the user's input print one line (``error: …``) and exit with status 2; Ctrl-C exits
with 130 after the trainer has written a checkpoint.
"""

from __future__ import annotations

import argparse
import logging
import sys
from datetime import datetime
from pathlib import Path

from lowres_ssl.config import (
    Config,
    dump_yaml,
    from_dict,
    load_yaml,
    merge,
    parse_set,
    validate,
)
from lowres_ssl.errors import UserError

TRAIN_EXAMPLES = """\
examples:
  accelerate launch scripts/train.py --preset 8gb --data ~/my_photos --out runs/photos
  python scripts/train.py --preset cpu --data ~/.cache/lowres_ssl/cifar10/train --max-steps 50
  python scripts/train.py --resume --out runs/photos            # continue where it stopped
  python scripts/train.py --preset 8gb --set train.batch_size=128 --dry-run
"""


def train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train.py",
        description="Self-supervised training (SFRIK by default) on a folder of images.",
        epilog=TRAIN_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--preset", help="a preset name (presets/NAME.yaml), auto, or a YAML path")
    p.add_argument("--config", help="a full or partial config YAML (e.g. a run's config.yaml)")
    p.add_argument("--data", help="a folder of images, or cifar10 / cifar100 / stl10")
    p.add_argument("--out", help="the run folder (default: runs/<preset>-<date>-<time>)")
    p.add_argument("--epochs", type=int, help="train.epochs")
    p.add_argument("--max-steps", type=int, help="train.max_steps: stop after this many steps")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--init", help="start from weights: a run folder, checkpoint or .safetensors")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any config key, dotted (train.batch_size=128); repeatable; values are YAML",
    )
    return p


def resolve_config(args: argparse.Namespace) -> Config:
    """Layer preset < --config < flags < --set (with --resume and neither a preset nor a
    config, the run folder's own config.yaml is the base) and validate."""
    from lowres_ssl import presets

    values: dict = {}
    preset_name = None
    if args.resume and not args.out:
        raise UserError("--resume needs --out, the run folder to continue")
    if args.resume and not args.preset and not args.config:
        saved = Path(args.out).expanduser() / "config.yaml"
        if not saved.is_file():
            raise UserError(f"--resume: {args.out} holds no run (no config.yaml)")
        values = load_yaml(saved)
        preset_name = values.get("preset")
    elif args.preset or not args.config:
        preset_name, values, _ = presets.load_preset(args.preset or "auto")
    if args.config:
        values = merge(values, load_yaml(args.config))
    flags: dict = {}
    if args.data:
        flags.setdefault("data", {})["path"] = args.data
    if args.epochs is not None:
        flags.setdefault("train", {})["epochs"] = args.epochs
    if args.max_steps is not None:
        flags.setdefault("train", {})["max_steps"] = args.max_steps
    values = merge(values, flags)
    values = merge(values, parse_set(args.set))
    values.setdefault("preset", preset_name)
    return validate(from_dict(values))


def default_out(cfg: Config) -> str:
    return f"runs/{cfg.preset or 'run'}-{datetime.now():%Y%m%d-%H%M%S}"


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    for noisy in ("accelerate", "torch", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def train_main(argv: list[str] | None = None) -> int:
    args = train_parser().parse_args(argv)
    _setup_logging()
    try:
        cfg = resolve_config(args)
        out = args.out or default_out(cfg)
        if args.dry_run:
            print(dump_yaml(cfg), end="")
            print(f"# run folder: {out}" + (" (resume)" if args.resume else ""))
            return 0
        from tqdm.contrib.logging import logging_redirect_tqdm

        from lowres_ssl.engine import train

        with logging_redirect_tqdm():
            train(cfg, out, resume=args.resume, init=args.init)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


__all__ = ["resolve_config", "train_main", "train_parser"]
