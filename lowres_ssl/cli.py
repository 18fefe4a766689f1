"""Command-line front ends (``scripts/*.py`` are thin wrappers around these).

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
from lowres_ssl.run_layout import CLASSIFIER_FILE, CONFIG_FILE, CURVES_FILE, eval_file

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
    p.add_argument("--data", help="a folder of images, or cifar10 / cifar100 / stl10")
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


def resolve_config(args: argparse.Namespace) -> Config:
    """Layer preset < --config < flags < --set (with --resume and neither a preset nor a
    config, the run folder's own config.yaml is the base) and validate."""
    from lowres_ssl import presets

    values = _saved_run(args) or {}
    preset_name = values.get("preset")
    if not values and (args.preset or not args.config):
        preset_name, values, _ = presets.load_preset(args.preset or "auto")
        args.auto_preset = (args.preset or "auto") == "auto"
    if args.config:
        values = merge(values, load_yaml(args.config))
    flags: dict = {"train": _train_flags(args)}
    if args.data:
        flags["data"] = {"path": args.data}
    values = merge(values, flags)
    values = merge(values, parse_set(args.set))
    values.setdefault("preset", preset_name)
    return validate(from_dict(values))


def default_out(cfg: Config) -> str:
    return f"runs/{cfg.preset or 'run'}-{datetime.now():%Y%m%d-%H%M%S}"


def _setup_logging() -> None:
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


@exits_on_user_errors
def train_main(argv: list[str] | None = None) -> int:
    args = train_parser().parse_args(argv)
    _setup_logging()
    cfg = resolve_config(args)
    out = args.out or default_out(cfg)
    from lowres_ssl import fit

    target = fit.target_device(cfg, chosen_by_auto=getattr(args, "auto_preset", False))
    if args.dry_run:
        resolved, est, lines = fit.plan(cfg, target)
        if target.chosen_by_auto:
            lines.insert(0, fit.auto_line(cfg, target, est))
        if target.warning:
            lines.insert(0, target.warning)
        print(dump_yaml(resolved), end="")
        print(f"# run folder: {out}" + (" (resume)" if args.resume else ""))
        for line in lines:
            print(f"# {line}")
        return 0
    log = logging.getLogger("lowres_ssl")
    if target.warning:
        log.warning(target.warning)
    if target.chosen_by_auto:
        log.info(fit.auto_line(cfg, target))
    from tqdm.contrib.logging import logging_redirect_tqdm

    from lowres_ssl.tasks import train

    with logging_redirect_tqdm():
        # A terminal gets a progress bar; a log file or a scheduler gets log lines.
        train(
            cfg,
            out,
            resume=args.resume,
            init=args.init,
            progress_bar=sys.stderr.isatty(),
            autofit=args.autofit,
        )
    return 0


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

#: Fine-tuning's own defaults, over a preset's hardware settings (the SFRIK paper's
#: semi-supervised protocol: SGD with momentum, no weight decay, cosine to 0, batch 256).
FINETUNE_DEFAULTS: dict = {
    "optim": {
        "name": "sgd",
        "momentum": 0.9,
        "weight_decay": 0.0,
        "warmup_epochs": 0.0,
        "final_lr_ratio": 0.0,
    },
    "train": {"epochs": 20, "batch_size": 256, "checkpoint_every": 1000},
    "data": {"recipe": "supervised"},
    "eval": {"every_epochs": 0},  # the kNN monitor is pre-training's; validation replaces it
}

#: What fine-tuning takes from a preset: the card's settings, not pre-training's recipe.
PRESET_KEYS_FOR_FINETUNING = {
    "data": ("cache", "cache_dir", "num_workers", "photo_size", "min_size", "max_pixels"),
    "model": ("backbone", "grad_checkpointing", "channels_last"),
    "train": ("precision", "micro_batch_size", "seed"),
    "optim": ("state_bits",),
}


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
    p.add_argument("--train", help="the labeled training folder, or cifar10 / cifar100 / stl10")
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


def resolve_finetune_config(args: argparse.Namespace):
    """Layer: a preset's card settings < fine-tuning defaults < --config < flags < --set; the
    backbone and image size come from --checkpoint (a resume reads the run's config.yaml).
    Returns the config and the pre-trained weights read (None on resume or random init)."""
    from lowres_ssl import presets

    values = _saved_run(args)
    if values is None:
        name, preset, _ = presets.load_preset(args.preset or "auto")
        values = {
            section: {k: preset[section][k] for k in keys if k in preset.get(section, {})}
            for section, keys in PRESET_KEYS_FOR_FINETUNING.items()
        }
        values = merge(values, FINETUNE_DEFAULTS)
        values["preset"] = name
    own = load_yaml(args.config) if args.config else {}
    values = merge(values, own)
    names = ("checkpoint", "val", "train_fraction", "per_class", "backbone_lr", "head_lr")
    f = {k: getattr(args, k) for k in names if getattr(args, k) is not None}
    f.update({k: True for k in ("random_init", "freeze_backbone") if getattr(args, k)})
    flags: dict = {"finetune": f, "train": _train_flags(args)}
    if args.train:
        flags["data"] = {"path": args.train}
    given = parse_set(args.set)
    values = merge(merge(values, flags), given)
    weights = None
    if not args.resume:
        checkpoint = (values.get("finetune") or {}).get("checkpoint")
        if checkpoint:  # the architecture and the image size are the checkpoint's
            from lowres_ssl.weights import load_weights

            weights = load_weights(checkpoint, "--checkpoint")
            values = merge(values, {"model": {"backbone": weights.spec.backbone}})
            if (values.get("data") or {}).get("load_size", "auto") == "auto":
                values = merge(values, {"data": {"load_size": weights.spec.image_size}})
        elif not (values.get("finetune") or {}).get("random_init"):
            raise UserError(
                "finetune.py needs --checkpoint (the pre-trained weights), or --random-init to "
                "train the architecture from scratch"
            )
        if not args.train and not (merge(own, given).get("data") or {}).get("path"):
            raise UserError("finetune.py needs --train, the labeled folder to train on")
    cfg = validate(from_dict(values))
    return cfg, None if cfg.finetune.random_init else weights


@exits_on_user_errors
def finetune_main(argv: list[str] | None = None) -> int:
    args = finetune_parser().parse_args(argv)
    _setup_logging()
    cfg, weights = resolve_finetune_config(args)
    out = args.out or f"runs/ft-{datetime.now():%Y%m%d-%H%M%S}"
    from lowres_ssl import fit

    target = fit.target_device(cfg, chosen_by_auto=not args.preset and not args.resume)
    if args.dry_run:
        resolved, _, _ = fit.plan(cfg, target)
        print(dump_yaml(resolved), end="")
        print(f"# run folder: {out}" + (" (resume)" if args.resume else ""))
        if target.warning:
            print(f"# {target.warning}")
        return 0
    if target.warning:
        logging.getLogger("lowres_ssl").warning(target.warning)
    from tqdm.contrib.logging import logging_redirect_tqdm

    from lowres_ssl.tasks import FineTuning, train

    with logging_redirect_tqdm():
        summary = train(
            cfg,
            out,
            task=FineTuning(weights),
            resume=args.resume,
            progress_bar=sys.stderr.isatty(),
            autofit=args.autofit,
        )
    if "best_val_top1" in summary:
        print(
            f"validation top-1 {summary['best_val_top1']:.4f} (best, epoch "
            f"{summary['best_epoch']}), last {summary['val_top1']:.4f}; "
            f"classifier: {Path(out) / CLASSIFIER_FILE}"
        )
    return 0


# ---------------------------------------------------------------------------------------------
# predict.py


def predict_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="predict.py",
        description="Classify every image of a folder with a fine-tuned classifier (a CSV), or "
        "write the backbone's features (--embeddings).",
        epilog="examples:\n"
        "  python scripts/predict.py --checkpoint runs/ft --images DIR --out predictions.csv\n"
        "  python scripts/predict.py --checkpoint runs/NAME --images DIR --embeddings feats.npy",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--checkpoint", required=True, help="a finetune.py run folder or its file")
    p.add_argument("--images", required=True, help="a folder of images (recursive)")
    p.add_argument("--out", help="the CSV to write (path, class, probability, top-5)")
    p.add_argument("--embeddings", help="write backbone features to this .npy instead")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="auto", help="auto (a GPU if there is one), cpu, cuda")
    p.add_argument("--num-workers", type=int, help="decoding processes")
    return p


