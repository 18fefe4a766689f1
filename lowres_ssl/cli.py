"""Training's command-line front ends, train.py and finetune.py (``scripts/*.py`` are thin
wrappers), and the exit rules every front end shares (:mod:`lowres_ssl.cli_results` holds the
others). A front end parses and calls: the task says what its config is
(:meth:`~lowres_ssl.engine.task.Task.request`), the engine plans and trains it.

Errors in the user's input print one line (``error: …``) and exit with status 2; Ctrl-C exits
with 130 and SIGTERM with 143 after the trainer has written a checkpoint.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import sys
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from lowres_ssl.config import Config, dump_yaml, load_yaml, parse_set
from lowres_ssl.engine.task import Task
from lowres_ssl.errors import UserError
from lowres_ssl.run_layout import CLASSIFIER_FILE, CONFIG_FILE

TRAIN_EXAMPLES = """\
examples:
  accelerate launch scripts/train.py --preset 8gb --data ~/my_photos --out runs/photos
  python scripts/train.py --preset cpu --data ~/.cache/lowres_ssl/cifar10/train --max-steps 50
  python scripts/train.py --resume --out runs/photos            # continue where it stopped
  python scripts/train.py --preset 8gb --set train.batch_size=128 --dry-run
"""


def preset_lines() -> str:
    """The presets with their one-line descriptions (for --help)."""
    from lowres_ssl import presets

    lines = ["presets (--preset NAME; auto picks by the GPU's memory):"]
    for name, path in presets.available().items():
        description = load_yaml(path).get("description", "")
        lines.append(f"  {name:<6} {description}")
    return "\n".join(lines) + "\n"


def train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train.py",
        description="Self-supervised training (SFRIK by default) on a folder of images.",
        epilog=TRAIN_EXAMPLES + "\n" + preset_lines(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--data",
        help="a folder of images, or digits (default; no network) / cifar10 / cifar100 / stl10",
    )
    p.add_argument("--init", help="start from weights: a run folder, checkpoint, .safetensors/.pth")
    _run_flags(
        p,
        preset="a preset name (presets/NAME.yaml), auto, or a YAML path",
        out="runs/<preset>-<date>-<time>",
        epochs="train.epochs",
    )
    return p


def _run_flags(p: argparse.ArgumentParser, *, preset: str, out: str, epochs: str) -> None:
    """The flags train.py and finetune.py share (the same names, the same meaning)."""
    p.add_argument("--preset", help=preset)
    p.add_argument(
        "--autofit",
        action="store_true",
        help="before training, run a few real steps and lower the micro-batch until they fit",
    )
    p.add_argument("--config", help="a full or partial config YAML (e.g. a run's config.yaml)")
    p.add_argument("--out", help=f"the run folder (default: {out})")
    p.add_argument("--epochs", type=int, help=epochs)
    p.add_argument("--max-steps", type=int, help="train.max_steps: stop after this many steps")
    p.add_argument(
        "--time-budget",
        help="train.time_budget: fit the run to a wall time (15m, 2h, 90s): steps and schedule",
    )
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any config key, dotted (train.batch_size=128); repeatable; values are YAML",
    )


def _saved_run(args: argparse.Namespace) -> dict | None:
    """With --resume and neither --preset nor --config: the run folder's config.yaml."""
    if args.resume and not args.out:
        raise UserError("--resume needs --out, the run folder to continue")
    if not args.resume or args.preset or args.config:
        return None
    saved = Path(args.out).expanduser() / CONFIG_FILE
    if not saved.is_file():
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            # One of several processes (on a machine that may not see the run folder): the
            # run's start says what is wrong on every process at once; an error here, before
            # the processes meet, left the others waiting for this one.
            return None
        raise UserError(f"--resume: {args.out} holds no run (no {CONFIG_FILE})")
    return load_yaml(saved)


def _train_flags(args: argparse.Namespace) -> dict:
    """``--epochs``, ``--max-steps``, ``--time-budget`` as the train section (a budget sets the
    number of steps itself: with either of the others it is a one-line error)."""
    if args.time_budget is not None and (args.max_steps is not None or args.epochs is not None):
        raise UserError(
            "--time-budget sets the number of steps itself; drop --max-steps / --epochs"
        )
    keys = ("epochs", "max_steps", "time_budget")
    return {k: getattr(args, k) for k in keys if getattr(args, k) is not None}


