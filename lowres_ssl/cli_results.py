"""Command-line front ends for what a run made (``scripts/*.py`` are thin wrappers): evaluate,
explore, predict, export, plot. Training's front ends (train, finetune) are in
:mod:`lowres_ssl.cli`, with the exit rules every front end shares.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lowres_ssl.cli import exits_on_user_errors, setup_logging
from lowres_ssl.errors import UserError
from lowres_ssl.run_layout import CONFIG_FILE, CURVES_FILE, eval_file

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
    from lowres_ssl.predict import predict, prediction_line

    args = predict_parser().parse_args(argv)
    setup_logging()
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
    print(prediction_line(summary))
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
    from lowres_ssl.config import PRECISIONS

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

    from lowres_ssl.eval.evaluate import evaluation_line
    from lowres_ssl.files import held, write_text_atomic
    from lowres_ssl.run_layout import report_lock

    args = evaluate_parser().parse_args(argv)
    setup_logging()
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
    print(evaluation_line(args.protocol, record))
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

    from lowres_ssl.explore import exploration_line, explore

    args = explore_parser().parse_args(argv)
    setup_logging()
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
    print(exploration_line(summary))
    print(f"open {Path(args.out) / 'index.html'}")
    return 0


__all__ = [
    "evaluate_main",
    "evaluate_parser",
    "explore_main",
    "explore_parser",
    "export_main",
    "export_parser",
    "plot_main",
    "plot_parser",
    "predict_main",
    "predict_parser",
]