@exits_on_user_errors
def predict_main(argv: list[str] | None = None) -> int:
    from lowres_ssl.predict import predict, summary_line

    args = predict_parser().parse_args(argv)
    _setup_logging()
    _positive_flags(args, ("batch_size",))
    if bool(args.out) == bool(args.embeddings):
        raise UserError("pass --out predictions.csv, or --embeddings features.npy")
    if args.embeddings and not args.embeddings.endswith(".npy"):
        raise UserError(f"--embeddings {args.embeddings}: the features file is a .npy")
    summary = predict(
        args.checkpoint,
        args.images,
        args.out or args.embeddings,
        embeddings=bool(args.embeddings),
        batch_size=args.batch_size,
        device=args.device,
        num_workers=args.num_workers,
        progress=sys.stderr.isatty(),
    )
    print(summary_line(summary))
    return 0


# ---------------------------------------------------------------------------------------------
# evaluate.py

EVALUATE_EXAMPLES = """\
examples:
  python scripts/evaluate.py knn    --checkpoint runs/NAME --train DIR --test DIR
  python scripts/evaluate.py linear --checkpoint runs/NAME --train cifar10 --test cifar10:test
  python scripts/evaluate.py knn    --checkpoint runs/NAME --random-init --train DIR --test DIR
  python scripts/evaluate.py knn --random-init --backbone resnet18 --size 32 --train D --test D

The last line of stdout is a JSON object; with --checkpoint a run folder, it is also written to
the folder as eval_knn.json / eval_linear.json (eval_knn_random.json with --random-init).
"""