def request(args: argparse.Namespace, task: Task, flags: dict) -> tuple[Config, bool]:
    """What the command line asks ``task`` for (:meth:`Task.request`: a preset < --config <
    ``flags`` < --set; with --resume and neither a preset nor a config, the run folder's own
    config.yaml is the base), and whether ``--preset auto`` chose the preset."""
    from lowres_ssl import presets

    layers = [load_yaml(args.config) if args.config else {}, flags, parse_set(args.set)]
    saved = _saved_run(args)
    if saved is not None:
        return task.request([saved, *layers], resuming=True), False
    if args.config and not args.preset:  # a config file alone is the whole request
        return task.request(layers, resuming=args.resume), False
    name, preset, _ = presets.load_preset(args.preset or "auto")
    cfg = task.request([{"preset": name}, *layers], preset=preset, resuming=args.resume)
    return cfg, (args.preset or "auto") == "auto"


def default_out(cfg: Config) -> str:
    return f"runs/{cfg.preset or 'run'}-{datetime.now():%Y%m%d-%H%M%S}"


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    for noisy in ("accelerate", "torch", "PIL", "faiss"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # bitsandbytes warns at import, on every CPU run, that its 4-bit matmul kernels are not
    # installed; the kit uses only its 8-bit optimizers, whose own fallback logs one line.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def exits_on_user_errors(main: Callable[[list[str] | None], int]):
    """A front end's exit: an error in the user's input prints one line (``error: …``) and
    exits with 2; Ctrl-C exits with 130 and SIGTERM with 143 (the trainer has written a
    checkpoint)."""

    @functools.wraps(main)
    def wrapped(argv: list[str] | None = None) -> int:
        try:
            return main(argv)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        except KeyboardInterrupt as stop:  # Ctrl-C 130, SIGTERM 143 (engine.stopping.Stopped)
            return getattr(stop, "exit_code", 130)

    return wrapped


def train_request(args: argparse.Namespace) -> tuple[Config, Task, bool]:
    """train.py's request: (config, the pre-training task, whether --preset auto chose)."""
    from lowres_ssl.tasks import Pretraining

    flags: dict = {"train": _train_flags(args)}
    if args.data:
        flags["data"] = {"path": args.data}
    task = Pretraining()
    cfg, auto = request(args, task, flags)
    return cfg, task, auto


@exits_on_user_errors
def train_main(argv: list[str] | None = None) -> int:
    args = train_parser().parse_args(argv)
    setup_logging()
    cfg, task, auto = train_request(args)
    out = args.out or default_out(cfg)
    if args.dry_run:
        return dry_run(cfg, task, out, resume=args.resume, auto=auto)
    _train(cfg, task, out, args, auto=auto, init=args.init)
    return 0


def dry_run(cfg: Config, task: Task, out: str, *, resume: bool, auto: bool) -> int:
    """Print the run's plan (:func:`lowres_ssl.engine.setup.plan_run`, as the run makes it):
    the resolved config as YAML (what the run folder's config.yaml will hold), then, as YAML
    comments, the run folder, what was chosen and the memory breakdown."""
    from lowres_ssl import plan
    from lowres_ssl.engine.setup import plan_run

    machine, warning = plan.machine_for(cfg)
    planned = plan_run(cfg, task, Path(out).expanduser(), resume=resume, machine=machine)
    lines = planned.lines
    if auto:
        lines.insert(0, plan.auto_line(planned))
    if warning:
        lines.insert(0, warning)
    if machine.here and (problem := planned.hardware_problem()):
        lines.append(f"this machine cannot train it: {problem}")
    if int(os.environ.get("RANK", "0")) == 0:  # accelerate launch: one print, not one a process
        print(dump_yaml(planned.cfg), end="")
        print(f"# run folder: {out}" + (" (resume)" if resume else ""))
        for line in lines:
            print(f"# {line}")
    return 0


def _train(cfg: Config, task: Task, out: str, args, *, auto: bool, init=None) -> dict:
    """Train ``task`` as ``cfg`` says into ``out`` (the engine plans it on this machine)."""
    from tqdm.contrib.logging import logging_redirect_tqdm

    from lowres_ssl import plan
    from lowres_ssl.tasks import train

    log = logging.getLogger("lowres_ssl")
    machine = plan.Machine.this_one()
    if warning := plan.gpu_preset_warning(cfg, machine):
        log.warning(warning)
    if auto:
        log.info(f"preset auto: found {machine.found} → {cfg.preset}")
    with logging_redirect_tqdm():
        # A terminal gets a progress bar; a log file or a scheduler gets log lines.
        return train(
            cfg, out, task=task, resume=args.resume, init=init,
            progress_bar=sys.stderr.isatty(), autofit=args.autofit,
        )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# finetune.py

FINETUNE_EXAMPLES = """\
examples:
  accelerate launch scripts/finetune.py --checkpoint runs/NAME --train DIR --val DIR --preset 8gb
  python scripts/finetune.py --checkpoint runs/NAME --train cifar10 --train-fraction 0.1
  python scripts/finetune.py --random-init --checkpoint runs/NAME --train DIR --val DIR  # baseline
  python scripts/finetune.py --checkpoint runs/NAME --train DIR --val DIR --freeze-backbone
  python scripts/finetune.py --resume --out runs/ft

The run folder holds classifier.safetensors (the best model by validation top-1; backbone,
head, class names), classifier_last.safetensors, metrics.jsonl and summary.json.
"""


def finetune_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="finetune.py",
        description="Supervised fine-tuning of a pre-trained backbone plus a new linear head on "
        "a labeled folder (root/<class>/<image>).",
        epilog=FINETUNE_EXAMPLES + "\n" + preset_lines(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--checkpoint", help="pre-trained weights: a run folder, checkpoint or file")
    p.add_argument(
        "--random-init",
        action="store_true",
        help="the same architecture from scratch (the baseline; no weights are loaded)",
    )
    p.add_argument(
        "--train", help="the labeled training folder, or digits / cifar10 / cifar100 / stl10"
    )
    p.add_argument("--val", help="the labeled validation folder or a split (cifar10:test)")
    p.add_argument("--train-fraction", type=float, help="a class-balanced fraction (0.01, 0.1)")
    p.add_argument("--per-class", type=int, help="or this many labeled images per class")
    p.add_argument("--freeze-backbone", action="store_true", help="train the head only")
    p.add_argument("--backbone-lr", type=float, help="per 256 images (default 0.01)")
    p.add_argument("--head-lr", type=float, help="per 256 images (default 0.2)")
    _run_flags(
        p,
        preset="a preset name (only its card settings are used), auto, or a YAML path",
        out="runs/ft-<date>-<time>",
        epochs="train.epochs (default 20)",
    )
    return p


def finetune_request(args: argparse.Namespace) -> tuple[Config, Task, bool]:
    """finetune.py's request: (config, the fine-tuning task holding the weights it read,
    whether --preset auto chose)."""
    from lowres_ssl.tasks import FineTuning

    names = ("checkpoint", "val", "train_fraction", "per_class", "backbone_lr", "head_lr")
    finetune = {k: getattr(args, k) for k in names if getattr(args, k) is not None}
    finetune.update({k: True for k in ("random_init", "freeze_backbone") if getattr(args, k)})
    flags: dict = {"finetune": finetune, "train": _train_flags(args)}
    if args.train:
        flags["data"] = {"path": args.train}
    task = FineTuning()
    cfg, auto = request(args, task, flags)
    return cfg, task, auto


@exits_on_user_errors
def finetune_main(argv: list[str] | None = None) -> int:
    args = finetune_parser().parse_args(argv)
    setup_logging()
    cfg, task, auto = finetune_request(args)
    out = args.out or f"runs/ft-{datetime.now():%Y%m%d-%H%M%S}"
    if args.dry_run:
        return dry_run(cfg, task, out, resume=args.resume, auto=auto)
    summary = _train(cfg, task, out, args, auto=auto)
    if "best_val_top1" in summary:
        print(
            f"validation top-1 {summary['best_val_top1']:.4f} (best, epoch "
            f"{summary['best_epoch']}), last {summary['val_top1']:.4f}; "
            f"classifier: {Path(out) / CLASSIFIER_FILE}"
        )
    return 0


__all__ = [
    "default_out",
    "dry_run",
    "exits_on_user_errors",
    "finetune_main",
    "finetune_parser",
    "finetune_request",
    "request",
    "setup_logging",
    "train_main",
    "train_parser",
    "train_request",
]
