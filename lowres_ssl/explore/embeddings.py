"""The embeddings of a folder: every image's backbone features, once.

The features come from the evaluation's extraction (:func:`lowres_ssl.eval.evaluate.features_of`:
the decoded cache, batching, precision and the feature cache keyed by the weights and the
folder's files), so a second explorer run on an unchanged folder with the same weights reads
them back instead of running the backbone. Files that cannot be decoded are skipped and
listed, as in training.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from lowres_ssl.data import SkipLog
from lowres_ssl.data.folders import IMAGE_EXTENSIONS, BadImage, decode_image
from lowres_ssl.errors import UserError
from lowres_ssl.eval.context import InferenceContext
from lowres_ssl.eval.evaluate import features_of
from lowres_ssl.eval.features import LabeledSet, open_set, to_input
from lowres_ssl.files import write_text_atomic
from lowres_ssl.predict import write_npy
from lowres_ssl.run_layout import SKIPPED_FILE

LABEL_MODES = ("auto", "folders", "none")


@dataclass
class Embedded:
    """The features of the images of one folder, row i being the file ``paths[i]``."""

    root: Path
    features: Tensor  # (n, d) float32, CPU
    paths: list[str]  # relative to root, "/" separators
    labels: Tensor | None  # (n,) int64 indices into classes; None without labels
    classes: list[str]
    skipped: SkipLog
    from_cache: bool
    seconds: float
    opened: LabeledSet  # the decoded images (thumbnails are cut from them)
    rows: Tensor  # (n,) the row of opened.images each feature row is

    def __len__(self) -> int:
        return len(self.paths)

    def file(self, i: int) -> Path:
        return self.root / self.paths[i]


def has_class_folders(root: Path) -> bool:
    """An ImageFolder tree: two or more (non-hidden) subfolders and no image directly in
    ``root``."""
    subfolders, loose = 0, False
    for entry in os.scandir(root):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            subfolders += 1
        elif entry.name.lower().endswith(IMAGE_EXTENSIONS):
            loose = True
    return subfolders >= 2 and not loose


def wants_labels(root: Path, mode: str) -> bool:
    if mode not in LABEL_MODES:
        raise UserError(f"--labels {mode}: choose one of {', '.join(LABEL_MODES)}")
    if mode == "auto":
        return has_class_folders(root)
    return mode == "folders"


def embed_folder(
    net: torch.nn.Module,
    sha: str,
    folder: str | Path,
    *,
    size: int,
    labels: str,
    context: InferenceContext,
    cache: str = "disk",
) -> Embedded:
    """The features of every usable image under ``folder`` (recursive); ``labels``: auto
    (class folders where the folder is laid out as root/<class>/…), folders or none."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise UserError(f"{root} is not a folder; pass the folder of images to explore")
    root = root.resolve()
    labeled = wants_labels(root, labels)
    opened = open_set(
        str(root),
        size=size,
        labeled=labeled,
        cache=cache,
        cache_dir=context.cache_dir,
        device="cpu",
        num_workers=context.num_workers,
        progress=context.progress,
    )
    f = features_of(net, sha, opened, context, "images", flag="the folder")
    rows = f.rows if f.rows is not None else torch.arange(len(f.labels))
    listed = opened.paths()
    if listed is None:  # not reachable for a folder; a guard for the type checker
        raise UserError(f"{root}: the images have no file names")
    return Embedded(
        root=root,
        features=f.features.float(),
        paths=[listed[i] for i in rows.tolist()],
        labels=f.labels if labeled else None,
        classes=list(f.classes) if labeled else [],
        skipped=f.skipped,
        from_cache=f.from_cache,
        seconds=f.seconds,
        opened=opened,
        rows=rows,
    )


def embed_image(
    net: torch.nn.Module, path: str | Path, *, size: int, context: InferenceContext
) -> Tensor:
    """The features (d,) of one image file outside the folder (a ``--query``), decoded as the
    folder's images are."""
    try:
        pixels = decode_image(Path(path).expanduser(), size)
    except (BadImage, OSError) as err:
        raise UserError(f"--query {path}: cannot use this image ({err})") from None
    x = to_input(pixels[None].to(context.device), context.channels_last)
    with torch.no_grad(), context.autocast():
        return net(x).float().cpu()[0]


def write_embeddings(out: Path, embedded: Embedded) -> list[str]:
    """``embeddings.npy`` (float32, a row per image), ``paths.txt`` (its file, one a line,
    relative to the folder) and, where files were skipped, ``skipped_files.txt``; the names."""
    write_npy(out / "embeddings.npy", embedded.features)
    write_text_atomic(out / "paths.txt", "".join(p + "\n" for p in embedded.paths))
    written = ["embeddings.npy", "paths.txt"]
    listing = out / SKIPPED_FILE
    if len(embedded.skipped):
        embedded.skipped.write(listing)
        written.append(listing.name)
    elif listing.exists():
        listing.unlink()  # an earlier run's list
    return written


__all__ = ["LABEL_MODES", "Embedded", "embed_folder", "embed_image", "has_class_folders"]