def evaluate_parser() -> argparse.ArgumentParser:
    from lowres_ssl.eval.evaluate import PROTOCOLS

    p = argparse.ArgumentParser(
        prog="evaluate.py",
        description="kNN or linear-probe accuracy of a frozen backbone on labeled images.",
        epilog=EVALUATE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("protocol", choices=PROTOCOLS, help="knn (k = 20 and 200) or linear probe")
    p.add_argument("--checkpoint", help="a run folder, a checkpoint folder or a weights file")
    p.add_argument(
        "--random-init", action="store_true", help="the same architecture untrained (seed 0)"
    )
    p.add_argument("--backbone", help="with --random-init and no --checkpoint: resnet18/34/50")
    p.add_argument("--train", help="labeled folder (root/<class>/<image>) or cifar10[:train]")
    p.add_argument("--test", help="labeled folder or a dataset split, e.g. cifar10:test")
    p.add_argument("--size", type=int, help="image side in pixels (default: the training size)")
    p.add_argument("--k", type=int, default=200, help="neighbours (k = 20 is reported too)")
    p.add_argument("--temperature", type=float, default=0.07, help="kNN vote temperature")
    _extraction_flags(p)
    return p


def _extraction_flags(p: argparse.ArgumentParser) -> None:
    """How the frozen backbone's features are computed and cached (evaluate.py, explore.py)."""
    from lowres_ssl.eval.evaluate import PRECISIONS

    p.add_argument("--batch-size", type=int, default=256, help="images per forward pass")
    p.add_argument("--device", default="auto", help="auto (a GPU if there is one), cpu, cuda")
    p.add_argument("--precision", default="auto", choices=PRECISIONS)
    p.add_argument("--cache-dir", help="feature and decoded caches (default ~/.cache/lowres_ssl)")
    p.add_argument("--no-feature-cache", action="store_true", help="always extract features")
    p.add_argument("--num-workers", type=int, help="decoding processes")


def _extraction_settings(args: argparse.Namespace) -> dict:
    """The flags of :func:`_extraction_flags` as the keywords evaluate() and explore() take."""
    return {
        "batch_size": args.batch_size,
        "device": args.device,
        "precision": args.precision,
        "cache_dir": args.cache_dir,
        "feature_cache": not args.no_feature_cache,
        "num_workers": args.num_workers,
        "progress": sys.stderr.isatty(),
    }


def _positive_flags(args: argparse.Namespace, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be > 0, got {value}")


@exits_on_user_errors
def evaluate_main(argv: list[str] | None = None) -> int:
    import contextlib
    import json
    from functools import partial

    from lowres_ssl.eval.evaluate import summary_line
    from lowres_ssl.files import held, write_text_atomic
    from lowres_ssl.run_layout import report_lock

    args = evaluate_parser().parse_args(argv)
    _setup_logging()
    _positive_flags(args, ("size", "k", "temperature", "batch_size"))
    name = eval_file(args.protocol, args.random_init)
    folder = Path(args.checkpoint).expanduser() if args.checkpoint else None
    writes_report = folder is not None and (folder / CONFIG_FILE).is_file()
    with contextlib.ExitStack() as stack:
        if writes_report:  # one evaluate.py per report: a second one gets one line
            stack.enter_context(
                held(report_lock(folder, name), partial(_report_busy, folder, name))
            )
        record = _evaluate(args)
        run_dir = record.pop("run_dir")
        if writes_report and run_dir and folder.resolve() == Path(run_dir).resolve():
            write_text_atomic(Path(run_dir) / name, json.dumps(record, indent=1) + "\n")
    print(summary_line(args.protocol, record))
    print(json.dumps(record))
    return 0


def _report_busy(folder: Path, name: str, holder: str) -> str:
    return (
        f"{folder / name} is being made by {holder}; wait for it to finish (or stop it), then "
        "run evaluate.py again"
    )


def _evaluate(args: argparse.Namespace) -> dict:
    from tqdm.contrib.logging import logging_redirect_tqdm

    from lowres_ssl.eval.evaluate import evaluate

    with logging_redirect_tqdm():
        return evaluate(
            args.protocol,
            checkpoint=args.checkpoint,
            random_init=args.random_init,
            backbone=args.backbone,
            train=args.train,
            test=args.test,
            size=args.size,
            k=args.k,
            temperature=args.temperature,
            **_extraction_settings(args),
        )


# ---------------------------------------------------------------------------------------------
# export.py


def export_parser() -> argparse.ArgumentParser:
    from lowres_ssl.weights import EXPORT_FORMATS

    p = argparse.ArgumentParser(
        prog="export.py",
        description="Write a run's backbone as safetensors (with metadata) or for torchvision.",
        epilog="examples:\n"
        "  python scripts/export.py --checkpoint runs/NAME --out backbone.safetensors\n"
        "  python scripts/export.py --checkpoint runs/NAME --out resnet18.pth --format torchvision",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--checkpoint", required=True, help="a run folder, checkpoint or weights file")
    p.add_argument("--out", required=True, help="the file to write (.safetensors or .pth)")
    p.add_argument(
        "--format",
        choices=EXPORT_FORMATS,
        help="default: torchvision for .pth/.pt, else safetensors",
    )
    return p


@exits_on_user_errors
def export_main(argv: list[str] | None = None) -> int:
    from lowres_ssl.weights import export, library_constructor, load_line, load_weights

    args = export_parser().parse_args(argv)
    weights = load_weights(args.checkpoint)
    out = export(weights, args.out, args.format)
    spec = weights.spec
    sidecar = out.with_suffix(".json")
    extra = f" (and {sidecar.name})" if sidecar.is_file() and out.suffix != ".safetensors" else ""
    print(f"exported {spec.describe()} from {weights.file} to {out}{extra}")
    if out.suffix != ".safetensors":
        print("load: " + load_line(spec, out.name).replace("; ", "\n      "))
    elif spec.library:
        print(f"load: {library_constructor(spec).rstrip('; ')}".replace("; ", "\n      "))
        print(f"      model.load_state_dict(safetensors.torch.load_file('{out.name}'))")
    return 0


# ---------------------------------------------------------------------------------------------
# plot.py


def plot_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="plot.py",
        description="Training curves (loss, terms, lr, images/s, memory, kNN) of run folders.",
        epilog="example: python scripts/plot.py runs/a runs/b --out curves.png",
    )
    p.add_argument("runs", nargs="+", help="run folders (several: overlaid)")
    p.add_argument(
        "--out", help=f"the PNG to write (default: {CURVES_FILE} in the first run folder)"
    )
    p.add_argument("--dpi", type=int, default=120)
    return p


@exits_on_user_errors
def plot_main(argv: list[str] | None = None) -> int:
    from lowres_ssl.plots import plot_runs

    args = plot_parser().parse_args(argv)
    out = args.out or str(Path(args.runs[0]) / CURVES_FILE)
    written = plot_runs(args.runs, out, dpi=args.dpi)
    print(f"wrote {written}")
    return 0


# ---------------------------------------------------------------------------------------------
# explore.py

EXPLORE_EXAMPLES = """\
examples:
  python scripts/explore.py runs/photos ~/photos --out runs/photos/explore
  python scripts/explore.py runs/photos ~/photos --out ex --groups 20 --link-into ~/sorted
  python scripts/explore.py runs/photos ~/photos --out ex --query ~/one.jpg --duplicates 0.9
  python scripts/explore.py resnet18 --size 96 ~/photos --out ex_random   (an untrained one)

Open <out>/index.html in a browser: every sheet, CSV and figure (docs/explore.md).
"""


def explore_parser() -> argparse.ArgumentParser:
    from lowres_ssl.explore.embeddings import LABEL_MODES
    from lowres_ssl.explore.neighbours import BACKENDS

    p = argparse.ArgumentParser(
        prog="explore.py",
        description="What a backbone learned about a folder of images: nearest neighbours, "
        "groups, near-duplicates and a 2-D map, as sheets, CSVs and one static page.",
        epilog=EXPLORE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "model",
        help="a run folder, checkpoint or weights file; or a backbone name "
        "(resnet18, timm/<model>) for an untrained one (with --size)",
    )
    p.add_argument("folder", help="the folder of images (recursive; class subfolders = labels)")
    p.add_argument("--out", required=True, help="the folder to write (index.html and the rest)")
    p.add_argument(
        "--random-init",
        action="store_true",
        help="the checkpoint's architecture untrained (--seed): the baseline",
    )
    p.add_argument("--size", type=int, help="image side in pixels (default: the training size)")
    p.add_argument(
        "--groups",
        type=int,
        help="k-means groups (default: the number of class "
        "folders, else √(images/2) between 2 and 100)",
    )
    p.add_argument("--k", type=int, default=8, help="neighbours on each sheet row")
    p.add_argument("--queries", type=int, default=12, help="sampled images on neighbours.png")
    p.add_argument(
        "--query",
        action="append",
        default=[],
        metavar="IMAGE",
        help="an image (anywhere) to find the neighbours of; repeat for more",
    )
    p.add_argument(
        "--duplicates",
        type=float,
        default=0.95,
        metavar="COSINE",
        help="near-duplicate threshold on cosine similarity",
    )
    p.add_argument("--max-pairs", type=int, default=10_000, help="pairs listed in duplicates.csv")
    p.add_argument(
        "--link-into",
        metavar="DIR",
        help="a new folder: a subfolder per group of links to its images",
    )
    p.add_argument(
        "--labels",
        choices=LABEL_MODES,
        default="auto",
        help="class subfolders as labels: auto (when laid out so), folders, none",
    )
    p.add_argument(
        "--neighbours",
        choices=BACKENDS,
        default="auto",
        help="faiss (when installed) or exact blocked products in torch",
    )
    p.add_argument("--no-tsne", action="store_true", help="PCA map only")
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="of everything random: untrained weights, sampled queries, k-means, the maps' samples",
    )
    p.add_argument(
        "--cache",
        choices=("disk", "none"),
        default="disk",
        help="decode the folder once into the decoded cache, or on every read",
    )
    _extraction_flags(p)
    return p


@exits_on_user_errors
def explore_main(argv: list[str] | None = None) -> int:
    from tqdm.contrib.logging import logging_redirect_tqdm

    from lowres_ssl.explore import explore, summary_line

    args = explore_parser().parse_args(argv)
    _setup_logging()
    _positive_flags(args, ("size", "groups", "k", "queries", "max_pairs", "batch_size"))
    with logging_redirect_tqdm():
        summary = explore(
            args.model,
            args.folder,
            args.out,
            random_init=args.random_init,
            size=args.size,
            groups=args.groups,
            k=args.k,
            queries=args.queries,
            query=args.query,
            duplicates=args.duplicates,
            max_pairs=args.max_pairs,
            link_into=args.link_into,
            labels=args.labels,
            cache=args.cache,
            neighbours=args.neighbours,
            tsne=not args.no_tsne,
            seed=args.seed,
            **_extraction_settings(args),
        )
    print(summary_line(summary))
    print(f"open {Path(args.out) / 'index.html'}")
    return 0


__all__ = [
    "evaluate_main",
    "evaluate_parser",
    "explore_main",
    "explore_parser",
    "export_main",
    "finetune_main",
    "finetune_parser",
    "plot_main",
    "predict_main",
    "predict_parser",
    "resolve_config",
    "train_main",
    "train_parser",
]
